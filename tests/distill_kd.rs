//! Response and feature distillation on SmolLM2-135M-Instruct: soft labels written by
//! `distill label` and read back by training, offline against online, a depth-pruned student
//! recovered with KD against one trained with CE only, and the errors a user meets.

mod common;

use distill::eval::distance::{distance, DistanceConfig};
use distill::infer::{BatchConfig, Engine, ScoreRequest};
use distill::label::SoftLabels;
use distill::train::config::LossKind;
use distill::train::data::{ChatRenderer, Encoder};
use distill::train::kd::SoftRows;
use distill::train::{TrainConfig, TrainOverrides};
use std::path::{Path, PathBuf};

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// `n` addition traces with ids `{prefix}{i}`.
fn write_traces(path: &Path, prefix: &str, n: usize, offset: usize) -> R<()> {
    let mut text = String::new();
    for i in offset..offset + n {
        let (a, b) = (i * 13 + 7, i * 5 + 11);
        let t = serde_json::json!({
            "id": format!("{prefix}{i}"), "problem_id": format!("p{i}"), "sample_index": 0,
            "messages": [
                {"role": "system", "content": "Solve the problem. Put the final answer last."},
                {"role": "user", "content": format!("What is {a} + {b}?")}
            ],
            "completion": format!("<think>\nAdd the tens, then the ones: {a} + {b} = {}.\n</think>\n\nThe answer is {}.", a + b, a + b),
            "reasoning": format!("Add the tens, then the ones: {a} + {b} = {}.", a + b),
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

fn label(model: &Path, traces: &Path, out: &Path) -> R<String> {
    let o = common::distill()
        .args(["label", "--quiet", "--top-k", "64", "--model"])
        .arg(model)
        .arg("--traces")
        .arg(traces)
        .arg("--out")
        .arg(out)
        .output()?;
    let err = common::stderr(&o);
    assert!(o.status.success(), "label failed: {err}");
    Ok(err)
}

fn config(model: &Path, data: &Path, out: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        model: model.to_path_buf(),
        data: data.to_path_buf(),
        out_dir: out.to_path_buf(),
        max_len: 256,
        batch_size: 4,
        lr: 1e-3,
        warmup_steps: 0,
        max_steps: Some(steps),
        save_every: 0,
        eval_every: 0,
        seed: 3,
        ..Default::default()
    }
}

fn quiet() -> TrainOverrides {
    TrainOverrides {
        quiet: true,
        ..Default::default()
    }
}

/// Labels hold what the engine computes at the right positions, survive a torn write, resume,
/// and are refused for another trace file, a tampered vocabulary and a missing directory.
#[test]
fn soft_labels_align_resume_and_refuse_what_does_not_fit() -> R<()> {
    let model = common::test_model();
    let dir = tempfile::tempdir()?;
    let traces = dir.path().join("traces.jsonl");
    write_traces(&traces, "t", 6, 0)?;
    let labels_dir = dir.path().join("labels");
    let err = label(&model, &traces, &labels_dir)?;
    assert!(err.contains("6 labelled now"), "{err}");
    let labels = SoftLabels::open(&labels_dir)?;
    assert_eq!(labels.len(), 6);
    assert!(labels.meta().complete && labels.meta().values == "raw");
    assert!(
        labels.meta().bytes_per_token <= 300.0,
        "{} bytes per token at k = 64",
        labels.meta().bytes_per_token
    );

    // Stored rows equal the engine's teacher-forced top-k at the position before each target,
    // and each row's probabilities (top-k plus the outside mass) sum to 1.
    let engine = Engine::load(&model, None)?;
    let enc = Encoder::new(ChatRenderer::new(engine.tokenizer().clone(), None)?, None)?;
    let trace = &distill::trace::read_traces(&traces)?[2];
    let msgs = Encoder::trace_messages(trace).ok_or("no messages")?;
    let (sample, _) = enc.encode(&msgs, &trace.id)?;
    let scored = engine.score(
        vec![ScoreRequest {
            tokens: sample.ids.clone(),
            top_k: 64,
        }],
        &[],
        BatchConfig::default(),
    )?;
    let mut rows = SoftRows::new(64);
    labels.append_rows(&sample, &mut rows, 49152)?;
    let mut r = 0;
    for p in 1..sample.len() {
        if !sample.mask[p] {
            continue;
        }
        let want = &scored[0].positions[p - 1];
        let (ids, lps) = rows.row(r);
        let want_ids: Vec<u32> = want.top.iter().map(|e| e.0).collect();
        assert_eq!(ids, want_ids.as_slice(), "position {p}");
        for (got, w) in lps.iter().zip(&want.top) {
            assert!(
                (got - w.1.max(-32.0)).abs() < 1e-3,
                "position {p}: {got} vs {}",
                w.1
            );
        }
        let mass: f64 = lps.iter().map(|l| f64::from(*l).exp()).sum::<f64>()
            + f64::from(rows.log_tail[r]).exp();
        assert!((mass - 1.0).abs() < 2e-3, "position {p}: mass {mass}");
        r += 1;
    }
    assert_eq!(r, rows.len());

    // A torn last record is cut off and relabelled; the others are kept.
    let bin = labels_dir.join("labels.bin");
    let len = std::fs::metadata(&bin)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bin)?
        .set_len(len - 10)?;
    let err = label(&model, &traces, &labels_dir)?;
    assert!(err.contains("1 labelled now, 5 already"), "{err}");
    assert_eq!(std::fs::metadata(&bin)?.len(), len);
    assert_eq!(SoftLabels::open(&labels_dir)?.len(), 6);

    // Labels of another trace file.
    let other = dir.path().join("other.jsonl");
    write_traces(&other, "u", 4, 0)?;
    let mut cfg = config(&model, &other, &dir.path().join("out"), 1);
    cfg.loss.kind = LossKind::CeKd;
    cfg.loss.soft_labels = Some(labels_dir.clone());
    let e = distill::train::train(&cfg, &quiet())
        .err()
        .ok_or("trained on labels of another file")?
        .to_string();
    assert!(e.contains("no labels for trace `u"), "{e}");
    assert!(e.contains("traces.jsonl"), "names the labelled file: {e}");

    // A vocabulary that is not the student's.
    let meta_path = labels_dir.join("labels.json");
    let meta = std::fs::read_to_string(&meta_path)?;
    let mut v: serde_json::Value = serde_json::from_str(&meta)?;
    v["vocabulary"]["size"] = serde_json::json!(151665);
    v["vocabulary"]["hash"] = serde_json::json!("0123");
    std::fs::write(&meta_path, v.to_string())?;
    cfg.data = traces.clone();
    let e = distill::train::train(&cfg, &quiet())
        .err()
        .ok_or("trained across vocabularies")?
        .to_string();
    assert!(
        e.contains("vocabulary") && e.contains("151665") && e.contains("49152"),
        "{e}"
    );
    std::fs::write(&meta_path, meta)?;

    // No label directory.
    cfg.loss.soft_labels = Some(dir.path().join("missing"));
    let e = distill::train::train(&cfg, &quiet())
        .err()
        .ok_or("trained without labels")?
        .to_string();
    assert!(e.contains("missing/labels.json"), "{e}");
    Ok(())
}

/// Offline (stored) and online (teacher in the loop) soft labels give the same loss on the
/// same batch, up to the stored labels' quantisation.
#[test]
fn offline_and_online_kd_give_the_same_loss() -> R<()> {
    let model = common::test_model();
    let dir = tempfile::tempdir()?;
    let traces = dir.path().join("traces.jsonl");
    write_traces(&traces, "t", 4, 0)?;
    let labels_dir = dir.path().join("labels");
    label(&model, &traces, &labels_dir)?;
    let mut losses = Vec::new();
    for online in [false, true] {
        let mut cfg = config(&model, &traces, &dir.path().join(format!("o{online}")), 1);
        cfg.loss.kind = LossKind::CeKd;
        cfg.loss.alpha = 0.3;
        cfg.loss.temperature = 2.0;
        if online {
            cfg.loss.teacher = Some(model.clone());
        } else {
            cfg.loss.soft_labels = Some(labels_dir.clone());
        }
        let report = distill::train::train(&cfg, &quiet())?;
        let m = report.history.first().ok_or("no step")?.clone();
        losses.push((m.loss, m.kd.ok_or("no kd metric")?, m.ce.ok_or("no ce")?));
    }
    let ((l0, k0, c0), (l1, k1, c1)) = (losses[0], losses[1]);
    assert!(
        (c0 - c1).abs() < 1e-6 * c0,
        "same student, same cross-entropy: {c0} vs {c1}"
    );
    assert!(
        (k0 - k1).abs() < 1e-3 * (1.0 + k0.abs()),
        "kd offline {k0} vs online {k1}"
    );
    assert!((l0 - l1).abs() < 1e-3 * (1.0 + l0.abs()), "{l0} vs {l1}");
    // The model is its own teacher: the divergence of the untrained adapter is ~0.
    assert!(k0.abs() < 1e-2, "self-distillation starts at KL {k0}");
    Ok(())
}

/// A student cut from the teacher (`distill prune`) trained with CE+KD ends closer to the
/// teacher (held-out KL) than one trained with CE only for the same steps and data; feature
/// matching lowers its own loss.
#[test]
fn pruned_student_recovers_closer_to_the_teacher_with_kd() -> R<()> {
    let model = common::test_model();
    let dir = tempfile::tempdir()?;
    let pruned = dir.path().join("pruned");
    let o = common::distill()
        .args(["prune", "--layers", "24", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&pruned)
        .output()?;
    assert!(o.status.success(), "{}", common::stderr(&o));
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pruned.join("config.json"))?)?;
    assert_eq!(cfg_json["num_hidden_layers"], 24);

    let (train, held) = (
        dir.path().join("train.jsonl"),
        dir.path().join("held.jsonl"),
    );
    write_traces(&train, "t", 16, 0)?;
    write_traces(&held, "h", 6, 100)?;
    let (train_labels, held_labels) = (dir.path().join("lt"), dir.path().join("lh"));
    label(&model, &train, &train_labels)?;
    label(&model, &held, &held_labels)?;

    let measure = |adapter: Option<PathBuf>| {
        distance(&DistanceConfig {
            model: pruned.clone(),
            adapter,
            traces: held.clone(),
            labels: Some(held_labels.clone()),
            teacher: None,
            top_k: 64,
            chat_template: None,
            max_len: 256,
        })
    };
    let before = measure(None)?;
    let steps = 8;
    let mut kl = Vec::new();
    for kind in [LossKind::Ce, LossKind::CeKd] {
        let out = dir.path().join(format!("{kind:?}"));
        let mut cfg = config(&pruned, &train, &out, steps);
        cfg.loss.kind = kind;
        cfg.loss.alpha = 0.2;
        cfg.loss.soft_labels = Some(train_labels.clone());
        distill::train::train(&cfg, &quiet())?;
        kl.push(measure(Some(out))?);
    }
    let (ce, kd) = (&kl[0], &kl[1]);
    assert!(
        kd.kl.mean < ce.kl.mean && kd.kl.mean < before.kl.mean,
        "held-out KL: before {:.4}, CE {:.4}, CE+KD {:.4}",
        before.kl.mean,
        ce.kl.mean,
        kd.kl.mean
    );
    assert!(
        before.perplexity.mean > ce.perplexity.mean,
        "CE lowers perplexity"
    );

    // Feature matching with the teacher in the loop.
    let mut cfg = config(&pruned, &train, &dir.path().join("feat"), 6);
    cfg.loss.kind = LossKind::CeKd;
    cfg.loss.soft_labels = Some(train_labels.clone());
    cfg.loss.teacher = Some(model.clone());
    cfg.loss.feature_layers = 2;
    cfg.loss.feature_weight = 1.0;
    let report = distill::train::train(&cfg, &quiet())?;
    let f: Vec<f64> = report.history.iter().filter_map(|m| m.feature).collect();
    assert_eq!(f.len(), 6);
    assert!(
        f[f.len() - 1] < f[0],
        "feature loss does not go down: {f:?}"
    );
    Ok(())
}

/// Labels taken from the log-probabilities stored in the traces (`generate --logprobs K`, here
/// by distill's own engine) agree with labels scored teacher-forced by the same model, at every
/// generated position; a tokenizer the traces' tokens do not match is refused.
#[test]
fn labels_from_stored_logprobs_match_teacher_forced_labels() -> R<()> {
    let model = common::test_model();
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("p.jsonl");
    common::write_problems(&data, 6);
    let traces = dir.path().join("traces.jsonl");
    let o = common::distill()
        .args(["generate", "--teacher", "local", "--quiet", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(&data)
        .args(["--max-tokens", "24", "--logprobs", "8", "--out"])
        .arg(&traces)
        .output()?;
    assert!(o.status.success(), "{}", common::stderr(&o));
    let stored = dir.path().join("stored");
    let o = common::distill()
        .args(["label", "--quiet", "--from-trace-logprobs", "--model"])
        .arg(&model)
        .arg("--traces")
        .arg(&traces)
        .arg("--out")
        .arg(&stored)
        .output()?;
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    let scored = dir.path().join("scored");
    let o = common::distill()
        .args(["label", "--quiet", "--top-k", "8", "--model"])
        .arg(&model)
        .arg("--traces")
        .arg(&traces)
        .arg("--out")
        .arg(&scored)
        .output()?;
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (a, b) = (SoftLabels::open(&stored)?, SoftLabels::open(&scored)?);
    assert_eq!(
        a.meta().values,
        "raw",
        "the engine reports its raw distribution"
    );
    assert!(a.len() >= 4, "most traces align: {err}");
    let engine = Engine::load(&model, None)?;
    let enc = Encoder::new(ChatRenderer::new(engine.tokenizer().clone(), None)?, None)?;
    let mut compared = 0;
    for t in distill::trace::read_traces(&traces)? {
        let msgs = Encoder::trace_messages(&t).ok_or("no messages")?;
        let (sample, _) = enc.encode(&msgs, &t.id)?;
        let (mut ra, mut rb) = (SoftRows::new(8), SoftRows::new(8));
        if a.append_rows(&sample, &mut ra, 49152).is_err() {
            continue; // not aligned: skipped by the stored-logprobs path
        }
        b.append_rows(&sample, &mut rb, 49152)?;
        let generated = t.logprobs.as_ref().map_or(0, Vec::len).min(ra.len());
        for i in 0..generated {
            let ((ia, la), (ib, lb)) = (ra.row(i), rb.row(i));
            assert_eq!(ia[0], ib[0], "trace {} position {i}: top token", t.id);
            for (id, lp) in ia.iter().zip(la) {
                if let Some(j) = ib.iter().position(|x| x == id) {
                    assert!((lp - lb[j]).abs() < 2e-3, "position {i}: {lp} vs {}", lb[j]);
                    compared += 1;
                }
            }
        }
    }
    assert!(compared > 100, "only {compared} entries compared");

    // Token texts another tokenizer cannot map: nothing aligns, a clear error.
    let broken = dir.path().join("broken.jsonl");
    let text = std::fs::read_to_string(&traces)?.replace("\"token\":\"", "\"token\":\"§");
    std::fs::write(&broken, text)?;
    let o = common::distill()
        .args(["label", "--quiet", "--from-trace-logprobs", "--model"])
        .arg(&model)
        .arg("--traces")
        .arg(&broken)
        .arg("--out")
        .arg(dir.path().join("none"))
        .output()?;
    let err = common::stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("matches its encoding"), "{err}");
    Ok(())
}
