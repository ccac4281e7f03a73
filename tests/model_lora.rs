//! Student model + LoRA integration tests on tiny random models (both families) and, when the
//! file is present, on the SmolLM2-135M-Instruct GGUF checkpoint.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use distill::model::load::BaseModel;
use distill::model::lora::{self, LoraConfig, LoraVarBuilder};
use distill::model::tokenizer::ChatMessage;
use distill::model::{Config, ForwardOptions, Packing, Student};
use std::collections::HashMap;
use std::path::Path;

mod common;

type R<T> = Result<T, Box<dyn std::error::Error>>;

const VOCAB: usize = 32;
const HIDDEN: usize = 16;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FFN: usize = 32;
const LAYERS: usize = 2;

fn tiny_config(model_type: &str, tied: bool) -> Config {
    serde_json::from_value(serde_json::json!({
        "model_type": model_type,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "vocab_size": VOCAB,
        "tie_word_embeddings": tied,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    }))
    .expect("tiny config")
}

/// Random base tensors with Hugging Face names.
fn tiny_weights(cfg: &Config, dev: &Device) -> R<HashMap<String, Tensor>> {
    let hd = cfg.head_dim();
    let qwen = cfg.model_type == "qwen2";
    let mut t = HashMap::new();
    // Norm weights near 1 and unit-scale embeddings, as in trained checkpoints; projections
    // small so the residual stream stays well conditioned.
    let mut put = |name: String, shape: &[usize]| -> R<()> {
        let v = if name.ends_with("norm.weight") {
            (Tensor::randn(0f32, 0.1, shape, dev)? + 1.0)?
        } else if name.contains("embed_tokens") || name.starts_with("lm_head") {
            Tensor::randn(0f32, 1.0, shape, dev)?
        } else {
            Tensor::randn(0f32, 0.3, shape, dev)?
        };
        t.insert(name, v);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN])?;
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[VOCAB, HIDDEN])?;
    }
    put("model.norm.weight".into(), &[HIDDEN])?;
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[HEADS * hd, HIDDEN],
        )?;
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[KV_HEADS * hd, HIDDEN],
        )?;
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[KV_HEADS * hd, HIDDEN],
        )?;
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[HIDDEN, HEADS * hd],
        )?;
        if qwen {
            put(format!("{p}.self_attn.q_proj.bias"), &[HEADS * hd])?;
            put(format!("{p}.self_attn.k_proj.bias"), &[KV_HEADS * hd])?;
            put(format!("{p}.self_attn.v_proj.bias"), &[KV_HEADS * hd])?;
        }
        put(format!("{p}.mlp.gate_proj.weight"), &[FFN, HIDDEN])?;
        put(format!("{p}.mlp.up_proj.weight"), &[FFN, HIDDEN])?;
        put(format!("{p}.mlp.down_proj.weight"), &[HIDDEN, FFN])?;
        put(format!("{p}.input_layernorm.weight"), &[HIDDEN])?;
        put(format!("{p}.post_attention_layernorm.weight"), &[HIDDEN])?;
    }
    Ok(t)
}

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target_modules: lora::ALL_TARGET_MODULES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        base_model_name_or_path: "tiny".into(),
    }
}

fn build(
    w: &HashMap<String, Tensor>,
    cfg: &Config,
    adapter: Option<(&VarMap, LoraConfig)>,
) -> R<Student> {
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let vb = match adapter {
        Some((vm, lc)) => LoraVarBuilder::with_lora(vb, vm, lc)?,
        None => LoraVarBuilder::base_only(vb),
    };
    Ok(Student::load(vb, cfg)?)
}

fn ids(v: &[u32]) -> R<Tensor> {
    Ok(Tensor::new(v, &Device::Cpu)?.unsqueeze(0)?)
}

