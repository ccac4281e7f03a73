//! The student as one GGUF file, f16 or quantized, for llama.cpp, mistral.rs and this project's
//! own engine: the last step of distil → quantize → deploy.
//!
//! The file follows llama.cpp's conventions, since every GGUF loader follows them: tensor names
//! (`blk.N.attn_q.weight`), the Q/K row permutation of the llama architecture (which the loaders
//! undo for their RoPE), metadata keys with exact types (integers `u32`, floats `f32`, token
//! types `i32`), and llama.cpp's choice of types per tensor for each quantization (including its
//! fallbacks when a row length is not a multiple of the quantization block, which is the case
//! for most small models: SmolLM2's 576 and Qwen2.5-0.5B's 896 are not multiples of 256).
//! The tokenizer, the chat template, the licence and a provenance note travel in the metadata.
//! Quantization itself is candle's (`QTensor::quantize`), not code of ours.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::Value as Json;

use super::ExportError;
use crate::model::load::{permute_qk, BaseModel};
use crate::model::Family;

type Result<T> = std::result::Result<T, ExportError>;

/// The tensor types of an exported file, by the names llama.cpp's `llama-quantize` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum GgufQuant {
    /// Every matrix in f16 (the reference the quantized files are compared with).
    #[value(name = "f16")]
    #[serde(rename = "f16")]
    F16,
    /// 8-bit blocks of 32 (near-lossless, half of f16).
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit blocks of 32; the output matrix kept at 6 or 8 bits as llama.cpp does.
    #[value(name = "q4_0")]
    #[serde(rename = "q4_0")]
    Q4_0,
    /// llama.cpp's Q4_K_M mixture: 4-bit k-quants, 6-bit for a third of the value and
    /// down-projection matrices and for the output, with llama.cpp's fallbacks.
    #[value(name = "q4_k_m")]
    #[serde(rename = "q4_k_m")]
    Q4KM,
}

impl GgufQuant {
    /// The name used in file names and reports.
    pub fn name(self) -> &'static str {
        match self {
            GgufQuant::F16 => "f16",
            GgufQuant::Q8_0 => "q8_0",
            GgufQuant::Q4_0 => "q4_0",
            GgufQuant::Q4KM => "q4_k_m",
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufQuant::F16 => 1,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Q4_0 => 2,
            GgufQuant::Q4KM => 15,
        }
    }

    fn default_type(self) -> GgmlDType {
        match self {
            GgufQuant::F16 => GgmlDType::F16,
            GgufQuant::Q8_0 => GgmlDType::Q8_0,
            GgufQuant::Q4_0 => GgmlDType::Q4_0,
            GgufQuant::Q4KM => GgmlDType::Q4K,
        }
    }

    /// The type of one matrix, as llama.cpp's `llama_tensor_get_type` picks it.
    /// `is_output`: the output projection, or the embedding when the two are tied.
    fn matrix_type(
        self,
        gguf_name: &str,
        is_output: bool,
        n_layer: usize,
        cols: usize,
    ) -> GgmlDType {
        let wanted = match self {
            GgufQuant::F16 | GgufQuant::Q8_0 => self.default_type(),
            GgufQuant::Q4_0 | GgufQuant::Q4KM if is_output => {
                if !cols.is_multiple_of(GgmlDType::Q4K.block_size()) {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::Q6K
                }
            }
            GgufQuant::Q4_0 => GgmlDType::Q4_0,
            GgufQuant::Q4KM => {
                let layer = layer_of(gguf_name);
                let more_bits = (gguf_name.ends_with("attn_v.weight")
                    || gguf_name.ends_with("ffn_down.weight"))
                    && layer.is_some_and(|i| use_more_bits(i, n_layer));
                if more_bits {
                    GgmlDType::Q6K
                } else {
                    GgmlDType::Q4K
                }
            }
        };
        fit(wanted, cols)
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// llama.cpp's fallback when the row length is not a multiple of the type's block.
fn fit(dt: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(dt.block_size()) {
        return dt;
    }
    let fallback = match dt {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        d => d,
    };
    if cols.is_multiple_of(fallback.block_size()) {
        fallback
    } else {
        GgmlDType::F16
    }
}

fn layer_of(gguf_name: &str) -> Option<usize> {
    gguf_name
        .strip_prefix("blk.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The GGUF name of a Hugging Face tensor name (the inverse of `load::gguf_to_hf_name`).
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let gg = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gg}.{suffix}"))
}

/// What [`write_gguf`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct GgufReport {
    /// The file written.
    pub path: PathBuf,
    /// The quantization asked for.
    pub quant: GgufQuant,
    /// Size of the file in bytes.
    pub file_bytes: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// Tensors per stored type (`Q4K`, `Q6K`, `F32`, ...): what the mixture became.
    pub types: BTreeMap<String, usize>,
    /// Parameters (elements of every tensor).
    pub parameters: u64,
}

