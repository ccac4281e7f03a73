//! LoRA SFT end to end on a tiny random model written to a temporary Hugging Face directory:
//! overfitting, assistant-only masking, dropped long traces, the preflight check, exact resume,
//! NaN handling and merging.

use candle_core::{DType, Device, Tensor};
use distill::model::load::BaseModel;
use distill::model::lora;
use distill::model::tokenizer::{ChatMessage, ChatTokenizer};
use distill::model::{Config, ForwardOptions, Packing};
use distill::train::data::{self, ChatRenderer, Encoder, Sample};
use distill::train::{Resume, TrainConfig, TrainError, TrainOverrides};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

type R<T> = Result<T, Box<dyn std::error::Error>>;

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FFN: usize = 64;
const LAYERS: usize = 2;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Word-level vocabulary: specials, roles, `<think>` tags, numbers and a few words.
fn vocab() -> Vec<String> {
    let mut v: Vec<String> = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "[UNK]",
        "<think>",
        "</think>",
        "system",
        "user",
        "assistant",
        "what",
        "is",
        "plus",
        "?",
        "so",
        "answer",
        "the",
        "long",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend((0..19).map(|i| i.to_string()));
    v
}

fn tiny_config(vocab: usize, hidden: usize) -> R<Config> {
    Ok(serde_json::from_value(serde_json::json!({
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "vocab_size": vocab,
        "tie_word_embeddings": true,
        "eos_token_id": 2,
    }))?)
}

/// A seeded-looking but fixed set of base weights (values from a simple hash so the test
/// does not depend on candle's unseeded generator).
fn tiny_weights(cfg: &Config) -> R<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let hd = cfg.head_dim();
    let v = cfg.vocab_size;
    let hidden = cfg.hidden_size;
    let mut t = HashMap::new();
    let mut counter = 0u64;
    let mut put = |name: String, shape: &[usize], scale: f32, offset: f32| -> R<()> {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                counter = counter
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((counter >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0;
                offset + scale * u
            })
            .collect();
        t.insert(name, Tensor::from_vec(vals, shape, &dev)?);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &[v, hidden], 1.0, 0.0)?;
    put("model.norm.weight".into(), &[hidden], 0.1, 1.0)?;
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[HEADS * hd, hidden],
            0.3,
            0.0,
        )?;
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[KV_HEADS * hd, hidden],
            0.3,
            0.0,
        )?;
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[KV_HEADS * hd, hidden],
            0.3,
            0.0,
        )?;
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[hidden, HEADS * hd],
            0.3,
            0.0,
        )?;
        put(
            format!("{p}.mlp.gate_proj.weight"),
            &[FFN, hidden],
            0.3,
            0.0,
        )?;
        put(format!("{p}.mlp.up_proj.weight"), &[FFN, hidden], 0.3, 0.0)?;
        put(
            format!("{p}.mlp.down_proj.weight"),
            &[hidden, FFN],
            0.3,
            0.0,
        )?;
        put(format!("{p}.input_layernorm.weight"), &[hidden], 0.1, 1.0)?;
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[hidden],
            0.1,
            1.0,
        )?;
    }
    Ok(t)
}

/// Writes config.json, model.safetensors, a word-level tokenizer.json with ChatML specials,
/// and tokenizer_config.json (eos = pad = `<|im_end|>`).
fn write_tiny_model(dir: &Path) -> R<()> {
    write_tiny_model_width(dir, HIDDEN)
}

/// [`write_tiny_model`] with another hidden size (same tokenizer and layer count).
fn write_tiny_model_width(dir: &Path, hidden: usize) -> R<()> {
    let words = vocab();
    let cfg = tiny_config(words.len(), hidden)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string(&cfg)?)?;
    lora::save_safetensors(&tiny_weights(&cfg)?, &dir.join("model.safetensors"))?;
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = words[..6]
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(i, w)| {
            serde_json::json!({"id": i, "content": w, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": i < 3})
        })
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok)?)?;
    let tc = serde_json::json!({
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "chat_template": CHATML,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string(&tc)?,
    )?;
    Ok(())
}