fn logits(m: &Student, tokens: &[u32]) -> R<Vec<Vec<f32>>> {
    let p = Packing::causal(1, tokens.len(), &Device::Cpu)?;
    let out = m.forward(&ids(tokens)?, &p, &ForwardOptions::default())?;
    Ok(m.logits(&out.hidden)?.squeeze(0)?.to_vec2::<f32>()?)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Replaces every `lora_B` with random values so the adapter has an effect.
fn randomize_b(vm: &VarMap) -> R<()> {
    let data = vm.data().lock().map_err(|_| "poisoned")?;
    for (name, var) in data.iter() {
        if name.contains(".lora_B.") {
            var.set(&Tensor::randn(0f32, 0.2, var.shape(), &Device::Cpu)?)?;
        }
    }
    Ok(())
}

const TOKENS: [u32; 7] = [3, 17, 5, 9, 31, 0, 12];

#[test]
fn forward_shapes_both_families() -> R<()> {
    for (mt, tied) in [
        ("llama", true),
        ("llama", false),
        ("qwen2", true),
        ("mistral", false),
    ] {
        let cfg = tiny_config(mt, tied);
        let w = tiny_weights(&cfg, &Device::Cpu)?;
        let m = build(&w, &cfg, None)?;
        let family = if mt == "qwen2" {
            distill::model::Family::Qwen2
        } else {
            distill::model::Family::Llama
        };
        assert_eq!(m.config().family()?, family);
        assert_eq!(
            m.kernels(),
            distill::model::Kernels::Fused,
            "f32 on the CPU"
        );
        assert_eq!(m.config().tie_word_embeddings, tied, "{mt}");
        let input = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 7, 8, 9, 10]], &Device::Cpu)?;
        let p = Packing::causal(2, 5, &Device::Cpu)?;
        let opts = ForwardOptions {
            train: false,
            output_layers: vec![1, 0],
        };
        let out = m.forward(&input, &p, &opts)?;
        assert_eq!(out.hidden.dims(), &[2, 5, HIDDEN]);
        assert_eq!(out.layers.len(), 2);
        assert_eq!(out.layers[0].0, 1);
        assert_eq!(out.layers[1].1.dims(), &[2, 5, HIDDEN]);
        let rows = Tensor::new(&[0u32, 4, 9], &Device::Cpu)?;
        let l = m.logits_at(&out.hidden, &rows)?;
        assert_eq!(l.dims(), &[3, VOCAB]);
        // Row 9 is batch 1, position 4: same as the full logits there.
        let full = m.logits(&out.hidden)?;
        assert_eq!(full.dims(), &[2, 5, VOCAB]);
        let a = l.get(2)?.to_vec1::<f32>()?;
        let b = full.get(1)?.get(4)?.to_vec1::<f32>()?;
        assert!(max_diff(&[a], &[b]) < 1e-5);
    }
    Ok(())
}

#[test]
fn lora_zero_b_matches_base_then_changes() -> R<()> {
    for mt in ["llama", "qwen2"] {
        let cfg = tiny_config(mt, false);
        let w = tiny_weights(&cfg, &Device::Cpu)?;
        let base = logits(&build(&w, &cfg, None)?, &TOKENS)?;
        let vm = VarMap::new();
        let m = build(&w, &cfg, Some((&vm, lora_cfg())))?;
        assert_eq!(logits(&m, &TOKENS)?, base, "{mt}: B = 0 must be exact");
        randomize_b(&vm)?;
        let changed = logits(&m, &TOKENS)?;
        assert!(
            max_diff(&changed, &base) > 1e-3,
            "{mt}: adapter has no effect"
        );
    }
    Ok(())
}

#[test]
fn adapter_names_and_shapes_follow_peft() -> R<()> {
    let cfg = tiny_config("llama", true);
    let w = tiny_weights(&cfg, &Device::Cpu)?;
    let vm = VarMap::new();
    let mut lc = lora_cfg();
    lc.target_modules = vec!["q_proj".into(), "v_proj".into(), "down_proj".into()];
    build(&w, &cfg, Some((&vm, lc)))?;
    let t = lora::adapter_tensors(&vm)?;
    assert_eq!(t.len(), LAYERS * 3 * 2);
    let hd = cfg.head_dim();
    for i in 0..LAYERS {
        let p = format!("base_model.model.model.layers.{i}");
        let shape = |n: String| t.get(&n).map(|x| x.dims().to_vec());
        assert_eq!(
            shape(format!("{p}.self_attn.q_proj.lora_A.weight")),
            Some(vec![4, HIDDEN])
        );
        assert_eq!(
            shape(format!("{p}.self_attn.q_proj.lora_B.weight")),
            Some(vec![HEADS * hd, 4])
        );
        assert_eq!(
            shape(format!("{p}.self_attn.v_proj.lora_B.weight")),
            Some(vec![KV_HEADS * hd, 4])
        );
        assert_eq!(
            shape(format!("{p}.mlp.down_proj.lora_A.weight")),
            Some(vec![4, FFN])
        );
        let b = t[&format!("{p}.mlp.down_proj.lora_B.weight")].flatten_all()?;
        assert!(b.to_vec1::<f32>()?.iter().all(|v| *v == 0.0));
        let a = t[&format!("{p}.mlp.down_proj.lora_A.weight")].flatten_all()?;
        let bound = 1.0 / (FFN as f32).sqrt();
        let a = a.to_vec1::<f32>()?;
        assert!(a.iter().all(|v| v.abs() <= bound + 1e-6));
        assert!(a.iter().any(|v| *v != 0.0));
    }
    Ok(())
}

