//! Loading base checkpoints (Hugging Face directory or GGUF file) and exporting merged models.
//!
//! Whatever the source, tensors are addressed with Hugging Face names
//! (`model.layers.0.self_attn.q_proj.weight`) so that the model code, PEFT adapter names and the
//! exported `model.safetensors` all agree. GGUF tensors are dequantised to f32 and renamed; the
//! rows of Q/K are un-permuted from llama.cpp's interleaved RoPE layout back to the
//! `rotate_half` layout the model code uses.

use super::lora::{self, LoraConfig, LoraVarBuilder};
use super::tokenizer::ChatTokenizer;
use super::{Config, ModelError, Result, RopeScaling, Student};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Where the frozen base tensors come from.
#[derive(Debug, Clone)]
pub enum BaseWeights {
    /// Memory-mapped safetensors files (one, or the shards of an index).
    Safetensors(Vec<PathBuf>),
    /// Tensors already in memory under Hugging Face names (dequantised GGUF).
    Tensors(HashMap<String, Tensor>),
}

/// A base checkpoint: configuration, weights and tokenizer.
#[derive(Debug, Clone)]
pub struct BaseModel {
    /// Architecture hyper-parameters (`tie_word_embeddings` reflects the actual tensors).
    pub config: Config,
    /// The frozen weights.
    pub weights: BaseWeights,
    /// Tokenizer and chat template.
    pub tokenizer: ChatTokenizer,
    /// The directory or GGUF file it was read from.
    pub source: PathBuf,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

/// Inverse of llama.cpp's `permute` of Q/K rows (`convert_hf_to_gguf.py`):
/// GGUF stores each head's rows interleaved as `(head, head_dim/2, 2)`; Hugging Face's
/// `rotate_half` RoPE expects `(head, 2, head_dim/2)`. `w` is `(n_head * head_dim, in)`.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if n_head == 0 || !out.is_multiple_of(2 * n_head) {
        return Err(ModelError::Input(format!(
            "cannot un-permute {out} rows into {n_head} heads"
        )));
    }
    let half = out / n_head / 2;
    Ok(w.reshape((n_head, half, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?)
}

/// llama.cpp's `permute` (Hugging Face layout to GGUF layout); the inverse of
/// [`unpermute_qk`], used to write GGUF-compatible tensors and to test the round trip.
pub fn permute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if n_head == 0 || !out.is_multiple_of(2 * n_head) {
        return Err(ModelError::Input(format!(
            "cannot permute {out} rows into {n_head} heads"
        )));
    }
    let half = out / n_head / 2;
    Ok(w.reshape((n_head, 2, half, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?)
}

/// Maps a GGUF tensor name to its Hugging Face name (`None` for tensors with no equivalent).
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

fn gguf_usize(c: &gguf_file::Content, key: &str, file: &str) -> Result<usize> {
    let v = c
        .metadata
        .get(key)
        .ok_or_else(|| ModelError::field(file, key, "missing"))?;
    let n = v
        .to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
        .map_err(|e| ModelError::field(file, key, e))?;
    Ok(n as usize)
}

fn gguf_f64(c: &gguf_file::Content, key: &str) -> Option<f64> {
    let v = c.metadata.get(key)?;
    v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
}

/// The GGUF architectures the model code implements.
pub const GGUF_ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// A GGUF file's `general.architecture` (`llama` when absent, as llama.cpp assumes).
pub fn gguf_architecture(content: &gguf_file::Content) -> String {
    content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "llama".into())
}

impl BaseModel {
    /// Loads a Hugging Face directory or, if `path` is a file, a GGUF checkpoint.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if path.is_dir() {
            Self::from_hf_dir(path)
        } else {
            Self::from_gguf(path, device)
        }
    }

    /// Reads `config.json`, the safetensors file(s) (single or sharded through
    /// `model.safetensors.index.json`) and the tokenizer from a Hugging Face directory.
    /// Tensors are memory-mapped, not read, until the model is built.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg_value = read_json(&cfg_path)?;
        let mut config: Config =
            serde_json::from_value(cfg_value).map_err(|e| ModelError::Json {
                path: cfg_path.clone(),
                source: e,
            })?;
        config
            .validate()
            .map_err(|e| ModelError::field(cfg_path.display(), "config", e))?;
        config.family()?;
        let index = dir.join("model.safetensors.index.json");
        let files = if index.exists() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| ModelError::field(index.display(), "weight_map", "missing"))?;
            let shards: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
            shards.into_iter().map(|s| dir.join(s)).collect::<Vec<_>>()
        } else {
            vec![dir.join("model.safetensors")]
        };
        for f in &files {
            if !f.exists() {
                return Err(ModelError::io(
                    f,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "safetensors file missing"),
                ));
            }
        }
        // SAFETY: the files are only read; modifying them while mapped is undefined, as for
        // every memory-mapped checkpoint loader.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| ModelError::tensor(dir.display(), "*", e))?;
        config.tie_word_embeddings = st.get("lm_head.weight").is_err();
        Ok(Self {
            config,
            weights: BaseWeights::Safetensors(files),
            tokenizer: ChatTokenizer::from_hf_dir(dir)?,
            source: dir.to_path_buf(),
        })
    }

    /// Reads a GGUF file (`llama` or `qwen2` architecture): configuration from metadata, every
    /// tensor dequantised to f32 on `device` under its Hugging Face name, tokenizer and chat
    /// template from `tokenizer.ggml.*`.
    pub fn from_gguf(path: &Path, device: &Device) -> Result<Self> {
        let file_name = path.display().to_string();
        let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| ModelError::field(&file_name, "header", e))?;
        let arch = gguf_architecture(&content);
        if !GGUF_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ModelError::Unsupported(format!(
                "{file_name}: general.architecture `{arch}` (supported: llama, qwen2)"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let n_layer = gguf_usize(&content, &key("block_count"), &file_name)?;
        let hidden = gguf_usize(&content, &key("embedding_length"), &file_name)?;
        let ffn = gguf_usize(&content, &key("feed_forward_length"), &file_name)?;
        let n_head = gguf_usize(&content, &key("attention.head_count"), &file_name)?;
        let n_kv =
            gguf_usize(&content, &key("attention.head_count_kv"), &file_name).unwrap_or(n_head);
        let ctx = gguf_usize(&content, &key("context_length"), &file_name).unwrap_or(4096);
        let head_dim = gguf_usize(&content, &key("attention.key_length"), &file_name)
            .or_else(|_| gguf_usize(&content, &key("rope.dimension_count"), &file_name))
            .ok();
        let tokenizer = ChatTokenizer::from_gguf(&content, &file_name)?;
        let vocab = tokenizer.inner().get_vocab_size(true);
        let mut rope_scaling = None;
        if let Some(ty) = content
            .metadata
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
        {
            match ty.as_str() {
                "none" => {}
                "linear" => {
                    let factor =
                        gguf_f64(&content, &key("rope.scaling.factor")).ok_or_else(|| {
                            ModelError::field(&file_name, key("rope.scaling.factor"), "missing")
                        })?;
                    rope_scaling = Some(RopeScaling {
                        rope_type: Some("linear".into()),
                        legacy_type: None,
                        factor: Some(factor),
                        low_freq_factor: None,
                        high_freq_factor: None,
                        original_max_position_embeddings: None,
                        extra: Default::default(),
                    });
                }
                other => {
                    return Err(ModelError::Unsupported(format!(
                        "{file_name}: rope.scaling.type `{other}`"
                    )))
                }
            }
        }
        if content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(ModelError::Unsupported(format!(
                "{file_name}: rope_freqs.weight (Llama 3.1 frequency factors) in GGUF; \
                 load the Hugging Face directory instead"
            )));
        }
        let mut extra = serde_json::Map::new();
        for (hf, gg) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ] {
            if let Some(id) = content.metadata.get(gg).and_then(|v| v.to_u32().ok()) {
                extra.insert(hf.into(), json!(id));
            }
        }
        let mut config = Config {
            model_type: arch.clone(),
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: n_layer,
            num_attention_heads: n_head,
            num_key_value_heads: Some(n_kv),
            head_dim: head_dim.filter(|&d| d * n_head != hidden),
            rms_norm_eps: gguf_f64(&content, &key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: gguf_f64(&content, &key("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: ctx,
            vocab_size: vocab,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: false,
            mlp_bias: false,
            hidden_act: Some("silu".into()),
            extra,
        };
        config.validate()?;
        let mut tensors = HashMap::new();
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let Some(hf) = gguf_to_hf_name(name) else {
                return Err(ModelError::tensor(
                    &file_name,
                    name,
                    "no Hugging Face equivalent (unsupported architecture variant)",
                ));
            };
            let q = content
                .tensor(&mut file, name, device)
                .map_err(|e| ModelError::tensor(&file_name, name, e))?;
            let mut t = q
                .dequantize(device)
                .map_err(|e| ModelError::tensor(&file_name, name, e))?;
            // llama.cpp permutes Q/K only for the llama architecture (qwen2 uses NEOX RoPE).
            if arch == "llama" && t.rank() == 2 {
                if hf.ends_with("q_proj.weight") {
                    t = unpermute_qk(&t, n_head)?;
                } else if hf.ends_with("k_proj.weight") {
                    t = unpermute_qk(&t, n_kv)?;
                }
            }
            tensors.insert(hf, t);
        }
        let emb = tensors
            .get("model.embed_tokens.weight")
            .ok_or_else(|| ModelError::tensor(&file_name, "token_embd.weight", "missing"))?;
        let emb_rows = emb.dim(0)?;
        if emb_rows != config.vocab_size {
            // Padded embedding tables are common; the matrix is the source of truth.
            config.vocab_size = emb_rows;
        }
        if arch == "qwen2" {
            config.model_type = "qwen2".into();
        }
        Ok(Self {
            config,
            weights: BaseWeights::Tensors(tensors),
            tokenizer,
            source: path.to_path_buf(),
        })
    }

    /// A `VarBuilder` over the frozen base tensors (converted to `dtype` on `device`).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match &self.weights {
            BaseWeights::Safetensors(files) => {
                // SAFETY: see `from_hf_dir`.
                unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
                    .map_err(|e| ModelError::tensor(self.source.display(), "*", e))
            }
            BaseWeights::Tensors(t) => Ok(VarBuilder::from_tensors(t.clone(), dtype, device)),
        }
    }

    /// Builds the student: frozen base weights in `dtype`, plus LoRA adapters (created in, or
    /// reused from, `adapter.0`) when `adapter` is given.
    pub fn student(
        &self,
        adapter: Option<(&VarMap, LoraConfig)>,
        dtype: DType,
        device: &Device,
    ) -> Result<Student> {
        let vb = self.var_builder(dtype, device)?;
        let vb = match adapter {
            Some((varmap, cfg)) => LoraVarBuilder::with_lora(vb, varmap, cfg)?,
            None => LoraVarBuilder::base_only(vb),
        };
        Student::load(vb, &self.config)
    }

    /// Every base tensor under its Hugging Face name, in its stored dtype (f32 for GGUF).
    pub fn tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        match &self.weights {
            BaseWeights::Tensors(t) => Ok(t.clone()),
            BaseWeights::Safetensors(files) => {
                let mut out = HashMap::new();
                for f in files {
                    let loaded = candle_core::safetensors::load(f, device)
                        .map_err(|e| ModelError::tensor(f.display(), "*", e))?;
                    out.extend(loaded);
                }
                Ok(out)
            }
        }
    }

    /// Writes a standalone Hugging Face model directory: `config.json`, `model.safetensors`
    /// (adapters merged as `W + scale * B A` when given), `tokenizer.json` and
    /// `tokenizer_config.json` with the chat template. Floating-point tensors are cast to
    /// `dtype` when given, else kept as stored.
    pub fn save_merged(
        &self,
        dir: &Path,
        adapter: Option<(&LoraConfig, &VarMap)>,
        dtype: Option<DType>,
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let mut tensors = self.tensors(&Device::Cpu)?;
        if let Some((cfg, varmap)) = adapter {
            lora::merge_into(&mut tensors, varmap, cfg)?;
        }
        if let Some(dt) = dtype {
            for t in tensors.values_mut() {
                if t.dtype().is_float() {
                    *t = t.to_dtype(dt)?;
                }
            }
        }
        let saved_dtype = tensors
            .get("model.embed_tokens.weight")
            .map(|t| t.dtype())
            .unwrap_or(DType::F32);
        lora::save_safetensors(&tensors, &dir.join("model.safetensors"))?;
        let mut cfg = serde_json::to_value(&self.config).map_err(|e| ModelError::Json {
            path: dir.join("config.json"),
            source: e,
        })?;
        if let Some(obj) = cfg.as_object_mut() {
            obj.insert("architectures".into(), json!([self.config.architecture()]));
            obj.insert(
                "torch_dtype".into(),
                json!(match saved_dtype {
                    DType::BF16 => "bfloat16",
                    DType::F16 => "float16",
                    _ => "float32",
                }),
            );
            obj.entry("hidden_act").or_insert(json!("silu"));
            if obj.get("hidden_act") == Some(&Value::Null) {
                obj.insert("hidden_act".into(), json!("silu"));
            }
            for k in ["num_key_value_heads", "head_dim", "rope_scaling"] {
                if obj.get(k) == Some(&Value::Null) {
                    obj.remove(k);
                }
            }
        }
        write_json(&dir.join("config.json"), &cfg)?;
        self.tokenizer.save_hf(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(
            gguf_to_hf_name("blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            gguf_to_hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            gguf_to_hf_name("blk.3.attn_q.bias").as_deref(),
            Some("model.layers.3.self_attn.q_proj.bias")
        );
        assert_eq!(
            gguf_to_hf_name("output.weight").as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(gguf_to_hf_name("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn qk_permutation_roundtrip() -> Result<()> {
        let dev = Device::Cpu;
        let (n_head, hd, inp) = (3usize, 8usize, 5usize);
        let w =
            Tensor::arange(0f32, (n_head * hd * inp) as f32, &dev)?.reshape((n_head * hd, inp))?;
        let p = permute_qk(&w, n_head)?;
        // llama.cpp interleaves: row 1 of the GGUF head is row hd/2 of the HF head.
        assert_eq!(
            p.get(1)?.to_vec1::<f32>()?,
            w.get(hd / 2)?.to_vec1::<f32>()?
        );
        let back = unpermute_qk(&p, n_head)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }
}