fn trace(i: usize, user: &str, completion: Option<&str>) -> serde_json::Value {
    let mut t = serde_json::json!({
        "id": format!("t{i}"), "problem_id": format!("p{i}"), "sample_index": 0,
        "messages": [{"role": "user", "content": user}],
        "teacher": {"backend": "openai", "model": "teacher"},
        "sampling": {"temperature": 0.7, "top_p": 1.0, "max_tokens": 64},
        "created_at": "2025-01-01T00:00:00Z",
    });
    match completion {
        Some(c) => t["completion"] = serde_json::json!(c),
        None => t["error"] = serde_json::json!({"kind": "timeout", "message": "x"}),
    }
    t
}

/// `n` addition traces with `<think>` blocks, one failed trace and one very long trace.
fn write_traces(path: &Path, n: usize) -> R<()> {
    let mut lines = Vec::new();
    for i in 0..n {
        let (a, b) = (i % 10, (i * 7 + 3) % 9);
        lines.push(trace(
            i,
            &format!("what is {a} plus {b} ?"),
            Some(&format!(
                "<think> {a} plus {b} is {} </think> the answer is {}",
                a + b,
                a + b
            )),
        ));
    }
    lines.push(trace(n, "what is 1 plus 1 ?", None));
    lines.push(trace(
        n + 1,
        "what is 2 plus 2 ?",
        Some(&"long ".repeat(120)),
    ));
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text)?;
    Ok(())
}

struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    data: PathBuf,
    root: PathBuf,
}

fn fixture(n: usize) -> R<Fixture> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model)?;
    write_tiny_model(&model)?;
    let data = dir.path().join("traces.jsonl");
    write_traces(&data, n)?;
    Ok(Fixture {
        root: dir.path().to_path_buf(),
        _dir: dir,
        model,
        data,
    })
}

fn base_config(f: &Fixture, out: &str) -> TrainConfig {
    let mut c = TrainConfig {
        model: f.model.clone(),
        data: f.data.clone(),
        out_dir: f.root.join(out),
        max_len: 64,
        batch_size: 4,
        lr: 1e-2,
        warmup_steps: 2,
        max_steps: Some(40),
        save_every: 0,
        eval_every: 0,
        seed: 7,
        ..Default::default()
    };
    c.lora.r = 8;
    c.lora.alpha = 16.0;
    c
}

fn quiet() -> TrainOverrides {
    TrainOverrides {
        quiet: true,
        ..Default::default()
    }
}

/// Runs `cfg` up to optimizer step `stop` (a checkpoint, no export), then resumes it from the
/// latest checkpoint to the end; returns both reports.
fn stop_then_resume(
    cfg: &TrainConfig,
    stop: usize,
) -> R<(distill::train::TrainReport, distill::train::TrainReport)> {
    let first = distill::train::train(
        cfg,
        &TrainOverrides {
            stop_after: Some(stop),
            quiet: true,
            ..Default::default()
        },
    )?;
    assert_eq!(first.steps, stop);
    assert!(first.adapter_dir.is_none());
    let second = distill::train::train(
        cfg,
        &TrainOverrides {
            resume: Some(Resume::Latest),
            quiet: true,
            ..Default::default()
        },
    )?;
    assert_eq!(second.resumed_from, Some(stop));
    Ok((first, second))
}

fn file_bytes(p: &Path) -> R<Vec<u8>> {
    Ok(std::fs::read(p)?)
}

