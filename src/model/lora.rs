//! LoRA linear layers and PEFT-compatible adapter files.
//!
//! A [`LoraLinear`] is `y = x W^T + b + scale * dropout(x) A^T B^T` where `W`/`b` are frozen
//! base tensors and `A` `(r, in)` / `B` `(out, r)` are trainable [`Var`]s. The adapters live in
//! a [`VarMap`] keyed by the names PEFT writes to `adapter_model.safetensors`
//! (`base_model.model.<module path>.lora_A.weight`), so saving the map *is* the PEFT export and
//! a PEFT adapter can be loaded back without renaming.

use super::{ModelError, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The modules PEFT can target in the supported families.
pub const ALL_TARGET_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Prefix PEFT puts in front of the base module path for causal LMs.
pub const PEFT_PREFIX: &str = "base_model.model";

/// File names of a PEFT adapter directory.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// See [`ADAPTER_WEIGHTS_FILE`].
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// LoRA hyper-parameters, mirroring PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of the update.
    pub r: usize,
    /// `lora_alpha`; the update is scaled by `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub alpha: f64,
    /// Dropout applied to the adapter input during training.
    pub dropout: f32,
    /// Rank-stabilised scaling (`use_rslora`).
    pub use_rslora: bool,
    /// PEFT module names to adapt (last path component, e.g. `q_proj`).
    pub target_modules: Vec<String>,
    /// Written to `base_model_name_or_path` so PEFT can find the base model.
    pub base_model_name_or_path: String,
}

impl Default for LoraConfig {
    /// r = 16, alpha = 32, no dropout, all attention and MLP projections.
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: ALL_TARGET_MODULES.iter().map(|s| s.to_string()).collect(),
            base_model_name_or_path: String::new(),
        }
    }
}