#[test]
fn merged_weights_match_adapter_and_roundtrip() -> R<()> {
    for mt in ["llama", "qwen2"] {
        let cfg = tiny_config(mt, true);
        let w = tiny_weights(&cfg, &Device::Cpu)?;
        let vm = VarMap::new();
        let mut lc = lora_cfg();
        lc.use_rslora = true;
        let m = build(&w, &cfg, Some((&vm, lc.clone())))?;
        randomize_b(&vm)?;
        let with_adapter = logits(&m, &TOKENS)?;

        let mut merged = w.clone();
        let n = lora::merge_into(&mut merged, &vm, &lc)?;
        assert_eq!(n, LAYERS * 7);
        let merged_logits = logits(&build(&merged, &cfg, None)?, &TOKENS)?;
        let d = max_diff(&merged_logits, &with_adapter);
        assert!(d < 1e-4, "{mt}: merged differs by {d}");

        let dir = tempfile::tempdir()?;
        lora::save_adapter(dir.path(), &vm, &lc)?;
        let cfg_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            dir.path().join("adapter_config.json"),
        )?)?;
        assert_eq!(cfg_json["peft_type"], "LORA");
        assert_eq!(cfg_json["use_rslora"], true);
        assert_eq!(cfg_json["r"], 4);
        let (lc2, vm2) = lora::load_adapter(dir.path(), &Device::Cpu)?;
        assert_eq!(lc2, lc);
        let reloaded = logits(&build(&w, &cfg, Some((&vm2, lc2)))?, &TOKENS)?;
        assert_eq!(reloaded, with_adapter, "{mt}: adapter roundtrip");
    }
    Ok(())
}

#[test]
fn packed_sequences_do_not_attend_across_samples() -> R<()> {
    for mt in ["llama", "qwen2"] {
        let cfg = tiny_config(mt, false);
        let w = tiny_weights(&cfg, &Device::Cpu)?;
        let vm = VarMap::new();
        let m = build(&w, &cfg, Some((&vm, lora_cfg())))?;
        randomize_b(&vm)?;
        let s1 = [4u32, 8, 15, 16, 23];
        let s2 = [42u32 % VOCAB as u32, 7, 1, 30];
        let alone = logits(&m, &s2)?;
        let packed_ids: Vec<u32> = s1.iter().chain(s2.iter()).copied().collect();
        let seg = vec![vec![0u32, 0, 0, 0, 0, 1, 1, 1, 1]];
        let p = Packing::from_segments(&seg, None, &Device::Cpu)?;
        assert_eq!(
            p.position_ids.to_vec2::<u32>()?,
            vec![vec![0, 1, 2, 3, 4, 0, 1, 2, 3]]
        );
        let out = m.forward(&ids(&packed_ids)?, &p, &ForwardOptions::default())?;
        let rows = Tensor::new(&[5u32, 6, 7, 8], &Device::Cpu)?;
        let packed = m.logits_at(&out.hidden, &rows)?.to_vec2::<f32>()?;
        // Equal up to f32 rounding, which grows with the logits' size (and with the row count,
        // which sets the products' blocking): within 1e-5 of the largest logit. Attending
        // across samples changes the logits by whole units (below).
        let d = max_diff(&packed, &alone);
        let scale = alone.iter().flatten().fold(1f32, |m, v| m.max(v.abs()));
        assert!(
            d < 1e-5 * scale,
            "{mt}: packed sample differs by {d} (logits up to {scale})"
        );
        // Without the segment mask the second sample would see the first.
        let p_causal = Packing::from_segments(
            &[vec![0; 9]],
            Some(&[vec![0, 1, 2, 3, 4, 0, 1, 2, 3]]),
            &Device::Cpu,
        )?;
        let out = m.forward(&ids(&packed_ids)?, &p_causal, &ForwardOptions::default())?;
        let leaky = m.logits_at(&out.hidden, &rows)?.to_vec2::<f32>()?;
        assert!(max_diff(&leaky, &alone) > 1e-2);
    }
    Ok(())
}

