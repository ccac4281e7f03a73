//! `distill eval` on SmolLM2-135M: base + adapter decodes what the merged model decodes,
//! the output files and summary fields, `--compare`, and a licence read from GGUF metadata.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use distill::model::load::BaseModel;
use distill::model::lora::{self, LoraConfig};

fn eval(model: &Path, extra: &[&str], out: &Path) -> String {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/datasets/arith_tiny.jsonl");
    let o = common::distill()
        .args(["eval", "--quiet", "--model"])
        .arg(model)
        .args([
            "--dataset",
            data,
            "--max-tokens",
            "24",
            "--concurrency",
            "8",
        ])
        .args(extra)
        .arg("--out-dir")
        .arg(out)
        .output()
        .unwrap();
    let text = common::stderr(&o) + &String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    text
}

fn completions(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = common::read_lines(&dir.join("traces.jsonl"))
        .iter()
        .map(|t| {
            (
                t["problem_id"].as_str().unwrap().to_string(),
                t["completion"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn eval_of_base_plus_adapter_equals_the_merged_model_and_compares() {
    let dev = Device::Cpu;
    let gguf = common::test_model();
    let base = BaseModel::from_gguf(&gguf, &dev).unwrap();
    let vm = VarMap::new();
    let lc = LoraConfig {
        r: 4,
        ..Default::default()
    };
    base.student(Some((&vm, lc.clone())), DType::F32, &dev)
        .unwrap();
    {
        let data = vm.data().lock().unwrap();
        for (name, var) in data.iter() {
            if name.contains(".lora_B.") {
                var.set(&Tensor::randn(0f32, 0.01, var.shape(), &dev).unwrap())
                    .unwrap();
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    lora::save_adapter(&adapter, &vm, &lc).unwrap();
    let merged = tmp.path().join("merged");
    base.save_merged(&merged, Some((&lc, &vm)), None).unwrap();

    let (a, b, c) = (
        tmp.path().join("base"),
        tmp.path().join("with-adapter"),
        tmp.path().join("merged-eval"),
    );
    let log = eval(&gguf, &[], &a);
    assert!(log.contains("pass@1"), "{log}");
    eval(&gguf, &["--adapter", adapter.to_str().unwrap()], &b);
    eval(&merged, &[], &c);
    assert_eq!(completions(&b), completions(&c), "adapter vs merged");

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("summary.json")).unwrap()).unwrap();
    for key in [
        "n_problems",
        "n_samples",
        "pass@1",
        "pass@1_ci95",
        "pass_at_k",
        "maj_at_k",
        "model",
        "checker_version",
        "sampling",
    ] {
        assert!(!summary[key].is_null(), "summary lacks {key}: {summary}");
    }
    assert_eq!(summary["n_problems"], 8);
    assert_eq!(
        summary["sampling"]["temperature"], 0.0,
        "eval is greedy by default"
    );
    assert_eq!(summary["model"]["engine"], "candle");
    assert!(summary["model"]["adapter_sha256"].is_string());
    assert_eq!(
        common::read_lines(&b.join("results.jsonl")).len(),
        8,
        "one result line per problem"
    );
    // Rerunning resumes: nothing is generated again.
    let again = eval(&gguf, &["--adapter", adapter.to_str().unwrap()], &b);
    assert!(again.contains("0 tokens"), "{again}");

    // The merged model against itself through the adapter: no difference.
    let o = common::distill()
        .args(["eval", "--compare"])
        .arg(&b)
        .arg(&c)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let cmp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.join("compare.json")).unwrap()).unwrap();
    assert_eq!(cmp["delta"], 0.0);
    assert_eq!(cmp["p_value"], 1.0);
    assert_eq!(
        (cmp["wins"].as_u64(), cmp["losses"].as_u64()),
        (Some(0), Some(0))
    );
}

#[test]
fn a_restrictive_licence_in_gguf_metadata_warns_and_is_recorded() {
    let src = common::test_model();
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("gemma-licensed.gguf");
    {
        let mut f = std::fs::File::open(&src).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        let mut metadata: Vec<(String, gguf_file::Value)> = content
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        metadata.push((
            "general.license".into(),
            gguf_file::Value::String("gemma".into()),
        ));
        let tensors: Vec<(String, candle_core::quantized::QTensor)> = content
            .tensor_infos
            .keys()
            .map(|n| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap()))
            .collect();
        let md: Vec<(&str, &gguf_file::Value)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &candle_core::quantized::QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut out = std::fs::File::create(&dst).unwrap();
        gguf_file::write(&mut out, &md, &ts).unwrap();
    }
    let data = tmp.path().join("p.jsonl");
    common::write_problems(&data, 1);
    let o = common::distill()
        .args(["generate", "--quiet", "--model"])
        .arg(&dst)
        .arg("--dataset")
        .arg(&data)
        .args(["--max-tokens", "4", "--out"])
        .arg(tmp.path().join("t.jsonl"))
        .output()
        .unwrap();
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("warning: teacher licence `gemma`"), "{err}");
    let t = common::read_lines(&tmp.path().join("t.jsonl"));
    assert_eq!(t[0]["teacher"]["license"], "gemma");
}