impl LoraConfig {
    /// Factor applied to `B A x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether a module with this name (last path component) gets an adapter.
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|t| t == module)
    }

    /// Rejects settings that would produce an adapter PEFT could not load.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(ModelError::field("lora config", "r", "must be > 0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::field(
                "lora config",
                "lora_dropout",
                format!("{} is not in [0, 1)", self.dropout),
            ));
        }
        if let Some(bad) = self
            .target_modules
            .iter()
            .find(|t| !ALL_TARGET_MODULES.contains(&t.as_str()))
        {
            return Err(ModelError::field(
                "lora config",
                "target_modules",
                format!("`{bad}` is not one of {ALL_TARGET_MODULES:?}"),
            ));
        }
        Ok(())
    }

    /// The `adapter_config.json` document PEFT expects.
    pub fn to_peft_json(&self) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": false,
        })
    }

    /// Parses an `adapter_config.json` document; `file` is used in error messages.
    pub fn from_peft_json(v: &Value, file: &str) -> Result<Self> {
        let field = |name: &str| v.get(name).filter(|x| !x.is_null());
        match field("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(ModelError::field(
                    file,
                    "peft_type",
                    format!("expected \"LORA\", got {other:?}"),
                ))
            }
        }
        for unsupported in ["rank_pattern", "alpha_pattern"] {
            if let Some(obj) = field(unsupported).and_then(Value::as_object) {
                if !obj.is_empty() {
                    return Err(ModelError::field(
                        file,
                        unsupported,
                        "non-empty is unsupported",
                    ));
                }
            }
        }
        if field("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(ModelError::field(file, "use_dora", "DoRA is unsupported"));
        }
        if field("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
            return Err(ModelError::field(file, "fan_in_fan_out", "must be false"));
        }
        let r = field("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| ModelError::field(file, "r", "missing or not an integer"))?
            as usize;
        let alpha = field("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| ModelError::field(file, "lora_alpha", "missing or not a number"))?;
        let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
        let use_rslora = field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let target_modules = match field("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|m| {
                    m.as_str().map(str::to_string).ok_or_else(|| {
                        ModelError::field(file, "target_modules", "entries must be strings")
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(Value::String(s)) if s == "all-linear" => {
                ALL_TARGET_MODULES.iter().map(|s| s.to_string()).collect()
            }
            Some(other) => {
                return Err(ModelError::field(
                    file,
                    "target_modules",
                    format!("expected a list of module names, got {other}"),
                ))
            }
            None => return Err(ModelError::field(file, "target_modules", "missing")),
        };
        let cfg = Self {
            r,
            alpha,
            dropout,
            use_rslora,
            target_modules,
            base_model_name_or_path: field("base_model_name_or_path")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// PEFT names of the adapter tensors of the module at `module_path`
/// (e.g. `model.layers.0.self_attn.q_proj`): `(lora_A, lora_B)`.
pub fn peft_names(module_path: &str) -> (String, String) {
    (
        format!("{PEFT_PREFIX}.{module_path}.lora_A.weight"),
        format!("{PEFT_PREFIX}.{module_path}.lora_B.weight"),
    )
}

#[derive(Clone)]
struct AdapterVb<'a> {
    vb: VarBuilder<'a>,
    cfg: Arc<LoraConfig>,
}

/// Walks the base checkpoint and the adapter `VarMap` down the module tree in lock-step.
///
/// `pp("model")` on this builder moves both the base prefix (`model`) and the adapter prefix
/// (`base_model.model.model`), so each [`LoraLinear`] finds its base weight and its PEFT-named
/// adapters from the same relative path.
#[derive(Clone)]
pub struct LoraVarBuilder<'a> {
    base: VarBuilder<'a>,
    adapter: Option<AdapterVb<'a>>,
}

impl<'a> LoraVarBuilder<'a> {
    /// Base weights only: every linear layer is a plain frozen projection.
    pub fn base_only(base: VarBuilder<'a>) -> Self {
        Self {
            base,
            adapter: None,
        }
    }

    /// Base weights plus adapters for `cfg.target_modules`, created in `varmap` (A
    /// Kaiming-uniform, B zero, as PEFT initialises them) or reused if already present (e.g.
    /// after [`load_adapter`]). The adapters take the dtype and device of `base`.
    pub fn with_lora(base: VarBuilder<'a>, varmap: &VarMap, cfg: LoraConfig) -> Result<Self> {
        cfg.validate()?;
        let vb = VarBuilder::from_varmap(varmap, base.dtype(), base.device())
            .pp("base_model")
            .pp("model");
        Ok(Self {
            base,
            adapter: Some(AdapterVb {
                vb,
                cfg: Arc::new(cfg),
            }),
        })
    }

    /// Descends into sub-module `s` on both sides.
    pub fn pp<S: ToString>(&self, s: S) -> Self {
        let s = s.to_string();
        Self {
            base: self.base.pp(&s),
            adapter: self.adapter.as_ref().map(|a| AdapterVb {
                vb: a.vb.pp(&s),
                cfg: a.cfg.clone(),
            }),
        }
    }

    /// The base-side builder (checkpoint tensors).
    pub fn base(&self) -> &VarBuilder<'a> {
        &self.base
    }

    /// The LoRA configuration, if adapters are attached.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.adapter.as_ref().map(|a| a.cfg.as_ref())
    }

    /// Device of the base weights.
    pub fn device(&self) -> &Device {
        self.base.device()
    }

    /// Whether the base checkpoint holds `name` under the current prefix.
    pub fn base_contains(&self, name: &str) -> bool {
        self.base.contains_tensor(name)
    }

    /// Reads a frozen base tensor, with the full tensor name in the error message.
    pub fn base_get<S: Into<candle_core::Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        self.base
            .get(shape, name)
            .map_err(|e| ModelError::tensor("base checkpoint", self.full_name(name), e))
    }

    fn full_name(&self, name: &str) -> String {
        let p = self.base.prefix();
        if p.is_empty() {
            name.to_string()
        } else {
            format!("{p}.{name}")
        }
    }
}

/// Trainable low-rank update attached to a linear layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `(r, in)`, a `Var` of the adapter `VarMap`.
    pub lora_a: Tensor,
    /// `(out, r)`, a `Var` of the adapter `VarMap`.
    pub lora_b: Tensor,
    /// `alpha / r` or `alpha / sqrt(r)`.
    pub scale: f64,
    /// Dropout probability on the adapter input (training only).
    pub dropout: f32,
}