#[test]
fn adamw_overfit_reduces_loss_and_freezes_base() -> R<()> {
    let cfg = tiny_config("qwen2", false);
    let w = tiny_weights(&cfg, &Device::Cpu)?;
    let snapshot: HashMap<String, Vec<f32>> = w
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.flatten_all()?.to_vec1::<f32>()?)))
        .collect::<R<_>>()?;
    let vm = VarMap::new();
    let mut lc = lora_cfg();
    lc.dropout = 0.05;
    lc.r = 8;
    let m = build(&w, &cfg, Some((&vm, lc)))?;
    let mut opt = candle_nn::AdamW::new(
        vm.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 5e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let seq: Vec<u32> = (0..12u32).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
    let input = ids(&seq[..11])?;
    let targets = Tensor::new(&seq[1..], &Device::Cpu)?;
    let packing = Packing::causal(1, 11, &Device::Cpu)?;
    let rows = Tensor::arange(0u32, 11, &Device::Cpu)?;
    let opts = ForwardOptions {
        train: true,
        output_layers: vec![],
    };
    // Every adapter (including q/k, behind RoPE) receives a gradient; B is zero-initialised,
    // so A's gradient is zero on the first step but B's is not.
    let out = m.forward(&input, &packing, &opts)?;
    let loss = candle_nn::loss::cross_entropy(&m.logits_at(&out.hidden, &rows)?, &targets)?;
    let grads = loss.backward()?;
    for (name, var) in vm.data().lock().map_err(|_| "poisoned")?.iter() {
        let g = grads
            .get(var.as_tensor())
            .ok_or(format!("no gradient for {name}"))?;
        if name.contains(".lora_B.") {
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm > 0.0, "zero gradient for {name}");
        }
    }
    for (k, v) in &w {
        assert!(grads.get(v).is_none(), "{k} must not receive a gradient");
    }
    let mut losses = vec![];
    for _ in 0..40 {
        let out = m.forward(&input, &packing, &opts)?;
        let logits = m.logits_at(&out.hidden, &rows)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        losses.push(loss.to_scalar::<f32>()?);
        opt.backward_step(&loss)?;
    }
    // Judge on the deterministic (dropout-free) loss before and after training.
    let eval_loss = || -> R<f32> {
        let out = m.forward(&input, &packing, &ForwardOptions::default())?;
        let logits = m.logits_at(&out.hidden, &rows)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &targets)?.to_scalar::<f32>()?)
    };
    let last = eval_loss()?;
    let first = losses[0];
    println!("train losses: {losses:?}, final eval loss {last}");
    assert!(last < first * 0.6, "loss {first} -> {last}");
    for (k, v) in &w {
        assert!(!v.is_variable(), "{k} must not be a Var");
        assert_eq!(
            v.flatten_all()?.to_vec1::<f32>()?,
            snapshot[k],
            "{k} changed"
        );
    }
    Ok(())
}