#[test]
fn overfits_tiny_model_only_adapters_change_and_merge_matches() -> R<()> {
    let f = fixture(8)?;
    let before = file_bytes(&f.model.join("model.safetensors"))?;
    let mut cfg = base_config(&f, "run");
    cfg.val_count = Some(1);
    cfg.eval_every = 10;
    let t0 = std::time::Instant::now();
    let report = distill::train::train(&cfg, &quiet())?;
    println!("40 steps in {:?}", t0.elapsed());
    let losses: Vec<f64> = report.history.iter().map(|m| m.loss).collect();
    println!("losses {losses:?}");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(first / last > 5.0, "loss {first} -> {last}");
    assert_eq!(report.data.dropped_too_long, 1);
    assert_eq!(report.data.skipped_failed, 1);
    assert_eq!((report.data.train, report.data.val), (7, 1));
    assert!(report.val_loss.is_some_and(f64::is_finite));
    assert!(
        report.preflight_example.contains("[[<think>"),
        "{}",
        report.preflight_example
    );

    // metrics.jsonl: one line per step, val_loss on eval steps.
    let metrics = std::fs::read_to_string(cfg.out_dir.join("metrics.jsonl"))?;
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 40);
    assert!(lines[9]["val_loss"].is_number());
    assert!(lines[0]["tokens_per_s"].is_number() && lines[0]["grad_norm"].is_number());

    // Base checkpoint untouched; the adapter holds only LoRA tensors.
    assert_eq!(file_bytes(&f.model.join("model.safetensors"))?, before);
    let adapter = candle_core::safetensors::load(
        cfg.out_dir.join("adapter_model.safetensors"),
        &Device::Cpu,
    )?;
    assert_eq!(adapter.len(), LAYERS * 7 * 2);
    assert!(adapter
        .keys()
        .all(|k| k.starts_with("base_model.model.model.layers.")
            && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))));

    // Merge: base weights other than the adapted projections are bit-identical, and the
    // merged model reproduces base + adapter.
    let merged_dir = f.root.join("merged");
    let m = distill::train::merge(&f.model, &cfg.out_dir, &merged_dir, None)?;
    assert_eq!(m.adapter_tensors, LAYERS * 7 * 2);
    let base = BaseModel::from_hf_dir(&f.model)?;
    let merged = BaseModel::from_hf_dir(&merged_dir)?;
    let bt = base.tensors(&Device::Cpu)?;
    let mt = merged.tensors(&Device::Cpu)?;
    for (name, t) in &bt {
        let same =
            t.flatten_all()?.to_vec1::<f32>()? == mt[name].flatten_all()?.to_vec1::<f32>()?;
        let adapted = lora::ALL_TARGET_MODULES
            .iter()
            .any(|p| name.ends_with(&format!("{p}.weight")));
        assert_eq!(same, !adapted, "{name}");
    }
    let (lc, vm) = lora::load_adapter(&cfg.out_dir, &Device::Cpu)?;
    let with_adapter = base.student(Some((&vm, lc)), DType::F32, &Device::Cpu)?;
    let plain = merged.student(None, DType::F32, &Device::Cpu)?;
    let ids = [1u32, 7, 9, 10, 20, 11, 22, 12, 2];
    let input = Tensor::new(&ids, &Device::Cpu)?.unsqueeze(0)?;
    let p = Packing::causal(1, ids.len(), &Device::Cpu)?;
    let a = with_adapter.logits(
        &with_adapter
            .forward(&input, &p, &ForwardOptions::default())?
            .hidden,
    )?;
    let b = plain.logits(
        &plain
            .forward(&input, &p, &ForwardOptions::default())?
            .hidden,
    )?;
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(d < 1e-3, "merged model differs by {d}");
    Ok(())
}

fn tiny_encoder(f: &Fixture, template: Option<&Path>) -> R<Encoder> {
    let tok = ChatTokenizer::from_hf_dir(&f.model)?;
    Ok(Encoder::new(ChatRenderer::new(tok, template)?, None)?)
}