/// Linear layer with a frozen base weight and an optional LoRA update.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

impl LoraLinear {
    /// Loads `weight` `(out, in)` (and `bias` `(out,)` when `bias`) under `vb`, attaching an
    /// adapter when `vb` carries a LoRA config targeting this module's name.
    pub fn load(in_dim: usize, out_dim: usize, bias: bool, vb: LoraVarBuilder) -> Result<Self> {
        let weight = vb.base_get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.base_get(out_dim, "bias")?)
        } else {
            None
        };
        let module = vb.base.prefix();
        let name = module.rsplit('.').next().unwrap_or_default().to_string();
        let lora = match &vb.adapter {
            Some(a) if a.cfg.targets(&name) => {
                let r = a.cfg.r;
                let bound = 1.0 / (in_dim as f64).sqrt();
                let err = |e: candle_core::Error| {
                    ModelError::tensor("adapter", format!("{PEFT_PREFIX}.{module}"), e)
                };
                let lora_a =
                    a.vb.pp("lora_A")
                        .get_with_hints(
                            (r, in_dim),
                            "weight",
                            Init::Uniform {
                                lo: -bound,
                                up: bound,
                            },
                        )
                        .map_err(err)?;
                let lora_b =
                    a.vb.pp("lora_B")
                        .get_with_hints((out_dim, r), "weight", Init::Const(0.0))
                        .map_err(err)?;
                Some(LoraAdapter {
                    lora_a,
                    lora_b,
                    scale: a.cfg.scale(),
                    dropout: a.cfg.dropout,
                })
            }
            _ => None,
        };
        Ok(Self { weight, bias, lora })
    }

    /// Wraps existing tensors (no adapter).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    /// The frozen base weight `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The adapter, if any.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    /// Turns the weight (and bias) into trainable variables, for full-parameter training,
    /// and adds them to `vars` as `{module}.weight` / `{module}.bias`.
    pub fn make_trainable(
        &mut self,
        module: &str,
        vars: &mut std::collections::BTreeMap<String, Var>,
    ) -> Result<()> {
        make_var(&mut self.weight, format!("{module}.weight"), vars)?;
        if let Some(b) = &mut self.bias {
            make_var(b, format!("{module}.bias"), vars)?;
        }
        Ok(())
    }

    /// `x W^T + b + scale * dropout(x) A^T B^T` over the last dimension of `xs`, with
    /// candle's own operations. (In training on f32 CPU tensors the decoder layer runs the
    /// projections in its fused node instead; this path serves other dtypes and devices.)
    pub fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut dims = xs.dims().to_vec();
        let in_dim = *dims
            .last()
            .ok_or_else(|| ModelError::Input("linear input is a scalar".into()))?;
        let x2 = xs.reshape((xs.elem_count() / in_dim.max(1), in_dim))?;
        // A frozen base weight is detached: its gradient is never needed.
        let w = if self.weight.is_variable() {
            self.weight.clone()
        } else {
            self.weight.detach()
        };
        let mut y = x2.matmul(&w.t()?)?;
        if let Some(l) = &self.lora {
            let xa = if train && l.dropout > 0.0 {
                dropout(&x2, l.dropout)?
            } else {
                x2.clone()
            };
            let delta = (xa.matmul(&l.lora_a.t()?)? * l.scale)?.matmul(&l.lora_b.t()?)?;
            y = (y + delta)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(last) = dims.last_mut() {
            *last = self.weight.dim(0)?;
        }
        Ok(y.reshape(dims)?)
    }
}

/// Replaces `t` with a trainable variable holding its values, registered in `vars` as `name`
/// (full-parameter training).
pub(crate) fn make_var(
    t: &mut Tensor,
    name: String,
    vars: &mut std::collections::BTreeMap<String, Var>,
) -> Result<()> {
    let var = Var::from_tensor(t)?;
    *t = var.as_tensor().clone();
    vars.insert(name, var);
    Ok(())
}

fn safetensors_metadata() -> Option<HashMap<String, String>> {
    Some(HashMap::from([("format".to_string(), "pt".to_string())]))
}