/// Provenance written into the file's metadata.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    /// `general.name`.
    pub name: String,
    /// `general.license`: the licence of the weights (the base model's), when known.
    pub license: Option<String>,
    /// `general.description`: the model card (teachers and their licences) or a note.
    pub description: String,
    /// `distill.*` keys: what the file was made from (base, adapter, quantization).
    pub source: Vec<(String, String)>,
}

/// Copies a tensor into a fresh contiguous f32 CPU tensor: candle's quantizer reads the whole
/// storage buffer and would ignore a view's offset.
fn fresh_f32(t: &Tensor) -> Result<Tensor> {
    let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let shape = t.shape().clone();
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Writes `tensors` (Hugging Face names, adapters already merged) of `model` as a GGUF file at
/// `out` (written beside it and renamed into place, so a failed export leaves nothing).
pub fn write_gguf(
    model: &BaseModel,
    tensors: &HashMap<String, Tensor>,
    quant: GgufQuant,
    provenance: &Provenance,
    out: &Path,
) -> Result<GgufReport> {
    let cfg = &model.config;
    let arch = match cfg.family()? {
        Family::Llama => "llama",
        Family::Qwen2 => "qwen2",
    };
    let n_head = cfg.num_attention_heads;
    let n_kv = cfg.num_kv_heads();
    let n_layer = cfg.num_hidden_layers;
    if arch == "llama"
        && (tensors.contains_key("model.layers.0.self_attn.q_proj.bias")
            || tensors.contains_key("model.layers.0.self_attn.k_proj.bias"))
    {
        return Err(ExportError::Unsupported(
            "a llama-architecture model with q/k biases (their GGUF row permutation is not \
             implemented by the loader)"
                .into(),
        ));
    }
    if cfg
        .rope_scaling
        .as_ref()
        .is_some_and(|r| r.kind() != "linear" && r.kind() != "default")
    {
        return Err(ExportError::Unsupported(format!(
            "rope scaling `{}` in GGUF (only linear scaling has GGUF keys the loaders read)",
            cfg.rope_scaling
                .as_ref()
                .map(|r| r.kind())
                .unwrap_or_default()
        )));
    }
    let tied = cfg.tie_word_embeddings || !tensors.contains_key("lm_head.weight");

    // Tensors in llama.cpp's order: embedding, each layer, final norm, output.
    let mut named: Vec<(String, String)> = Vec::new();
    for hf in tensors.keys() {
        if tied && hf == "lm_head.weight" {
            continue;
        }
        let gg = hf_to_gguf_name(hf)
            .ok_or_else(|| ExportError::Unsupported(format!("tensor `{hf}` has no GGUF name")))?;
        named.push((gg, hf.clone()));
    }
    let rank = |gg: &str| -> (usize, usize, String) {
        match layer_of(gg) {
            _ if gg.starts_with("token_embd") => (0, 0, gg.to_string()),
            Some(i) => (1, i, gg.to_string()),
            None if gg.starts_with("output_norm") => (2, 0, gg.to_string()),
            None => (3, 0, gg.to_string()),
        }
    };
    named.sort_by_key(|(gg, _)| rank(gg));

    let mut qtensors: Vec<(String, QTensor)> = Vec::with_capacity(named.len());
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    let mut parameters = 0u64;
    for (gg, hf) in &named {
        let mut t = fresh_f32(&tensors[hf])?;
        if arch == "llama" && t.rank() == 2 {
            if hf.ends_with("q_proj.weight") {
                t = fresh_f32(&permute_qk(&t, n_head)?)?;
            } else if hf.ends_with("k_proj.weight") {
                t = fresh_f32(&permute_qk(&t, n_kv)?)?;
            }
        }
        let dt = if t.rank() == 2 && gg.ends_with(".weight") && !gg.contains("_norm") {
            let is_output = gg == "output.weight" || (tied && gg == "token_embd.weight");
            quant.matrix_type(gg, is_output, n_layer, t.dim(1)?)
        } else {
            GgmlDType::F32
        };
        parameters += t.elem_count() as u64;
        let q = QTensor::quantize(&t, dt)
            .map_err(|e| ExportError::Tensor(gg.clone(), e.to_string()))?;
        *types.entry(format!("{dt:?}")).or_default() += 1;
        qtensors.push((gg.clone(), q));
    }

    let vocab_rows = tensors
        .get("model.embed_tokens.weight")
        .ok_or_else(|| ExportError::Unsupported("no model.embed_tokens.weight".into()))?
        .dim(0)?;
    let mut meta: Vec<(String, gguf_file::Value)> = Vec::new();
    let mut put = |k: &str, v: gguf_file::Value| meta.push((k.to_string(), v));
    use gguf_file::Value as V;
    put("general.architecture", V::String(arch.into()));
    put("general.type", V::String("model".into()));
    put("general.name", V::String(provenance.name.clone()));
    if let Some(l) = &provenance.license {
        put("general.license", V::String(l.clone()));
    }
    put(
        "general.description",
        V::String(provenance.description.clone()),
    );
    put("general.file_type", V::U32(quant.file_type()));
    put("general.quantization_version", V::U32(2));
    let key = |k: &str| format!("{arch}.{k}");
    let u32_of = |n: usize| V::U32(n as u32);
    put(&key("context_length"), u32_of(cfg.max_position_embeddings));
    put(&key("embedding_length"), u32_of(cfg.hidden_size));
    put(&key("block_count"), u32_of(n_layer));
    put(&key("feed_forward_length"), u32_of(cfg.intermediate_size));
    put(&key("attention.head_count"), u32_of(n_head));
    put(&key("attention.head_count_kv"), u32_of(n_kv));
    put(&key("rope.dimension_count"), u32_of(cfg.head_dim()));
    if cfg.head_dim() * n_head != cfg.hidden_size {
        put(&key("attention.key_length"), u32_of(cfg.head_dim()));
        put(&key("attention.value_length"), u32_of(cfg.head_dim()));
    }
    put(
        &key("attention.layer_norm_rms_epsilon"),
        V::F32(cfg.rms_norm_eps as f32),
    );
    put(&key("rope.freq_base"), V::F32(cfg.rope_theta as f32));
    if let Some(rs) = &cfg.rope_scaling {
        if rs.kind() == "linear" {
            put(&key("rope.scaling.type"), V::String("linear".into()));
            put(
                &key("rope.scaling.factor"),
                V::F32(rs.factor.unwrap_or(1.0) as f32),
            );
        }
    }
    put(&key("vocab_size"), u32_of(vocab_rows));
    for (k, v) in tokenizer_metadata(model, vocab_rows)? {
        put(&k, v);
    }
    for (k, v) in &provenance.source {
        put(&format!("distill.{k}"), V::String(v.clone()));
    }

    let mut tmp = super::temp_beside(out)?;
    {
        let meta_refs: Vec<(&str, &gguf_file::Value)> =
            meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        gguf_file::write(&mut w, &meta_refs, &tensor_refs)?;
        w.flush().map_err(|e| ExportError::io(out, e))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| ExportError::io(out, e))?;
    super::publish(tmp, out)?;
    let file_bytes = std::fs::metadata(out)
        .map_err(|e| ExportError::io(out, e))?
        .len();
    Ok(GgufReport {
        path: out.to_path_buf(),
        quant,
        file_bytes,
        tensors: qtensors.len(),
        types,
        parameters,
    })
}

/// The `tokenizer.ggml.*` keys and the chat template: what `ChatTokenizer::from_gguf` and the
/// other loaders read back. Byte-level BPE only (what GGUF calls `gpt2`).
fn tokenizer_metadata(
    model: &BaseModel,
    vocab_rows: usize,
) -> Result<Vec<(String, gguf_file::Value)>> {
    use gguf_file::Value as V;
    let tok = &model.tokenizer;
    let json: Json = serde_json::from_str(
        &tok.inner()
            .to_string(false)
            .map_err(|e| ExportError::Tokenizer(e.to_string()))?,
    )
    .map_err(|e| ExportError::Tokenizer(e.to_string()))?;
    let bpe = &json["model"];
    if bpe["type"].as_str() != Some("BPE") || json["decoder"]["type"].as_str() != Some("ByteLevel")
    {
        return Err(ExportError::Unsupported(
            "a tokenizer that is not byte-level BPE (GGUF `gpt2`); SentencePiece vocabularies \
             are not exported"
                .into(),
        ));
    }
    let vocab = tok.inner().get_vocab(true);
    let n = vocab_rows.max(vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0));
    let mut tokens: Vec<Option<String>> = vec![None; n];
    for (t, &id) in &vocab {
        tokens[id as usize] = Some(t.clone());
    }
    let mut types = vec![1i32; n];
    for (id, added) in tok.inner().get_added_tokens_decoder() {
        if let Some(ty) = types.get_mut(id as usize) {
            *ty = if added.special { 3 } else { 4 };
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = bpe["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| match x {
                    Json::String(s) => Some(s.clone()),
                    Json::Array(p) if p.len() == 2 => {
                        Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let pre = pre_tokenizer_name(&json["pre_tokenizer"])?;
    let id_of = |t: Option<&str>| t.and_then(|t| tok.token_id(t));
    let bos = id_of(tok.bos_token());
    let eos = id_of(tok.eos_token());
    let add_bos = match bos {
        Some(b) => tok
            .encode("a", true)
            .map(|ids| ids.first() == Some(&b))
            .unwrap_or(false),
        None => false,
    };
    let mut out = vec![
        ("tokenizer.ggml.model".to_string(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), V::String(pre.into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            V::Array(types.into_iter().map(V::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            V::Array(merges.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.add_bos_token".to_string(), V::Bool(add_bos)),
        (
            "tokenizer.ggml.add_space_prefix".to_string(),
            V::Bool(false),
        ),
    ];
    if let Some(b) = bos {
        out.push(("tokenizer.ggml.bos_token_id".into(), V::U32(b)));
    }
    if let Some(e) = eos {
        out.push(("tokenizer.ggml.eos_token_id".into(), V::U32(e)));
        out.push(("tokenizer.ggml.padding_token_id".into(), V::U32(e)));
    }
    if let Some(t) = tok.chat_template() {
        out.push(("tokenizer.chat_template".into(), V::String(t.to_string())));
    }
    Ok(out)
}

/// The llama.cpp name of a Hugging Face pre-tokenizer: one that llama.cpp knows and that this
/// project's loader turns back into the same pre-tokenizer.
fn pre_tokenizer_name(pre: &Json) -> Result<&'static str> {
    let kind = pre["type"].as_str().unwrap_or("");
    let steps: Vec<&Json> = match kind {
        "Sequence" => pre["pretokenizers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![pre],
    };
    let types: Vec<&str> = steps
        .iter()
        .map(|s| s["type"].as_str().unwrap_or(""))
        .collect();
    let split_regex = |s: &Json| s["pattern"]["Regex"].as_str().map(str::to_string);
    match types.as_slice() {
        ["ByteLevel"] => Ok("gpt-2"),
        ["Digits", "ByteLevel"] if steps[0]["individual_digits"].as_bool() == Some(true) => {
            Ok("smollm")
        }
        ["Split", "ByteLevel"] => {
            let re = split_regex(steps[0]).unwrap_or_default();
            if re.contains(r"\p{N}{1,3}") {
                Ok("llama-bpe")
            } else if re.contains(r"\p{N}|") || re.contains(r"\p{N}| ") {
                Ok("qwen2")
            } else {
                Err(ExportError::Unsupported(format!(
                    "pre-tokenizer split `{re}` has no llama.cpp name"
                )))
            }
        }
        other => Err(ExportError::Unsupported(format!(
            "pre-tokenizer {other:?} has no llama.cpp name"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_follows_llama_cpp_including_its_fallbacks() {
        let q = GgufQuant::Q4KM;
        // Rows of 1536 take k-quants; rows of 576 fall back to Q5_0 (Q4_K) and Q8_0 (Q6_K).
        assert_eq!(
            q.matrix_type("blk.6.ffn_down.weight", false, 30, 1536),
            GgmlDType::Q4K
        );
        assert_eq!(
            q.matrix_type("blk.0.ffn_down.weight", false, 30, 1536),
            GgmlDType::Q6K
        );
        assert_eq!(
            q.matrix_type("blk.29.attn_v.weight", false, 30, 576),
            GgmlDType::Q8_0
        );
        assert_eq!(
            q.matrix_type("blk.5.attn_q.weight", false, 30, 576),
            GgmlDType::Q5_0
        );
        assert_eq!(
            q.matrix_type("token_embd.weight", true, 30, 576),
            GgmlDType::Q8_0
        );
        assert_eq!(
            q.matrix_type("token_embd.weight", true, 30, 512),
            GgmlDType::Q6K
        );
        assert_eq!(
            GgufQuant::Q4_0.matrix_type("blk.1.ffn_up.weight", false, 30, 576),
            GgmlDType::Q4_0
        );
        assert_eq!(
            GgufQuant::Q8_0.matrix_type("blk.1.ffn_up.weight", false, 30, 50),
            GgmlDType::F16
        );
        // llama.cpp's layer pattern for 30 layers: 0..3, 26..29 and every third between.
        let more: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(
            more,
            vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
        );
    }

    #[test]
    fn names_invert_the_loaders_mapping() {
        for gg in [
            "token_embd.weight",
            "output_norm.weight",
            "output.weight",
            "blk.7.attn_q.weight",
            "blk.7.attn_q.bias",
            "blk.0.attn_output.weight",
            "blk.12.ffn_down.weight",
            "blk.3.attn_norm.weight",
            "blk.3.ffn_norm.weight",
        ] {
            let hf = crate::model::load::gguf_to_hf_name(gg).expect("known name");
            assert_eq!(hf_to_gguf_name(&hf).as_deref(), Some(gg), "{hf}");
        }
        assert_eq!(
            hf_to_gguf_name("model.layers.0.mlp.experts.0.w1.weight"),
            None
        );
    }
}
