//! AdamW over the LoRA variables, with state that can be saved and restored exactly.
//!
//! `candle_nn::AdamW` keeps its moments private, so a resumed run could not continue where the
//! first one stopped. This implementation follows `torch.optim.AdamW` (decoupled weight decay,
//! bias correction), keeps its moments in f32 whatever the adapter dtype, and writes them to
//! safetensors next to the adapter. Gradient accumulation and global-norm clipping live here
//! too so the training loop only calls [`GradAccumulator::add`] and [`AdamW::step`].

use super::TrainError;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// AdamW hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// `beta1`.
    pub beta1: f64,
    /// `beta2`.
    pub beta2: f64,
    /// `eps`.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    vars: BTreeMap<String, Var>,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
    step: usize,
    params: AdamWParams,
}

impl AdamW {
    /// Starts with zero moments for every variable.
    pub fn new(vars: BTreeMap<String, Var>, params: AdamWParams) -> Result<Self, TrainError> {
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (name, var) in &vars {
            let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            m.insert(name.clone(), z.clone());
            v.insert(name.clone(), z);
        }
        Ok(Self {
            vars,
            m,
            v,
            step: 0,
            params,
        })
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The optimised variables by name.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// One update with learning rate `lr` from (already clipped) gradients by name.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<(), TrainError> {
        self.step += 1;
        let t = self.step as i32;
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        for (name, var) in &self.vars {
            let Some(g) = grads.get(name) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            let (Some(m), Some(v)) = (self.m.get(name), self.v.get(name)) else {
                continue;
            };
            let m = ((m * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let p = var.as_tensor().to_dtype(DType::F32)?;
            let p = (p * (1.0 - lr * weight_decay))?;
            let denom = ((&v / bc2)?.sqrt()? + eps)?;
            let update = ((&m / bc1)? / denom)?;
            let p = (p - (update * lr)?)?;
            var.set(&p.to_dtype(var.dtype())?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// Writes the moments (`m.<name>`, `v.<name>`) and the step count to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut tensors = HashMap::new();
        for (k, t) in &self.m {
            tensors.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            tensors.insert(format!("v.{k}"), t.clone());
        }
        let mut sorted: Vec<(String, Tensor)> = tensors.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let meta = HashMap::from([("step".to_string(), self.step.to_string())]);
        safetensors::tensor::serialize_to_file(sorted, Some(meta), path).map_err(|e| {
            TrainError::Checkpoint {
                path: path.to_path_buf(),
                msg: e.to_string(),
            }
        })
    }

    /// Restores moments and step count written by [`AdamW::save`]; every variable must have
    /// its moments, with matching shapes.
    pub fn load(&mut self, path: &Path, device: &Device) -> Result<(), TrainError> {
        let bad = |msg: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let step = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| bad("metadata `step` missing".into()))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
        for (name, var) in &self.vars {
            for (prefix, store) in [("m", &mut self.m), ("v", &mut self.v)] {
                let key = format!("{prefix}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| bad(format!("tensor `{key}` missing")))?;
                if t.dims() != var.dims() {
                    return Err(bad(format!(
                        "tensor `{key}` has shape {:?}, the adapter {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                store.insert(name.clone(), t.to_dtype(DType::F32)?);
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warmup to the peak, then cosine decay towards `min_ratio * peak`.
///
/// Steps are 1-based: warmup step `k` uses `peak * k / warmup` (no wasted step at lr 0), the
/// first step after warmup uses the peak, and the decay is evaluated at the start of each
/// step, so the last step still has a non-zero learning rate when `min_ratio` is 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
    /// Final learning rate as a fraction of the peak.
    pub min_ratio: f64,
}

impl Schedule {
    /// Learning rate of optimizer step `step` (1-based).
    pub fn lr(&self, step: usize) -> f64 {
        if self.warmup > 0 && step <= self.warmup {
            return self.peak * step as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let done = step.saturating_sub(self.warmup + 1) as f64;
        let progress = (done / span).clamp(0.0, 1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cos)
    }
}

/// Sums gradients over the micro-batches of one optimizer step.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    grads: HashMap<String, Tensor>,
}

impl GradAccumulator {
    /// Adds the gradients of `vars` found in `store` (variables without one are skipped).
    pub fn add(
        &mut self,
        vars: &BTreeMap<String, Var>,
        store: &GradStore,
    ) -> Result<(), TrainError> {
        for (name, var) in vars {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                let sum = match self.grads.remove(name) {
                    Some(acc) => (acc + g)?,
                    None => g,
                };
                self.grads.insert(name.clone(), sum);
            }
        }
        Ok(())
    }

    /// Global L2 norm of the accumulated gradients.
    pub fn norm(&self) -> Result<f64, TrainError> {
        let mut names: Vec<&String> = self.grads.keys().collect();
        names.sort();
        let mut total = 0f64;
        for n in names {
            total += f64::from(self.grads[n].sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        Ok(total.sqrt())
    }

    /// Scales the gradients so their global norm is at most `max_norm` (as
    /// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
    pub fn clip(&mut self, max_norm: f64) -> Result<f64, TrainError> {
        let norm = self.norm()?;
        if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for g in self.grads.values_mut() {
                *g = (&*g * scale)?;
            }
        }
        Ok(norm)
    }

    /// Hands the gradients over, leaving the accumulator empty for the next step.
    pub fn take(&mut self) -> HashMap<String, Tensor> {
        std::mem::take(&mut self.grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_and_decays() {
        let s = Schedule {
            peak: 1.0,
            warmup: 10,
            total: 110,
            min_ratio: 0.1,
        };
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(11) - 1.0).abs() < 1e-12);
        assert!((s.lr(61) - 0.55).abs() < 1e-12);
        assert!(s.lr(110) > 0.1 && s.lr(110) < 0.101);
        assert!((s.lr(111) - 0.1).abs() < 1e-12);
        let no_warmup = Schedule {
            warmup: 0,
            min_ratio: 0.0,
            total: 2,
            ..s
        };
        assert_eq!(no_warmup.lr(1), 1.0);
        assert!((no_warmup.lr(2) - 0.5).abs() < 1e-12);
    }

    /// One step against the closed form of torch.optim.AdamW.
    #[test]
    fn adamw_matches_torch_formula() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f32, -2.0], &dev)?;
        let vars = BTreeMap::from([("w".to_string(), var.clone())]);
        let p = AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(vars, p)?;
        let g = HashMap::from([("w".to_string(), Tensor::new(&[0.5f32, 0.25], &dev)?)]);
        opt.step(&g, 0.01)?;
        // First step: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (up to eps).
        let got = var.as_tensor().to_vec1::<f32>()?;
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) - 0.01];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        let dir = tempfile::tempdir().map_err(|e| TrainError::io("tempdir", e))?;
        let path = dir.path().join("opt.safetensors");
        opt.save(&path)?;
        let vars2 = BTreeMap::from([("w".to_string(), Var::new(&[0f32, 0.0], &dev)?)]);
        let mut opt2 = AdamW::new(vars2, p)?;
        opt2.load(&path, &dev)?;
        assert_eq!(opt2.step_count(), 1);
        assert_eq!(opt2.m["w"].to_vec1::<f32>()?, opt.m["w"].to_vec1::<f32>()?);
        Ok(())
    }
}