/// Writes tensors to a `.safetensors` file with the `{"format": "pt"}` metadata that
/// `transformers`/`peft` check for.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let contiguous = sorted
        .into_iter()
        .map(|(k, v)| Ok((k.clone(), v.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize_to_file(contiguous, safetensors_metadata(), path)
        .map_err(|e| ModelError::tensor(path.display(), "*", e))
}

/// Copy of the adapter tensors currently in `varmap`, keyed by PEFT name (later optimizer
/// steps do not change the returned tensors).
pub fn adapter_tensors(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| ModelError::Input("adapter VarMap lock poisoned".into()))?;
    data.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
        .collect()
}

/// Saves the adapters as a PEFT directory: `adapter_model.safetensors` (f32, PEFT names) and
/// `adapter_config.json`.
pub fn save_adapter(dir: &Path, varmap: &VarMap, cfg: &LoraConfig) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let tensors = adapter_tensors(varmap)?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    save_safetensors(&tensors, &dir.join(ADAPTER_WEIGHTS_FILE))?;
    let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
    let text = serde_json::to_string_pretty(&cfg.to_peft_json()).map_err(|e| ModelError::Json {
        path: cfg_path.clone(),
        source: e,
    })?;
    std::fs::write(&cfg_path, text).map_err(|e| ModelError::io(&cfg_path, e))
}

/// Loads a PEFT adapter directory into a fresh `VarMap` whose variables keep the PEFT names;
/// passing it to [`LoraVarBuilder::with_lora`] reuses them instead of initialising new ones.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<(LoraConfig, VarMap)> {
    let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: cfg_path.clone(),
        source: e,
    })?;
    let cfg = LoraConfig::from_peft_json(&v, &cfg_path.display().to_string())?;
    let w_path = dir.join(ADAPTER_WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&w_path, device)
        .map_err(|e| ModelError::tensor(w_path.display(), "*", e))?;
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| ModelError::Input("adapter VarMap lock poisoned".into()))?;
        for (name, t) in tensors {
            // PEFT may store the adapter name (`lora_A.default.weight`) in older files.
            let name = name
                .replace(".lora_A.default.", ".lora_A.")
                .replace(".lora_B.default.", ".lora_B.");
            if !name.starts_with(PEFT_PREFIX)
                || !(name.contains(".lora_A.") || name.contains(".lora_B."))
            {
                return Err(ModelError::tensor(
                    w_path.display(),
                    name,
                    "not a LoRA A/B tensor (modules_to_save/bias are unsupported)",
                ));
            }
            let shape = t.dims().to_vec();
            let rank_dim = if name.contains(".lora_A.") { 0 } else { 1 };
            if shape.len() != 2 || shape[rank_dim] != cfg.r {
                return Err(ModelError::tensor(
                    w_path.display(),
                    name,
                    format!("shape {shape:?} does not match r = {}", cfg.r),
                ));
            }
            data.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
    }
    Ok((cfg, varmap))
}

