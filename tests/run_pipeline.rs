//! `distill run` on a tiny random model and the loopback teacher: every stage runs, a second
//! run skips every stage, a changed filter rule reruns filter and what follows only, and a run
//! killed mid-stage resumes that stage.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use distill::fake_openai::{FakeConfig, FakeServer};
use distill::model::lora;

const VOCAB: usize = 64;
const HIDDEN: usize = 16;

/// A 2-layer random Llama with a word-level tokenizer and a chat template.
fn write_tiny_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::json!({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "vocab_size": VOCAB, "tie_word_embeddings": true, "license": "apache-2.0"
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let dev = Device::Cpu;
    let mut w: HashMap<String, Tensor> = HashMap::new();
    let mut put = |n: String, shape: &[usize], std: f64| {
        w.insert(n, Tensor::randn(0f32, std as f32, shape, &dev).unwrap());
    };
    put("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN], 1.0);
    put("model.norm.weight".into(), &[HIDDEN], 0.1);
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("self_attn.q_proj", [HIDDEN, HIDDEN]),
            ("self_attn.k_proj", [8, HIDDEN]),
            ("self_attn.v_proj", [8, HIDDEN]),
            ("self_attn.o_proj", [HIDDEN, HIDDEN]),
            ("mlp.gate_proj", [32, HIDDEN]),
            ("mlp.up_proj", [32, HIDDEN]),
            ("mlp.down_proj", [HIDDEN, 32]),
        ] {
            put(format!("{p}.{n}.weight"), &s, 0.3);
        }
        put(format!("{p}.input_layernorm.weight"), &[HIDDEN], 0.1);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[HIDDEN],
            0.1,
        );
    }
    for (k, v) in w.iter_mut() {
        if k.ends_with("norm.weight") {
            *v = (v.clone() + 1.0).unwrap();
        }
    }
    lora::save_safetensors(&w, &dir.join("model.safetensors")).unwrap();
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
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let tc = serde_json::json!({
        "eos_token": {"content": "w0"},
        "chat_template": "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}{% if add_generation_prompt %}assistant{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let _ = DType::F32;
}

const RULE_A: &str = r#"
[[rule]]
id = "no_zebra"
description = "Completions must not mention zebras."
field = "completion"
action = "reject_if_match"
pattern = "zebra"
examples.match = ["a zebra"]
examples.no_match = ["a horse"]
"#;

struct Setup {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

fn setup(base_url: &str, rule: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write_tiny_model(&p.join("tiny"));
    common::write_problems(&p.join("train.jsonl"), 6);
    common::write_problems(&p.join("held.jsonl"), 4);
    std::fs::write(p.join("rules.toml"), rule).unwrap();
    let config = p.join("run.toml");
    let text = format!(
        r#"
out_dir = "{out}"
model = "{model}"
[generate]
teacher = "openai"
base_url = ["{base_url}"]
model = "fake-teacher"
teacher_license = "gemma"
dataset = "{train}"
n = 2
max_tokens = 64
concurrency = 1
quiet = true
[filter]
checker = "math"
rules = ["{rules}"]
disable_rule = ["length"]
[train]
max_steps = 2
batch_size = 2
quiet = true
[eval]
dataset = "{held}"
max_tokens = 6
concurrency = 4
quiet = true
"#,
        out = p.join("out").display(),
        model = p.join("tiny").display(),
        train = p.join("train.jsonl").display(),
        held = p.join("held.jsonl").display(),
        rules = p.join("rules.toml").display(),
    );
    std::fs::write(&config, text).unwrap();
    Setup { dir, config }
}

fn run(s: &Setup) -> (bool, String) {
    let o = common::distill()
        .arg("run")
        .arg(&s.config)
        .output()
        .unwrap();
    (
        o.status.success(),
        common::stderr(&o) + &String::from_utf8_lossy(&o.stdout),
    )
}

fn skipped(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.strip_prefix("distill run: "))
        .filter_map(|l| l.strip_suffix(" unchanged, skipped"))
        .map(str::to_string)
        .collect()
}

#[test]
fn run_chains_skips_reruns_what_changed_and_resumes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(FakeServer::start(FakeConfig::default()))
        .unwrap();
    let s = setup(&server.base_url(), RULE_A);
    let out = s.dir.path().join("out");

    let (ok, log) = run(&s);
    assert!(ok, "{log}");
    assert!(skipped(&log).is_empty(), "{log}");
    for f in [
        "traces.jsonl",
        "filtered/kept.jsonl",
        "student/adapter_model.safetensors",
        "eval-base/summary.json",
        "eval-student/results.jsonl",
        "compare.json",
        "manifest.json",
        "report.html",
    ] {
        assert!(out.join(f).exists(), "{f} missing\n{log}");
    }
    assert!(log.contains("warning: teacher licence `gemma`"), "{log}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["teacher_license"], "gemma");
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(report.contains("Filter audit"), "the audit report");
    assert!(report.contains("held-out accuracy") && report.contains("training loss curve"));
    assert!(
        report.contains("paired p ="),
        "the comparison in the report"
    );
    let card = std::fs::read_to_string(out.join("student/README.md")).unwrap();
    assert!(
        card.contains("license: gemma") && card.contains("Model Derivative"),
        "{card}"
    );
    assert_eq!(manifest["stages"].as_array().unwrap().len(), 6);
    assert!(manifest["checker_version"]
        .as_str()
        .unwrap()
        .contains("grade"));
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("eval-student/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["n_problems"], 4);
    assert!(summary["model"]["adapter_sha256"].is_string());

    // Nothing changed: every stage is skipped.
    let (ok, log) = run(&s);
    assert!(ok, "{log}");
    assert_eq!(skipped(&log).len(), 6, "{log}");

    // A changed rule reruns filter and what depends on it, not generate or the base eval.
    std::fs::write(
        s.dir.path().join("rules.toml"),
        RULE_A.replace("zebra", "giraffe"),
    )
    .unwrap();
    let (ok, log) = run(&s);
    assert!(ok, "{log}");
    let mut sk = skipped(&log);
    sk.sort();
    assert_eq!(
        sk,
        vec!["eval-base".to_string(), "generate".to_string()],
        "{log}"
    );
}

#[test]
fn a_run_killed_mid_stage_resumes_that_stage() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(FakeServer::start(FakeConfig {
            latency: Duration::from_millis(400),
            ..FakeConfig::default()
        }))
        .unwrap();
    let s = setup(&server.base_url(), RULE_A);
    let traces = s.dir.path().join("out/traces.jsonl");
    let mut child = common::distill()
        .arg("run")
        .arg(&s.config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let lines = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
            .count()
    };
    while lines(&traces) < 3 {
        assert!(t.elapsed() < Duration::from_secs(60), "no traces written");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = lines(&traces);
    assert!(before < 12, "generate finished before the kill");
    let (ok, log) = run(&s);
    assert!(ok, "{log}");
    assert!(log.contains("distill run: generate (resuming)"), "{log}");
    let after = common::read_lines(&traces);
    assert_eq!(after.len(), 12);
    let ids: std::collections::HashSet<&str> =
        after.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 12, "duplicated samples after resume");
}

#[test]
fn a_deploy_table_lands_in_the_summary_and_the_report() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(FakeServer::start(FakeConfig::default()))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    common::write_problems(&p.join("train.jsonl"), 4);
    common::write_problems(&p.join("held.jsonl"), 2);
    let config = p.join("run.toml");
    let text = format!(
        r#"
out_dir = "{out}"
model = "{model}"
[generate]
teacher = "openai"
base_url = ["{url}"]
model = "fake-teacher"
dataset = "{train}"
n = 2
max_tokens = 64
quiet = true
[filter]
checker = "math"
disable_rule = ["length"]
[train]
max_steps = 1
batch_size = 2
quiet = true
[eval]
dataset = "{held}"
max_tokens = 4
quiet = true
[deploy]
quant = ["q8_0"]
speed_tokens = 4
"#,
        out = p.join("out").display(),
        model = common::test_model().display(),
        url = server.base_url(),
        train = p.join("train.jsonl").display(),
        held = p.join("held.jsonl").display(),
    );
    std::fs::write(&config, text).unwrap();
    let o = common::distill().arg("run").arg(&config).output().unwrap();
    let log = common::stderr(&o) + &String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("deployment:") && log.contains("| student q8_0 |"),
        "{log}"
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(p.join("out/deploy/deploy.json")).unwrap())
            .unwrap();
    let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().unwrap()).collect();
    // The teacher is a remote endpoint: no row of its own.
    assert_eq!(labels, ["student f32", "student q8_0"]);
    assert!(rows.iter().all(|r| r["problems"] == 2), "{rows:?}");
    let report = std::fs::read_to_string(p.join("out/report.html")).unwrap();
    assert!(
        report.contains("Deployment: teacher and student"),
        "the table in the report"
    );
    assert!(report.contains("student q8_0"));
    // Unchanged: the deploy stage is skipped like every other.
    let o = common::distill().arg("run").arg(&config).output().unwrap();
    let log = common::stderr(&o);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("distill run: deploy unchanged, skipped"),
        "{log}"
    );
}

