//! Depth pruning (`distill prune`): a smaller student cut from the teacher by keeping some of
//! its decoder layers, as Minitron does before recovering the cut model with distillation.
//!
//! The cut model keeps the teacher's embeddings, final norm, output projection and tokenizer,
//! so it shares the teacher's vocabulary and hidden size: response distillation and feature
//! matching on its layers need no projection.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::load::{BaseModel, BaseWeights};
use super::{ModelError, Result};

/// `count` layers of `total`, spread evenly and always including the first and the last (the
/// first layers build the token representations, the last map them to the output).
pub fn uniform_keep(total: usize, count: usize) -> Vec<usize> {
    let count = count.clamp(1, total.max(1));
    if count == 1 {
        return vec![total - 1];
    }
    let mut keep: Vec<usize> = (0..count)
        .map(|i| ((i * (total - 1)) as f64 / (count - 1) as f64).round() as usize)
        .collect();
    keep.dedup();
    keep
}

/// Parses `0-9,20,25-29` into sorted, distinct layer indices below `total`.
pub fn parse_layers(spec: &str, total: usize) -> std::result::Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{part}` is not a layer index or range (e.g. 0-9,20)"))
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if a > b || b >= total {
            return Err(format!(
                "`{part}`: layers must be ascending ranges within 0..{total}"
            ));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err("no layer kept".into());
    }
    Ok(out)
}

/// The model with only the decoder layers in `keep` (renumbered from 0, order kept).
pub fn prune(base: &BaseModel, keep: &[usize]) -> Result<BaseModel> {
    let total = base.config.num_hidden_layers;
    if keep.is_empty() || keep.iter().any(|&l| l >= total) || !keep.windows(2).all(|w| w[0] < w[1])
    {
        return Err(ModelError::Input(format!(
            "layers to keep {keep:?} must be ascending and below {total}"
        )));
    }
    let tensors = base.tensors(&Device::Cpu)?;
    let new_index: HashMap<usize, usize> = keep.iter().enumerate().map(|(i, &l)| (l, i)).collect();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in tensors {
        match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (idx, tail) = rest
                    .split_once('.')
                    .ok_or_else(|| ModelError::Input(format!("unexpected tensor name `{name}`")))?;
                let idx: usize = idx
                    .parse()
                    .map_err(|_| ModelError::Input(format!("unexpected tensor name `{name}`")))?;
                if let Some(&n) = new_index.get(&idx) {
                    out.insert(format!("model.layers.{n}.{tail}"), t);
                }
            }
            None => {
                out.insert(name, t);
            }
        }
    }
    let mut config = base.config.clone();
    config.num_hidden_layers = keep.len();
    Ok(BaseModel {
        config,
        weights: BaseWeights::Tensors(out),
        tokenizer: base.tokenizer.clone(),
        source: base.source.clone(),
    })
}

/// Cuts `model` down to the layers in `keep` and writes a Hugging Face directory to `out`, with
/// a model card naming the source, the layers kept and the source's licence.
pub fn prune_to_dir(model: &Path, keep: &[usize], out: &Path) -> Result<BaseModel> {
    let base = BaseModel::load(model, &Device::Cpu)?;
    let cut = prune(&base, keep)?;
    cut.save_merged(out, None, None)?;
    let licence = crate::teacher::licence::detect(model);
    let card = format!(
        "---\n{}tags:\n- distill\n- depth-pruned\n---\n\n# Depth-pruned model\n\n\
         Cut from `{}` by `distill prune`: {} of its {} decoder layers kept ({:?}); \
         embeddings, final norm, output projection and tokenizer unchanged.\n\n\
         Licence: the source model's ({}). Recover the cut model with distillation from the \
         source (`distill train --loss ce+kd --teacher …`).\n",
        licence
            .as_ref()
            .map(|l| format!("license: {l}\n"))
            .unwrap_or_default(),
        model.display(),
        keep.len(),
        base.config.num_hidden_layers,
        keep,
        licence.as_deref().unwrap_or("not found; check the source"),
    );
    let path = out.join("README.md");
    std::fs::write(&path, card).map_err(|e| ModelError::io(&path, e))?;
    Ok(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_keep_spans_first_to_last() {
        assert_eq!(uniform_keep(30, 4), vec![0, 10, 19, 29]);
        assert_eq!(uniform_keep(30, 30), (0..30).collect::<Vec<_>>());
        assert_eq!(uniform_keep(10, 1), vec![9]);
    }

    #[test]
    fn layer_specs_parse_and_fail_clearly() {
        assert_eq!(parse_layers("0-2,5, 7-7", 10), Ok(vec![0, 1, 2, 5, 7]));
        assert!(parse_layers("3-1", 10).is_err());
        assert!(parse_layers("0,10", 10).unwrap_err().contains("0..10"));
        assert!(parse_layers("a", 10).unwrap_err().contains("`a`"));
    }
}