/// Writes a tiny Hugging Face directory (config, weights, word-level tokenizer, chat template).
fn write_tiny_hf_dir(dir: &Path, cfg: &Config, w: &HashMap<String, Tensor>) -> R<()> {
    std::fs::write(dir.join("config.json"), serde_json::to_string(cfg)?)?;
    lora::save_safetensors(w, &dir.join("model.safetensors"))?;
    let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "w0", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w1"}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok)?)?;
    let tc = serde_json::json!({
        "eos_token": {"content": "w0"},
        "chat_template": "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}{% if add_generation_prompt %}assistant{% endif %}"
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string(&tc)?,
    )?;
    Ok(())
}

#[test]
fn hf_dir_load_and_merged_export() -> R<()> {
    let cfg = tiny_config("llama", false);
    let w = tiny_weights(&cfg, &Device::Cpu)?;
    let src = tempfile::tempdir()?;
    write_tiny_hf_dir(src.path(), &cfg, &w)?;
    let base = BaseModel::from_hf_dir(src.path())?;
    assert!(!base.config.tie_word_embeddings);
    assert_eq!(base.tokenizer.eos_token(), Some("w0"));
    let text = base
        .tokenizer
        .apply_chat_template(&[ChatMessage::new("user", "w5 w6")], true)?;
    assert_eq!(text, "user w5 w6 assistant");
    let vm = VarMap::new();
    let lc = lora_cfg();
    let m = base.student(Some((&vm, lc.clone())), DType::F32, &Device::Cpu)?;
    randomize_b(&vm)?;
    let with_adapter = logits(&m, &TOKENS)?;

    let out = tempfile::tempdir()?;
    base.save_merged(out.path(), Some((&lc, &vm)), None)?;
    let merged = BaseModel::from_hf_dir(out.path())?;
    assert_eq!(merged.config.hidden_size, HIDDEN);
    assert_eq!(merged.config.rope_scaling, cfg.rope_scaling);
    assert_eq!(
        merged.tokenizer.chat_template(),
        base.tokenizer.chat_template()
    );
    let ml = logits(&merged.student(None, DType::F32, &Device::Cpu)?, &TOKENS)?;
    let d = max_diff(&ml, &with_adapter);
    assert!(d < 1e-4, "exported merged model differs by {d}");
    Ok(())
}

#[test]
fn smollm2_gguf_tokenizer_and_greedy_answer() -> R<()> {
    let path = common::test_model();
    let dev = Device::Cpu;
    let t0 = std::time::Instant::now();
    let base = BaseModel::from_gguf(&path, &dev)?;
    println!("gguf load: {:?}", t0.elapsed());
    let c = &base.config;
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_kv_heads()
        ),
        (30, 576, 9, 3)
    );
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);

    let tok = &base.tokenizer;
    let text = "Hello, world! 12345 <|im_start|>";
    let enc = tok.encode(text, false)?;
    println!("{text:?} -> {enc:?}");
    assert_eq!(enc.last(), Some(&1), "<|im_start|> must be id 1");
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert_eq!(tok.decode(&enc, false)?, text);
    // SmolLM splits digits individually.
    let digits = tok.encode("12345", false)?;
    assert_eq!(digits.len(), 5, "{digits:?}");

    let msgs = [ChatMessage::new("user", "What is the capital of France?")];
    let prompt = tok.apply_chat_template(&msgs, true)?;
    assert!(prompt.ends_with(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ));
    let think = tok.apply_chat_template(
        &[
            msgs[0].clone(),
            ChatMessage::new("assistant", "<think>\nParis.\n</think>\nParis"),
        ],
        false,
    )?;
    assert!(think.contains("<think>\nParis.\n</think>\nParis<|im_end|>"));

    let m = base.student(None, DType::F32, &dev)?;
    let ids = tok.encode(&prompt, false)?;
    let mut gen = ids.clone();
    for _ in 0..6 {
        let next = m.greedy_next(&gen, &dev)?;
        gen.push(next);
    }
    let answer = tok.decode(&gen[ids.len()..], true)?;
    println!("greedy answer: {answer:?}");
    assert!(
        answer.contains("The") || answer.contains("Paris"),
        "unexpected answer {answer:?}"
    );

    // Timing: one forward over a 64-token prompt.
    let long: Vec<u32> = tok
        .encode(&prompt.repeat(8), false)?
        .into_iter()
        .take(64)
        .collect();
    assert_eq!(long.len(), 64);
    let input = Tensor::new(long.as_slice(), &dev)?.unsqueeze(0)?;
    let packing = Packing::causal(1, 64, &dev)?;
    let t1 = std::time::Instant::now();
    let out = m.forward(&input, &packing, &ForwardOptions::default())?;
    let last = Tensor::new(&[63u32], &dev)?;
    let l = m.logits_at(&out.hidden, &last)?;
    println!("SmolLM2 forward, 64 tokens: {:?}", t1.elapsed());
    assert_eq!(l.dims(), &[1, 49152]);
    assert!(l.max(D::Minus1)?.to_vec1::<f32>()?[0].is_finite());
    Ok(())
}

#[test]
fn smollm2_gguf_export_reloads_as_hf() -> R<()> {
    let path = common::test_model();
    let dev = Device::Cpu;
    let base = BaseModel::from_gguf(&path, &dev)?;
    let vm = VarMap::new();
    let mut lc = LoraConfig {
        r: 2,
        target_modules: vec!["q_proj".into(), "k_proj".into()],
        ..Default::default()
    };
    lc.base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct".into();
    let m = base.student(Some((&vm, lc.clone())), DType::F32, &dev)?;
    randomize_b(&vm)?;
    let prompt = [1u32, 4093, 198, 22503, 28, 905, 2];
    let expected = logits(&m, &prompt)?;
    let dir = tempfile::tempdir()?;
    base.save_merged(dir.path(), Some((&lc, &vm)), Some(DType::F32))?;
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json"))?)?;
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["tie_word_embeddings"], true);
    let reloaded = BaseModel::from_hf_dir(dir.path())?;
    assert!(reloaded.config.tie_word_embeddings);
    assert_eq!(
        reloaded.tokenizer.encode("Hello <|im_end|>", false)?,
        base.tokenizer.encode("Hello <|im_end|>", false)?
    );
    let got = logits(&reloaded.student(None, DType::F32, &dev)?, &prompt)?;
    let d = max_diff(&got, &expected);
    assert!(d < 1e-3, "merged export differs by {d}");
    Ok(())
}
