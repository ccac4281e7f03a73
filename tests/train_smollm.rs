//! A short LoRA SFT run on SmolLM2-135M-Instruct (GGUF): library API and CLI.

mod common;

use candle_core::Device;
use distill::train::{TrainConfig, TrainOverrides};
use std::path::{Path, PathBuf};

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn write_traces(path: &Path, n: usize, filler: usize) -> R<()> {
    let mut text = String::new();
    for i in 0..n {
        let (a, b) = (i * 13 + 7, i * 5 + 11);
        let think = "Add the tens, then the ones. ".repeat(filler);
        let t = serde_json::json!({
            "id": format!("t{i}"), "problem_id": format!("p{i}"), "sample_index": 0,
            "messages": [
                {"role": "system", "content": "Solve the problem. Put the final answer last."},
                {"role": "user", "content": format!("What is {a} + {b}?")}
            ],
            "completion": format!("<think>\n{think}{a} + {b} = {}.\n</think>\n\nThe answer is {}.", a + b, a + b),
            "reasoning": format!("{think}{a} + {b} = {}.", a + b),
            "reasoning_source": "think_tags",
            "finish_reason": "stop",
            "teacher": {"backend": "openai", "model": "teacher"},
            "sampling": {"temperature": 0.7, "top_p": 1.0, "max_tokens": 512},
            "created_at": "2025-01-01T00:00:00Z",
        });
        text.push_str(&format!("{t}\n"));
    }
    std::fs::write(path, text)?;
    Ok(())
}

fn smollm_config(model: PathBuf, dir: &Path) -> TrainConfig {
    TrainConfig {
        model,
        data: dir.join("traces.jsonl"),
        out_dir: dir.join("out"),
        base_model_name: Some("HuggingFaceTB/SmolLM2-135M-Instruct".into()),
        max_len: 512,
        batch_size: 2,
        lr: 1e-3,
        warmup_steps: 0,
        max_steps: Some(3),
        save_every: 2,
        eval_every: 0,
        ..Default::default()
    }
}

