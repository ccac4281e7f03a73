//! Tokenizer and chat template of a student model.
//!
//! Both a Hugging Face directory (`tokenizer.json` + `tokenizer_config.json`) and a GGUF file
//! (the `tokenizer.ggml.*` metadata) are supported, so that a GGUF student can be trained and
//! exported without the original repository. Chat templates are rendered with minijinja using
//! the same settings as `transformers` (`trim_blocks`, `lstrip_blocks`, Python string methods).

use super::{ModelError, Result};
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

/// One chat message, as passed to a chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Message text, passed verbatim (including any `<think>...</think>` block).
    pub content: String,
}

impl ChatMessage {
    /// Convenience constructor.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A tokenizer together with its chat template and special tokens.
#[derive(Debug, Clone)]
pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The original `tokenizer_config.json`, written back verbatim on export when present.
    config_json: Option<Value>,
    source: String,
}

/// GPT-2 style pre-tokenizer regex used by Llama 3 (`tokenizer.ggml.pre = "llama-bpe"`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 pre-tokenizer regex (`tokenizer.ggml.pre = "qwen2"`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn tok_err(context: impl ToString, e: impl ToString) -> ModelError {
    ModelError::Tokenizer {
        context: context.to_string(),
        msg: e.to_string(),
    }
}

/// `bos_token`/`eos_token` in `tokenizer_config.json` are either a string or an
/// `AddedToken` object with a `content` field.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is either a string or a list of `{name, template}`; the `default` entry
/// (or the first) is used.
fn template_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => {
            let pick = list
                .iter()
                .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())?;
            pick.get("template")?.as_str().map(str::to_string)
        }
        _ => None,
    }
}

fn gguf_str<'a>(c: &'a gguf_file::Content, key: &str) -> Option<&'a str> {
    c.metadata.get(key)?.to_string().ok().map(String::as_str)
}

fn gguf_u32(c: &gguf_file::Content, key: &str) -> Option<u32> {
    c.metadata.get(key)?.to_u32().ok()
}

