//! `distill bench deploy`: the teacher, the f32 student (base + adapter) and a quantized export
//! of it measured side by side on the same held-out problems, each row in its own process.

mod common;

use candle_core::Device;
use common::{distill, stderr};
use distill::model::load::BaseModel;

#[test]
fn the_table_has_a_row_per_model_measured_on_the_same_problems() {
    let dev = Device::Cpu;
    let model = common::test_model();
    let base = BaseModel::from_gguf(&model, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let adapter = common::random_adapter(&base, &["q_proj", "v_proj"], 0.01, dir.path());
    let problems = dir.path().join("held.jsonl");
    common::write_problems(&problems, 3);
    let out = dir.path().join("deploy");
    let o = distill()
        .args(["bench", "deploy", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--teacher")
        .arg(&model)
        .args(["--quant", "q8_0", "--speed-tokens", "4", "--out-dir"])
        .arg(&out)
        .args(["--", "--dataset"])
        .arg(&problems)
        .args(["--preset", "gsm8k", "--max-tokens", "8", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("deploy.json")).unwrap()).unwrap();
    let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["teacher", "student f32", "student q8_0"]);
    for r in &rows {
        assert_eq!(r["problems"], 3, "{r}");
        let p = r["pass_at_1"].as_f64().unwrap();
        let (lo, hi) = (
            r["ci95"][0].as_f64().unwrap(),
            r["ci95"][1].as_f64().unwrap(),
        );
        assert!(lo <= p && p <= hi, "{r}");
        for k in [0, 1] {
            assert!(r["decode_tok_s"][k].as_f64().unwrap() > 0.0, "{r}");
        }
        assert!(r["ttft_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peak_rss_mb"].as_f64().unwrap() > 100.0, "{r}");
    }
    // The q8_0 file is a quarter of the f32 weights, and it is what the row measured.
    let f32_bytes = rows[1]["bytes"].as_f64().unwrap();
    let q8_bytes = rows[2]["bytes"].as_f64().unwrap();
    assert!(q8_bytes < 0.3 * f32_bytes, "{q8_bytes} vs {f32_bytes}");
    let q8_file = out.join("student-q8_0.gguf");
    assert_eq!(std::fs::metadata(&q8_file).unwrap().len() as f64, q8_bytes);
    assert_eq!(rows[2]["model"], q8_file.display().to_string());
    let md = std::fs::read_to_string(out.join("deploy.md")).unwrap();
    assert_eq!(md.lines().count(), 2 + 3, "{md}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("| student q8_0 |"));
}
