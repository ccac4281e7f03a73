//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `distill` binary built for this test run.
pub fn distill() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
    c.env("RUST_LOG", "warn").env("NO_COLOR", "1");
    c
}

/// Writes `n` GSM8K-shaped problems with distinct numbers to `path`.
pub fn write_problems(path: &Path, n: usize) {
    let mut s = String::new();
    for i in 0..n {
        let row = serde_json::json!({
            "id": format!("p{i}"),
            "question": format!("What is {} + {}?", i, 2 * i + 1),
            "answer": format!("#### {}", 3 * i + 1),
        });
        s.push_str(&row.to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// Parses a trace file line by line (panics on a bad line: tests want exact files).
pub fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// stderr of a finished command as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The SmolLM2-135M-Instruct GGUF fetched by `scripts/fetch-test-model.sh`.
/// `DISTILL_TEST_MODEL` overrides the path.
pub fn test_model() -> PathBuf {
    if let Ok(p) = std::env::var("DISTILL_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("DISTILL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache"));
    let p = cache.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "test model missing at {}: run scripts/fetch-test-model.sh (the README's test command does)",
        p.display()
    );
    p
}

/// A LoRA adapter for `base` on `targets` with random `lora_B` (standard deviation `std`), so
/// that it changes what the model says, saved under `dir`; returns its directory.
pub fn random_adapter(
    base: &distill::model::load::BaseModel,
    targets: &[&str],
    std: f32,
    dir: &Path,
) -> PathBuf {
    use candle_core::{DType, Device, Tensor};
    use distill::model::lora::{self, LoraConfig};
    let dev = Device::Cpu;
    let vm = candle_nn::VarMap::new();
    let lc = LoraConfig {
        r: 4,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    base.student(Some((&vm, lc.clone())), DType::F32, &dev)
        .unwrap();
    for (name, var) in vm.data().lock().unwrap().iter() {
        if name.contains(".lora_B.") {
            var.set(&Tensor::randn(0f32, std, var.shape(), &dev).unwrap())
                .unwrap();
        }
    }
    let out = dir.join("adapter");
    lora::save_adapter(&out, &vm, &lc).unwrap();
    out
}