fn gguf_str_array(c: &gguf_file::Content, key: &str, file: &str) -> Result<Vec<String>> {
    let arr = c
        .metadata
        .get(key)
        .ok_or_else(|| ModelError::field(file, key, "missing"))?
        .to_vec()
        .map_err(|e| ModelError::field(file, key, e))?;
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| ModelError::field(file, key, e))
        })
        .collect()
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from a Hugging Face
    /// model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| tok_err(tok_path.display(), e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config_json: Option<Value> = if cfg_path.exists() {
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            Some(serde_json::from_str(&text).map_err(|e| ModelError::Json {
                path: cfg_path.clone(),
                source: e,
            })?)
        } else {
            None
        };
        let get = |k: &str| config_json.as_ref().and_then(|c| c.get(k));
        let mut chat_template = template_string(get("chat_template"));
        // Newer repositories keep the template in a separate file.
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?);
        }
        let out = Self {
            tokenizer,
            chat_template,
            bos_token: token_string(get("bos_token")),
            eos_token: token_string(get("eos_token")),
            config_json,
            source: dir.display().to_string(),
        };
        out.check_template()?;
        Ok(out)
    }

    /// Builds the tokenizer from GGUF `tokenizer.ggml.*` metadata (byte-level BPE, i.e.
    /// `tokenizer.ggml.model = "gpt2"`). Control tokens (type 3) become special added tokens,
    /// user-defined tokens (type 4) plain added tokens.
    pub fn from_gguf(content: &gguf_file::Content, file: &str) -> Result<Self> {
        let model = gguf_str(content, "tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "{file}: tokenizer.ggml.model `{model}` (only byte-level BPE `gpt2` is supported)"
            )));
        }
        let tokens = gguf_str_array(content, "tokenizer.ggml.tokens", file)?;
        let merges = gguf_str_array(content, "tokenizer.ggml.merges", file)?;
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| ModelError::field(file, "tokenizer.ggml.token_type", e))?
                .iter()
                .map(|t| {
                    t.to_i32()
                        .map_err(|e| ModelError::field(file, "tokenizer.ggml.token_type", e))
                })
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let added: Vec<Value> = tokens
            .iter()
            .zip(types.iter())
            .enumerate()
            .filter(|(_, (_, ty))| **ty == 3 || **ty == 4)
            .map(|(id, (t, ty))| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": *ty == 4, "special": *ty == 3})
            })
            .collect();
        let byte_level = |use_regex: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                   "use_regex": use_regex})
        };
        let split = |re: &str| {
            json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated",
                   "invert": false})
        };
        let pre = gguf_str(content, "tokenizer.ggml.pre").unwrap_or("default");
        // Unknown pre-tokenizer names fall back to plain GPT-2 splitting, which is what
        // llama.cpp does as well.
        let pre_tokenizer = match pre {
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
            }),
            "llama-bpe" | "llama3" | "smaug-bpe" | "falcon3" | "pixtral" => json!({
                "type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]
            }),
            "qwen2" | "deepseek-r1-qwen" => json!({
                "type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]
            }),
            _ => byte_level(true),
        };
        let name_of =
            |key: &str| gguf_u32(content, key).and_then(|id| tokens.get(id as usize).cloned());
        let bos_token = name_of("tokenizer.ggml.bos_token_id");
        let eos_token = name_of("tokenizer.ggml.eos_token_id");
        let add_bos = content
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let post_processor = match (&bos_token, add_bos) {
            (Some(bos), true) => {
                let id = gguf_u32(content, "tokenizer.ggml.bos_token_id").unwrap_or(0);
                json!({
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                               {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                             {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": bos, "type_id": 1}},
                             {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos.as_str(): {"id": bos, "ids": [id], "tokens": [bos]}}
                })
            }
            _ => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                         "use_regex": true}),
        };
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges
            }
        });
        let bytes = serde_json::to_vec(&doc).map_err(|e| tok_err(file, e))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| tok_err(file, e))?;
        let out = Self {
            tokenizer,
            chat_template: gguf_str(content, "tokenizer.chat_template").map(str::to_string),
            bos_token,
            eos_token,
            config_json: None,
            source: file.to_string(),
        };
        out.check_template()?;
        Ok(out)
    }

    fn environment(&self) -> minijinja::Environment<'static> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // `strftime_now` is deliberately not defined: templates that use it (Llama 3) then fall
        // back to their fixed default date, which keeps rendered training data reproducible.
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<minijinja::Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env
    }

    fn check_template(&self) -> Result<()> {
        if let Some(t) = &self.chat_template {
            self.environment()
                .template_from_str(t)
                .map_err(|e| self.template_err(e))?;
        }
        Ok(())
    }

    fn template_err(&self, e: minijinja::Error) -> ModelError {
        let mut msg = e.to_string();
        if let Some(detail) = e.display_debug_info().to_string().lines().next() {
            if !detail.is_empty() {
                msg.push_str(&format!(" ({detail})"));
            }
        }
        ModelError::Template {
            context: self.source.clone(),
            msg,
        }
    }

    /// Replaces the chat template, so a model exported after training with an overridden
    /// template renders prompts exactly as the student saw them.
    pub fn set_chat_template(&mut self, template: String) {
        if let Some(Value::Object(m)) = &mut self.config_json {
            m.insert("chat_template".into(), Value::String(template.clone()));
        }
        self.chat_template = Some(template);
    }

    /// Renders the chat template for `messages`; with `add_generation_prompt` the assistant
    /// header is appended so generation (or the supervised completion) starts after it.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template {
                context: self.source.clone(),
                msg: "no chat_template in tokenizer_config.json / GGUF metadata".into(),
            })?;
        let env = self.environment();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.render_str(template, ctx)
            .map_err(|e| self.template_err(e))
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. BOS).
    /// Special tokens written in the text (`<|im_start|>`) are always recognised.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, optionally dropping special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err(&self.source, e))
    }

    /// Id of a token string (e.g. `<|im_end|>`), if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The BOS token string, if any.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token string, if any.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The raw chat template, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The vocabulary by id (added tokens included), for comparing tokenizers.
    pub fn vocabulary(&self) -> Vec<String> {
        let vocab = self.tokenizer.get_vocab(true);
        let size = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        let mut out = vec![String::new(); size];
        for (tok, id) in vocab {
            out[id as usize] = tok;
        }
        out
    }

    /// What distillation needs two tokenizers to share: see [`Vocabulary`].
    pub fn fingerprint(&self) -> Vocabulary {
        Vocabulary::of(&self.vocabulary(), self.bos_token(), self.eos_token())
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (the original config
    /// verbatim when loaded from a Hugging Face directory, otherwise a minimal one with the
    /// chat template and special tokens).
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let tok_path = dir.join("tokenizer.json");
        self.tokenizer
            .save(&tok_path, true)
            .map_err(|e| tok_err(tok_path.display(), e))?;
        let cfg = match &self.config_json {
            Some(c) => c.clone(),
            None => json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "clean_up_tokenization_spaces": false,
                "model_max_length": 1_000_000_000_000_000_000u64,
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                "chat_template": self.chat_template,
            }),
        };
        let cfg_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| ModelError::Json {
            path: cfg_path.clone(),
            source: e,
        })?;
        std::fs::write(&cfg_path, text).map_err(|e| ModelError::io(&cfg_path, e))
    }
}