/// Merges the adapters in `varmap` into base tensors named with Hugging Face names
/// (`model.layers.0.self_attn.q_proj.weight`): `W <- W + scale * B A`, computed in f32 and
/// cast back to `W`'s dtype. Returns how many weights were changed; errors if an adapter has
/// no matching base weight.
pub fn merge_into(
    tensors: &mut HashMap<String, Tensor>,
    varmap: &VarMap,
    cfg: &LoraConfig,
) -> Result<usize> {
    let adapters = adapter_tensors(varmap)?;
    let scale = cfg.scale();
    let mut merged = 0;
    for (a_name, a) in &adapters {
        let Some(module) = a_name
            .strip_prefix(&format!("{PEFT_PREFIX}."))
            .and_then(|n| n.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let (_, b_name) = peft_names(module);
        let b = adapters
            .get(&b_name)
            .ok_or_else(|| ModelError::tensor("adapter", &b_name, "missing (lora_A present)"))?;
        let w_name = format!("{module}.weight");
        let w = tensors.get(&w_name).ok_or_else(|| {
            ModelError::tensor("base checkpoint", &w_name, "missing for adapter merge")
        })?;
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
        if delta.dims() != w.dims() {
            return Err(ModelError::tensor(
                "base checkpoint",
                &w_name,
                format!("shape {:?} != adapter update {:?}", w.dims(), delta.dims()),
            ));
        }
        let new_w = (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
        tensors.insert(w_name, new_w);
        merged += 1;
    }
    Ok(merged)
}

thread_local! {
    /// Dropout mask stream of this thread: `(seed, calls so far)`. Every dropout call takes
    /// the next key of the stream; a trainer reseeds it before each forward pass.
    static DROPOUT_STREAM: std::cell::Cell<Option<(u64, u64)>> =
        const { std::cell::Cell::new(None) };
}

/// Seeds the stream that LoRA dropout masks are drawn from on the calling thread (`None`: a
/// random seed on first use). A trainer seeds it from (run seed, step, micro-batch) before
/// each forward pass, so a resumed run draws exactly the masks an uninterrupted one would have.
pub fn seed_dropout(seed: Option<u64>) {
    DROPOUT_STREAM.with(|s| s.set(seed.map(|seed| (seed, 0))));
}

/// The key of the next dropout call on this thread. Calls are keyed in the order the
/// adapted projections run (q, k, v, o, gate, up, down per layer), so the fused layer and the
/// per-op path draw the same masks.
pub(crate) fn next_dropout_key() -> u64 {
    DROPOUT_STREAM.with(|s| {
        let (seed, n) = s.get().unwrap_or_else(|| (rand::random(), 0));
        s.set(Some((seed, n + 1)));
        splitmix64(seed ^ splitmix64(n))
    })
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One dropout call's mask as a function of the element index: a 32-bit hash of (key,
/// index) against the drop probability. Any element can be recomputed on its own, so a
/// backward pass regenerates the mask instead of keeping it, and masks fill in parallel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropoutMask {
    k0: u32,
    k1: u32,
    /// Elements whose hash is below this are dropped (`p * 2^32`).
    threshold: u32,
    /// `1 / (1 - p)`, the scale of kept elements.
    keep_scale: f32,
}

impl DropoutMask {
    /// The mask of the call with `key`, dropping with probability `p` in `[0, 1)`.
    pub fn new(key: u64, p: f32) -> Self {
        Self {
            k0: key as u32,
            k1: (key >> 32) as u32,
            threshold: (f64::from(p) * 4_294_967_296.0).min(u32::MAX as f64) as u32,
            keep_scale: 1.0 / (1.0 - p),
        }
    }

    /// `keep_scale` for a kept element `i`, 0 for a dropped one. murmur3's finaliser over
    /// the index mixed with the key: 32-bit integer steps that vectorize.
    #[cfg(test)]
    fn scale(&self, i: usize) -> f32 {
        self.scale32(i as u32)
    }

    /// [`Self::scale`] of elements `start..start + out.len()`, written to `out`: a plain
    /// counted loop over 32-bit lanes, which the compiler vectorizes (indices wrap at 2^32,
    /// as in `scale`).
    pub fn fill(&self, start: usize, out: &mut [f32]) {
        let base = start as u32;
        for (j, o) in out.iter_mut().enumerate() {
            *o = self.scale32(base.wrapping_add(j as u32));
        }
    }

    #[inline(always)]
    fn scale32(&self, i: u32) -> f32 {
        let mut h = (i ^ self.k0)
            .wrapping_mul(0x9E37_79B1)
            .wrapping_add(self.k1);
        h ^= h >> 16;
        h = h.wrapping_mul(0x85EB_CA6B);
        h ^= h >> 13;
        h = h.wrapping_mul(0xC2B2_AE35);
        h ^= h >> 16;
        if h >= self.threshold {
            self.keep_scale
        } else {
            0.0
        }
    }
}

/// Inverted dropout with probability `p`, the mask from this thread's stream.
fn dropout(x: &Tensor, p: f32) -> Result<Tensor> {
    let mask = DropoutMask::new(next_dropout_key(), p);
    let mut m = vec![0f32; x.elem_count()];
    mask.fill(0, &mut m);
    let m = Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * m)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Masks keep about `1 - p` of the elements, differ from call to call, and repeat
    /// exactly when the stream is reseeded.
    #[test]
    fn dropout_masks_have_the_rate_and_repeat_with_the_seed() {
        let n = 1 << 20;
        seed_dropout(Some(7));
        let (k1, k2) = (next_dropout_key(), next_dropout_key());
        seed_dropout(Some(7));
        assert_eq!(next_dropout_key(), k1);
        let (a, b) = (DropoutMask::new(k1, 0.1), DropoutMask::new(k2, 0.1));
        let kept = (0..n).filter(|&i| a.scale(i) > 0.0).count();
        let rate = kept as f64 / n as f64;
        assert!((rate - 0.9).abs() < 0.003, "kept {rate}");
        assert!(a.scale(0) == 0.0 || a.scale(0) == 1.0 / 0.9);
        let both = (0..n)
            .filter(|&i| a.scale(i) > 0.0 && b.scale(i) > 0.0)
            .count();
        let joint = both as f64 / n as f64;
        assert!((joint - 0.81).abs() < 0.003, "masks correlate: {joint}");
        // Neighbouring elements are independent too.
        let pairs = (0..n - 1)
            .filter(|&i| a.scale(i) > 0.0 && a.scale(i + 1) > 0.0)
            .count();
        assert!((pairs as f64 / n as f64 - 0.81).abs() < 0.003);
        assert!((0..1000).all(|i| DropoutMask::new(k1, 0.0).scale(i) == 1.0));
        let mut block = vec![0f32; 1000];
        a.fill(12_345, &mut block);
        assert!(block
            .iter()
            .enumerate()
            .all(|(j, v)| *v == a.scale(12_345 + j)));
    }

    #[test]
    fn scale_follows_rslora() {
        let mut c = LoraConfig {
            r: 16,
            alpha: 32.0,
            ..Default::default()
        };
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scale(), 8.0);
    }

    #[test]
    fn peft_json_roundtrip() {
        let c = LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            use_rslora: true,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            base_model_name_or_path: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        };
        let v = c.to_peft_json();
        assert_eq!(v["peft_type"], "LORA");
        assert_eq!(v["bias"], "none");
        assert_eq!(v["task_type"], "CAUSAL_LM");
        let back = LoraConfig::from_peft_json(&v, "x").unwrap();
        assert_eq!(back, c);
        let mut bad = v.clone();
        bad["target_modules"] = json!(["lm_head"]);
        assert!(LoraConfig::from_peft_json(&bad, "x").is_err());
    }

    #[test]
    fn lora_linear_b_zero_is_identity() -> Result<()> {
        let dev = Device::Cpu;
        let mut base = HashMap::new();
        base.insert(
            "proj.q_proj.weight".to_string(),
            Tensor::randn(0f32, 1., (6, 4), &dev)?,
        );
        let vb = VarBuilder::from_tensors(base, DType::F32, &dev);
        let varmap = VarMap::new();
        let lvb = LoraVarBuilder::with_lora(vb.clone(), &varmap, LoraConfig::default())?;
        let with = LoraLinear::load(4, 6, false, lvb.pp("proj").pp("q_proj"))?;
        let without = LoraLinear::load(
            4,
            6,
            false,
            LoraVarBuilder::base_only(vb).pp("proj").pp("q_proj"),
        )?;
        let x = Tensor::randn(0f32, 1., (2, 3, 4), &dev)?;
        let a = with.forward(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
        let b = without
            .forward(&x, false)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(a, b);
        let names: Vec<String> = adapter_tensors(&varmap)?.into_keys().collect();
        assert!(names.contains(&"base_model.model.proj.q_proj.lora_A.weight".to_string()));
        let la = with
            .adapter()
            .map(|l| l.lora_a.flatten_all().and_then(|t| t.to_vec1::<f32>()));
        let la = la.unwrap_or_else(|| Ok(vec![]))?;
        assert!(la.iter().all(|v| v.abs() <= 0.5 + 1e-6));
        Ok(())
    }
}