#[test]
fn assistant_only_mask_keeps_think_and_supervises_eos_equal_to_pad() -> R<()> {
    let f = fixture(2)?;
    let enc = tiny_encoder(&f, None)?;
    let tok = enc.renderer().tokenizer();
    let eos = tok.token_id("<|im_end|>").ok_or("no eos")?;
    let msgs = [
        ChatMessage::new("system", "the answer"),
        ChatMessage::new("user", "what is 2 plus 3 ?"),
        ChatMessage::new("assistant", "<think> 2 plus 3 is 5 </think> 5"),
    ];
    let (s, notes) = enc.encode(&msgs, "x")?;
    assert!(!notes.eos_appended && !notes.boundary_merged);
    let prompt_ids = tok.encode(&enc.renderer().render(&msgs[..2], true)?, false)?;
    let n_prompt = prompt_ids.len();
    assert_eq!(&s.ids[..n_prompt], prompt_ids.as_slice());
    assert!(
        s.mask[..n_prompt].iter().all(|m| !m),
        "prompt tokens must be unsupervised"
    );
    assert!(
        s.mask[n_prompt..].iter().all(|m| *m),
        "answer tokens must be supervised"
    );
    assert_eq!(
        s.ids.last(),
        Some(&eos),
        "sample must end with the end-of-turn token"
    );
    let answer = tok.decode(&s.ids[n_prompt..], false)?;
    assert!(
        answer.starts_with("<think> 2 plus 3 is 5 </think> 5"),
        "{answer}"
    );
    let labels = s.labels();
    assert_eq!(labels[n_prompt - 1], data::IGNORE_INDEX);
    assert_eq!(labels.last(), Some(&i64::from(eos)));
    let shown = enc.show(&s)?;
    assert!(
        shown.contains("[[<think>") && shown.ends_with("<|im_end|>]]"),
        "{shown}"
    );

    // Pad id == EOS: padding is never supervised, every real EOS is.
    let (short, _) = enc.encode(
        &[
            ChatMessage::new("user", "what is 1 ?"),
            ChatMessage::new("assistant", "1"),
        ],
        "y",
    )?;
    let samples = vec![s.clone(), short.clone()];
    let b = data::collate(&samples, &[vec![0], vec![1]], eos, &Device::Cpu)?;
    assert_eq!(b.n_supervised, s.n_supervised() + short.n_supervised());
    let targets = b.targets.to_vec1::<u32>()?;
    assert_eq!(targets.iter().filter(|t| **t == eos).count(), 2);
    let seq = s.len();
    let rows = b.target_rows.to_vec1::<u32>()?;
    assert!(
        rows.contains(&((seq - 2) as u32)),
        "EOS of row 0 must be a target"
    );
    assert!(
        rows.contains(&((seq + short.len() - 2) as u32)),
        "EOS of row 1 must be a target"
    );
    assert!(rows.iter().all(|&r| (r as usize) < seq + short.len() - 1));

    // Packed: both samples in one row, targets at the right offsets.
    let packed = data::collate(&samples, &[vec![0, 1]], eos, &Device::Cpu)?;
    assert_eq!(packed.n_supervised, b.n_supervised);
    assert_eq!(packed.targets.to_vec1::<u32>()?, targets);
    Ok(())
}