#[test]
fn smollm2_short_run_writes_peft_adapter() -> R<()> {
    let model = common::test_model();
    let dir = tempfile::tempdir()?;
    write_traces(&dir.path().join("traces.jsonl"), 6, 0)?;
    let cfg = smollm_config(model, dir.path());
    let t0 = std::time::Instant::now();
    let report = distill::train::train(
        &cfg,
        &TrainOverrides {
            quiet: true,
            ..Default::default()
        },
    )?;
    println!(
        "SmolLM2: {} steps in {:.1}s ({:.0} tok/s), losses {:?}",
        report.steps,
        t0.elapsed().as_secs_f64(),
        report.tokens_per_s,
        report.history.iter().map(|m| m.loss).collect::<Vec<_>>()
    );
    println!("{}", report.preflight_example);
    assert_eq!(report.steps, 3);
    assert!(report.history.iter().all(|m| m.loss.is_finite()));
    assert!(report
        .preflight_example
        .contains("<|im_start|>assistant\n[[<think>"));
    assert!(report.preflight_example.ends_with("<|im_end|>]]"));
    assert!(cfg
        .out_dir
        .join("checkpoints/step-2/trainer_state.json")
        .exists());

    let cfg_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        cfg.out_dir.join("adapter_config.json"),
    )?)?;
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 16);
    assert_eq!(cfg_json["lora_alpha"], 32.0);
    assert_eq!(
        cfg_json["base_model_name_or_path"],
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );
    let t = candle_core::safetensors::load(
        cfg.out_dir.join("adapter_model.safetensors"),
        &Device::Cpu,
    )?;
    assert_eq!(t.len(), 30 * 7 * 2);
    let shape = |n: &str| t.get(n).map(|x| x.dims().to_vec());
    let p = "base_model.model.model.layers.29";
    assert_eq!(
        shape(&format!("{p}.self_attn.q_proj.lora_A.weight")),
        Some(vec![16, 576])
    );
    assert_eq!(
        shape(&format!("{p}.self_attn.k_proj.lora_B.weight")),
        Some(vec![192, 16])
    );
    assert_eq!(
        shape(&format!("{p}.mlp.down_proj.lora_A.weight")),
        Some(vec![16, 1536])
    );
    assert_eq!(
        shape(&format!("{p}.mlp.up_proj.lora_B.weight")),
        Some(vec![1536, 16])
    );

    // `distill merge`: a standalone Hugging Face directory in bf16.
    let merged = dir.path().join("merged");
    let m = distill::train::merge(
        &cfg.model,
        &cfg.out_dir,
        &merged,
        Some(candle_core::DType::BF16),
    )?;
    assert_eq!(m.adapter_tensors, 30 * 7 * 2);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(merged.join(f).exists(), "{f} missing");
    }
    println!("total {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Throughput at batch 4 x 512 tokens, r = 16 on all seven projections, f32:
/// `cargo test --test train_smollm -- --ignored --nocapture`.
#[test]
#[ignore]
fn smollm2_throughput_batch4_len512() -> R<()> {
    let model = common::test_model();
    let dir = tempfile::tempdir()?;
    // Each sample is close to (but under) 512 tokens.
    write_traces(&dir.path().join("traces.jsonl"), 8, 54)?;
    let mut cfg = smollm_config(model, dir.path());
    // Four rows of 512 tokens per optimizer step, run as four micro-batches of one row: the
    // activations candle keeps for the backward pass (several MB per token) of a 4 x 512
    // micro-batch do not fit in 24 GB.
    cfg.batch_size = std::env::var("SMOLLM_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    cfg.grad_accum = 4 / cfg.batch_size.clamp(1, 4);
    cfg.max_steps = Some(2);
    cfg.save_every = 0;
    let report = distill::train::train(
        &cfg,
        &TrainOverrides {
            quiet: true,
            ..Default::default()
        },
    )?;
    for m in &report.history {
        println!(
            "step {}: {} tokens, {:.0} tok/s, loss {:.4}",
            m.step, m.tokens, m.tokens_per_s, m.loss
        );
    }
    assert_eq!(report.data.dropped_too_long, 0);
    Ok(())
}

#[test]
fn cli_train_then_merge_on_smollm2() -> R<()> {
    let model = common::test_model();
    let dir = tempfile::tempdir()?;
    let traces = dir.path().join("traces.jsonl");
    write_traces(&traces, 4, 0)?;
    let out = dir.path().join("adapter");
    let o = common::distill()
        .args(["train", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&traces)
        .arg("--out")
        .arg(&out)
        .args([
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--lora-r",
            "4",
            "--max-len",
            "256",
            "--quiet",
        ])
        .output()?;
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("train: 2 steps"),
        "{}",
        common::stderr(&o)
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json"))?)?;
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(out.join("metrics.jsonl").is_file());

    // A template the student was trained with travels with the adapter into the merged model.
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    std::fs::write(out.join("chat_template.jinja"), template)?;
    let merged = dir.path().join("merged");
    let o = common::distill()
        .args(["merge", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(&out)
        .arg("--out")
        .arg(&merged)
        .output()?;
    assert_eq!(o.status.code(), Some(0), "{}", common::stderr(&o));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ] {
        assert!(merged.join(f).is_file(), "{f} missing");
    }
    // The model card names the teachers of the training traces and travels into the merge.
    let card = std::fs::read_to_string(out.join("README.md"))?;
    assert!(card.contains("Teachers and their licences"), "{card}");
    assert_eq!(std::fs::read_to_string(merged.join("README.md"))?, card);
    let reloaded = distill::model::load::BaseModel::from_hf_dir(&merged)?;
    assert_eq!(reloaded.config.num_hidden_layers, 30);
    assert_eq!(reloaded.tokenizer.chat_template(), Some(template));
    Ok(())
}