/// A tokenizer's identity for distillation: a teacher's token ids are meaningful to a student
/// only when both map every id to the same string and agree on BOS and EOS. Trailing ids whose
/// strings look like padding (`[PAD…]`, `<pad…>`, `<|extra…`, `<unused…>`, or empty), as
/// models add to round their embedding rows (Qwen2.5: 151665 tokens in 151936 or 152064
/// rows), are not part of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vocabulary {
    /// Ids up to the last non-padding token.
    pub size: usize,
    /// SHA-256 of the ids' strings, BOS and EOS (hex, first 16 bytes).
    pub hash: String,
    /// The BOS token string.
    pub bos: Option<String>,
    /// The EOS token string.
    pub eos: Option<String>,
}

/// Whether a token string is one a model adds to pad its vocabulary.
fn is_padding_token(t: &str) -> bool {
    t.is_empty()
        || t.starts_with("[PAD")
        || t.starts_with("<pad")
        || t.starts_with("<|extra")
        || t.starts_with("<unused")
}

impl Vocabulary {
    /// The fingerprint of `tokens` (by id) with its special tokens.
    pub fn of(tokens: &[String], bos: Option<&str>, eos: Option<&str>) -> Self {
        use sha2::{Digest, Sha256};
        let size = tokens
            .iter()
            .rposition(|t| !is_padding_token(t))
            .map_or(0, |i| i + 1);
        let mut h = Sha256::new();
        for t in &tokens[..size] {
            h.update(t.as_bytes());
            h.update([0u8]);
        }
        h.update(format!("bos={bos:?} eos={eos:?}").as_bytes());
        Self {
            size,
            hash: hex::encode(&h.finalize()[..16]),
            bos: bos.map(str::to_string),
            eos: eos.map(str::to_string),
        }
    }

    /// `None` when `self` (the teacher's) and `other` (the student's) agree; otherwise what
    /// differs, in words. `tokens` give the first differing id when both lists are at hand.
    pub fn difference(
        &self,
        other: &Vocabulary,
        tokens: Option<(&[String], &[String])>,
    ) -> Option<String> {
        if self == other {
            return None;
        }
        let mut what = Vec::new();
        if self.size != other.size {
            what.push(format!(
                "the teacher has {} tokens, the student {}",
                self.size, other.size
            ));
        }
        if self.bos != other.bos || self.eos != other.eos {
            what.push(format!(
                "special tokens differ (teacher BOS {:?} EOS {:?}, student BOS {:?} EOS {:?})",
                self.bos, self.eos, other.bos, other.eos
            ));
        }
        if let Some((a, b)) = tokens {
            if let Some(i) = (0..self.size.min(other.size)).find(|&i| a.get(i) != b.get(i)) {
                what.push(format!(
                    "id {i} is {:?} for the teacher and {:?} for the student",
                    a.get(i).map(String::as_str).unwrap_or(""),
                    b.get(i).map(String::as_str).unwrap_or("")
                ));
            }
        }
        if what.is_empty() {
            what.push(format!(
                "the token strings differ (vocabulary hash {} vs {})",
                self.hash, other.hash
            ));
        }
        Some(what.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn tiny() -> ChatTokenizer {
        let doc = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"}
        });
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&doc).unwrap_or_default());
        ChatTokenizer {
            tokenizer: tokenizer.unwrap_or_else(|e| panic!("{e}")),
            chat_template: Some(CHATML.into()),
            bos_token: None,
            eos_token: Some("<|im_end|>".into()),
            config_json: None,
            source: "test".into(),
        }
    }

    #[test]
    fn chatml_keeps_think_blocks() -> Result<()> {
        let t = tiny();
        let msgs = [
            ChatMessage::new("user", "2+2?"),
            ChatMessage::new("assistant", "<think>\n2+2=4\n</think>\n4"),
        ];
        let s = t.apply_chat_template(&msgs, false)?;
        assert!(s.contains("<|im_start|>assistant\n<think>\n2+2=4\n</think>\n4<|im_end|>\n"));
        assert!(s.starts_with("<|im_start|>system\n"));
        let g = t.apply_chat_template(&msgs[..1], true)?;
        assert!(g.ends_with("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"));
        Ok(())
    }

    #[test]
    fn pycompat_methods_and_raise() -> Result<()> {
        let mut t = tiny();
        t.chat_template = Some(
            "{% for m in messages %}{{ m.content.strip() | upper }}{% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}{% endfor %}"
                .into(),
        );
        assert_eq!(
            t.apply_chat_template(&[ChatMessage::new("user", "  hi ")], false)?,
            "HI"
        );
        let err = t.apply_chat_template(&[ChatMessage::new("bad", "x")], false);
        assert!(matches!(err, Err(ModelError::Template { .. })));
        Ok(())
    }
}