#[test]
fn template_without_eos_appends_it_and_broken_template_errors() -> R<()> {
    let f = fixture(2)?;
    let no_eos = f.root.join("no_eos.jinja");
    std::fs::write(
        &no_eos,
        "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}{% if add_generation_prompt %}assistant {% endif %}",
    )?;
    let enc = tiny_encoder(&f, Some(&no_eos))?;
    let msgs = [
        ChatMessage::new("user", "what is 1 ?"),
        ChatMessage::new("assistant", "1"),
    ];
    let (s, notes) = enc.encode(&msgs, "x")?;
    assert!(notes.eos_appended);
    assert_eq!(
        s.ids.last().copied(),
        enc.renderer().tokenizer().token_id("<|im_end|>")
    );
    assert!(s.mask.last().copied().unwrap_or(false));

    let broken = f.root.join("broken.jinja");
    std::fs::write(
        &broken,
        "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>bot {% endif %}",
    )?;
    let enc = tiny_encoder(&f, Some(&broken))?;
    let err = enc
        .encode(&msgs, "x")
        .err()
        .ok_or("broken template accepted")?;
    let msg = err.to_string();
    assert!(
        msg.contains("add_generation_prompt") && msg.contains("trace x"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn long_traces_dropped_and_preflight_refuses_unsupervised_batches() -> R<()> {
    let f = fixture(4)?;
    let enc = tiny_encoder(&f, None)?;
    let traces = distill::trace::read_traces(&f.data)?;
    let ds = data::build_dataset(&traces, &enc, 64, 0.0, None, 1)?;
    assert_eq!(ds.stats.dropped_too_long, 1);
    assert_eq!(ds.stats.skipped_failed, 1);
    assert_eq!(ds.train.len(), 4);
    let ds_big = data::build_dataset(&traces, &enc, 1000, 0.0, None, 1)?;
    assert_eq!((ds_big.stats.dropped_too_long, ds_big.train.len()), (0, 5));

    // A batch whose only sample has no supervised token is refused with a clear message.
    let mut bad = ds.train[0].clone();
    bad.mask = vec![false; bad.len()];
    let samples = vec![ds.train[1].clone(), bad];
    let err = data::preflight(&enc, &samples, &vec![vec![vec![0]], vec![vec![1]]])
        .err()
        .ok_or("preflight accepted a batch without supervised tokens")?;
    assert!(matches!(err, TrainError::Preflight(_)));
    assert!(err.to_string().contains("zero supervised tokens"), "{err}");

    // Supervising everything but the end-of-turn token is refused too.
    let mut no_eos: Sample = ds.train[0].clone();
    let last = no_eos.mask.len() - 1;
    no_eos.mask[last] = false;
    let err = data::preflight(&enc, &[no_eos], &vec![vec![vec![0]]])
        .err()
        .ok_or("preflight accepted data that never supervises EOS")?;
    assert!(err.to_string().contains("end-of-turn"), "{err}");

    // Plans are deterministic given the seed and cover every sample once per epoch.
    let lengths: Vec<usize> = ds_big.train.iter().map(Sample::len).collect();
    for packing in [false, true] {
        let a = data::plan_epoch(&lengths, 2, 128, packing, 4, 9, 3);
        assert_eq!(a, data::plan_epoch(&lengths, 2, 128, packing, 4, 9, 3));
        let mut all: Vec<usize> = a.iter().flatten().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..lengths.len()).collect::<Vec<_>>());
    }
    Ok(())
}

#[test]
fn resumed_run_matches_uninterrupted_run() -> R<()> {
    let f = fixture(10)?;
    let mut cfg = base_config(&f, "straight");
    cfg.max_steps = Some(10);
    cfg.grad_accum = 2;
    cfg.batch_size = 2;
    cfg.save_every = 4;
    cfg.keep_checkpoints = 0;
    cfg.val_count = Some(2);
    cfg.eval_every = 3;
    cfg.weight_decay = 0.01;
    // Dropout masks come from a generator seeded per (seed, step, micro-batch).
    cfg.lora.dropout = 0.1;
    let straight = distill::train::train(&cfg, &quiet())?;

    let mut cfg_b = cfg.clone();
    cfg_b.out_dir = f.root.join("interrupted");
    let (first, second) = stop_then_resume(&cfg_b, 5)?;
    assert!(cfg_b
        .out_dir
        .join("checkpoints/step-5/optimizer.safetensors")
        .exists());
    assert!(second.config_changes.is_empty());
    let curve = |r: &distill::train::TrainReport| -> Vec<(usize, f64, Option<f64>)> {
        r.history
            .iter()
            .map(|m| (m.step, m.loss, m.val_loss))
            .collect()
    };
    let mut resumed = curve(&first);
    resumed.extend(curve(&second));
    assert_eq!(resumed, curve(&straight), "loss curves differ");
    // Dropout really is active: without it the same run follows another curve.
    let mut no_dropout = cfg.clone();
    no_dropout.out_dir = f.root.join("no-dropout");
    no_dropout.lora.dropout = 0.0;
    let plain = distill::train::train(&no_dropout, &quiet())?;
    assert_ne!(curve(&plain), curve(&straight), "dropout had no effect");
    assert_eq!(
        file_bytes(&cfg.out_dir.join("adapter_model.safetensors"))?,
        file_bytes(&cfg_b.out_dir.join("adapter_model.safetensors"))?,
        "final adapters differ"
    );
    let lines = std::fs::read_to_string(cfg_b.out_dir.join("metrics.jsonl"))?;
    assert_eq!(lines.lines().count(), 10);

    // Resuming with a changed setting warns and reports the field.
    let mut cfg_c = cfg.clone();
    cfg_c.eval_every = 5;
    let third = distill::train::train(
        &cfg_c,
        &TrainOverrides {
            resume: Some(Resume::From(cfg.out_dir.join("checkpoints/step-8"))),
            quiet: true,
            ..Default::default()
        },
    )?;
    assert_eq!(third.config_changes, vec!["eval_every"]);
    let lines = std::fs::read_to_string(cfg.out_dir.join("metrics.jsonl"))?;
    assert_eq!(
        lines.lines().count(),
        10,
        "metrics of steps after the checkpoint are replaced"
    );
    assert_eq!(third.history.len(), 2);
    assert_eq!(third.history[0].loss, straight.history[8].loss);

    // A fresh run with the same seed in the same directory repeats the run exactly and starts
    // a new metrics file.
    let again = distill::train::train(&cfg, &quiet())?;
    assert_eq!(curve(&again), curve(&straight));
    let lines = std::fs::read_to_string(cfg.out_dir.join("metrics.jsonl"))?;
    assert_eq!(lines.lines().count(), 10);
    Ok(())
}

#[test]
fn absurd_learning_rate_stops_with_non_finite_error_and_keeps_checkpoint() -> R<()> {
    let f = fixture(8)?;
    let mut cfg = base_config(&f, "nan");
    cfg.lr = 1e30;
    cfg.warmup_steps = 0;
    cfg.save_every = 1;
    cfg.keep_checkpoints = 0;
    cfg.max_steps = Some(10);
    let err = distill::train::train(&cfg, &quiet())
        .err()
        .ok_or("training with lr 1e30 did not fail")?;
    let msg = err.to_string();
    println!("{msg}");
    let TrainError::NonFinite {
        step,
        last_checkpoint,
        ..
    } = err
    else {
        return Err(format!("unexpected error {msg}").into());
    };
    assert!(
        msg.contains("non-finite") && msg.contains("last good checkpoint"),
        "{msg}"
    );
    assert!(step >= 2);
    let ck = last_checkpoint.ok_or("no checkpoint kept")?;
    assert!(ck.ends_with(format!("step-{}", step - 1)));
    assert!(ck.join("adapter_model.safetensors").exists());
    assert!(!cfg
        .out_dir
        .join(format!("checkpoints/step-{step}"))
        .exists());
    assert!(!cfg.out_dir.join("adapter_model.safetensors").exists());
    Ok(())
}

#[test]
fn packed_run_trains_with_several_samples_per_row() -> R<()> {
    let f = fixture(12)?;
    let mut cfg = base_config(&f, "packed");
    cfg.packing = true;
    cfg.batch_size = 2;
    cfg.max_steps = Some(25);
    let report = distill::train::train(&cfg, &quiet())?;
    let first = &report.history[0];
    let last = &report.history[report.history.len() - 1];
    // 64-token rows hold two or more samples of ~20 tokens each.
    assert!(
        first.tokens > 2 * 40,
        "rows were not packed: {} tokens",
        first.tokens
    );
    assert!(
        first.loss / last.loss > 3.0,
        "loss {} -> {}",
        first.loss,
        last.loss
    );
    Ok(())
}

/// Feature matching against a wider teacher: learned projections to its width train with the
/// adapter, lower the feature loss, survive a checkpoint and resume, and are not exported.
#[test]
fn feature_matching_across_widths_learns_a_projection_left_out_of_the_adapter() -> R<()> {
    let f = fixture(12)?;
    let teacher = f.root.join("teacher");
    std::fs::create_dir_all(&teacher)?;
    write_tiny_model_width(&teacher, 48)?;
    let mut cfg = base_config(&f, "feat");
    cfg.max_steps = Some(12);
    cfg.save_every = 6;
    cfg.loss.teacher = Some(teacher.clone());
    cfg.loss.feature_layers = 2;
    cfg.loss.feature_loss = distill::train::kd::FeatureLoss::Mse;
    let report = distill::train::train(&cfg, &quiet())?;
    let f_loss: Vec<f64> = report.history.iter().filter_map(|m| m.feature).collect();
    assert_eq!(f_loss.len(), 12);
    assert!(
        f_loss[11] < 0.8 * f_loss[0],
        "feature loss should fall: {f_loss:?}"
    );
    let ck = cfg.out_dir.join("checkpoints/step-6");
    assert!(ck.join("feature_projections.safetensors").is_file());
    let exported = candle_core::safetensors::load(
        cfg.out_dir.join("adapter_model.safetensors"),
        &Device::Cpu,
    )?;
    assert!(
        exported.keys().all(|k| k.contains("lora_")),
        "{:?}",
        exported.keys()
    );

    // Resumed from step 6, the run ends where the uninterrupted one did.
    let mut again = cfg.clone();
    again.out_dir = f.root.join("feat-resumed");
    std::fs::create_dir_all(again.out_dir.join("checkpoints"))?;
    let copy = again.out_dir.join("checkpoints/step-6");
    std::fs::create_dir_all(&copy)?;
    for e in std::fs::read_dir(&ck)? {
        let e = e?;
        std::fs::copy(e.path(), copy.join(e.file_name()))?;
    }
    let resumed = distill::train::train(
        &again,
        &TrainOverrides {
            resume: Some(Resume::Latest),
            ..quiet()
        },
    )?;
    let last = |r: &distill::train::TrainReport| r.history.last().map(|m| m.loss);
    assert_eq!(last(&resumed), last(&report), "resume is exact");

    // A teacher with another tokenizer is refused, naming what differs.
    let other = f.root.join("other");
    std::fs::create_dir_all(&other)?;
    write_tiny_model_width(&other, 32)?;
    let tok_path = other.join("tokenizer.json");
    let tok = std::fs::read_to_string(&tok_path)?.replace("\"plus\"", "\"minus\"");
    std::fs::write(&tok_path, tok)?;
    let mut bad = base_config(&f, "bad");
    bad.loss.teacher = Some(other);
    bad.loss.kind = distill::train::config::LossKind::CeKd;
    let e = distill::train::train(&bad, &quiet())
        .err()
        .ok_or("trained across tokenizers")?
        .to_string();
    assert!(e.contains("\"plus\"") && e.contains("\"minus\""), "{e}");
    Ok(())
}

/// Full-parameter training of the decoder layers: the loss falls, every layer weight moves
/// while embeddings and final norm stay bit-identical, the exported directory is a whole model
/// whose logits equal the trained one's, and a run stopped at a checkpoint and resumed ends
/// with the same loss curve and the same weights.
#[test]
fn full_finetune_trains_every_layer_weight_and_exports_a_whole_model() -> R<()> {
    let f = fixture(8)?;
    let mut cfg = base_config(&f, "full");
    cfg.full_finetune = true;
    cfg.lr = 3e-3;
    cfg.max_steps = Some(12);
    cfg.save_every = 5;
    cfg.keep_checkpoints = 0;
    cfg.weight_decay = 0.01;
    let report = distill::train::train(&cfg, &quiet())?;
    let losses: Vec<f64> = report.history.iter().map(|m| m.loss).collect();
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(first / last > 2.0, "loss {first} -> {last}");

    // A whole model, no adapter; layer weights changed, the rest did not.
    assert!(!cfg.out_dir.join("adapter_model.safetensors").exists());
    assert!(cfg
        .out_dir
        .join("checkpoints/step-5/layers.safetensors")
        .exists());
    let base = BaseModel::from_hf_dir(&f.model)?;
    let trained = BaseModel::from_hf_dir(&cfg.out_dir)?;
    let bt = base.tensors(&Device::Cpu)?;
    let tt = trained.tensors(&Device::Cpu)?;
    assert_eq!(
        bt.keys().collect::<std::collections::BTreeSet<_>>(),
        tt.keys().collect()
    );
    for (name, t) in &bt {
        let same =
            t.flatten_all()?.to_vec1::<f32>()? == tt[name].flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(same, !name.starts_with("model.layers."), "{name}");
    }

    // Stopped at step 5 and resumed: the same curve and bit-identical weights.
    let mut cfg_b = cfg.clone();
    cfg_b.out_dir = f.root.join("full-interrupted");
    let (part, rest) = stop_then_resume(&cfg_b, 5)?;
    let mut resumed: Vec<f64> = part.history.iter().map(|m| m.loss).collect();
    resumed.extend(rest.history.iter().map(|m| m.loss));
    assert_eq!(resumed, losses, "loss curves differ");
    assert_eq!(
        file_bytes(&cfg.out_dir.join("model.safetensors"))?,
        file_bytes(&cfg_b.out_dir.join("model.safetensors"))?,
        "final weights differ"
    );

    // The exported directory loads as a plain model, and its logits moved away from the base's.
    let ids = [1u32, 7, 9, 10, 20, 11, 22, 12, 2];
    let input = Tensor::new(&ids, &Device::Cpu)?.unsqueeze(0)?;
    let p = Packing::causal(1, ids.len(), &Device::Cpu)?;
    let logits = |m: &BaseModel| -> R<Tensor> {
        let s = m.student(None, DType::F32, &Device::Cpu)?;
        Ok(s.logits(&s.forward(&input, &p, &ForwardOptions::default())?.hidden)?)
    };
    let d = (logits(&trained)? - logits(&base)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(d > 1e-2, "trained model's logits equal the base's ({d})");
    Ok(())
}