/// A `[label]` table adds the soft-label stage between filter and train, and train then
/// distils (CE+KD on those labels); an unchanged rerun skips it like every other stage.
#[test]
fn a_label_table_makes_the_student_distil_from_soft_labels() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(FakeServer::start(FakeConfig::default()))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write_tiny_model(&p.join("tiny"));
    common::write_problems(&p.join("train.jsonl"), 4);
    common::write_problems(&p.join("held.jsonl"), 2);
    let config = p.join("run.toml");
    let text = format!(
        r#"
out_dir = "{out}"
model = "{model}"
[generate]
teacher = "openai"
base_url = ["{url}"]
model = "fake-teacher"
dataset = "{train}"
n = 2
max_tokens = 64
quiet = true
[filter]
checker = "math"
disable_rule = ["length"]
[label]
model = "{model}"
top_k = 8
quiet = true
[train]
max_steps = 2
batch_size = 2
quiet = true
[eval]
dataset = "{held}"
max_tokens = 4
quiet = true
"#,
        out = p.join("out").display(),
        model = p.join("tiny").display(),
        url = server.base_url(),
        train = p.join("train.jsonl").display(),
        held = p.join("held.jsonl").display(),
    );
    std::fs::write(&config, text).unwrap();
    let o = common::distill().arg("run").arg(&config).output().unwrap();
    let log = common::stderr(&o) + &String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("distill run: label (running)"), "{log}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("out/labels/labels.json")).unwrap())
            .unwrap();
    assert_eq!(meta["k"], 8);
    assert_eq!(meta["complete"], true);
    let metrics = common::read_lines(&p.join("out/student/metrics.jsonl"));
    assert!(
        metrics.iter().all(|m| m["kd"].is_number()),
        "train distils: {metrics:?}"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("out/manifest.json")).unwrap())
            .unwrap();
    let train_cmd = manifest["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "train")
        .unwrap()["command"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        train_cmd.contains("--loss ce+kd") && train_cmd.contains("--soft-labels"),
        "{train_cmd}"
    );
    let o = common::distill().arg("run").arg(&config).output().unwrap();
    let log = common::stderr(&o);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("distill run: label unchanged, skipped"),
        "{log}"
    );
}
