//! The embedded mistral.rs engine generates real completions from SmolLM2-135M-Instruct.

mod common;

use std::sync::Arc;

use common::{distill, read_lines, stderr, test_model};
use distill::data::dataset::{self, FieldMap, Preset};
use distill::data::prompt::PromptTemplate;
use distill::generate::{self, GenerateConfig};
use distill::teacher::local::{LocalConfig, LocalTeacher};
use distill::teacher::Teacher;
use distill::trace::Sampling;

#[test]
fn cli_generates_real_traces_with_the_embedded_engine() {
    let model = test_model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("traces.jsonl");
    let dataset = concat!(env!("CARGO_MANIFEST_DIR"), "/datasets/arith_tiny.jsonl");
    let o = distill()
        .args([
            "generate",
            "--teacher",
            "local",
            "--engine",
            "mistralrs",
            "--model",
            model.to_str().unwrap(),
            "--dataset",
            dataset,
            "--limit",
            "2",
            "--n",
            "1",
            "--max-tokens",
            "40",
            "--temperature",
            "0",
            "--seed",
            "1",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r = read_lines(&out);
    assert_eq!(r.len(), 2);
    for t in &r {
        let c = t["completion"].as_str().unwrap();
        assert!(!c.trim().is_empty(), "empty completion: {t}");
        assert!(matches!(
            t["finish_reason"].as_str(),
            Some("stop" | "length")
        ));
        assert!(t["usage"]["completion_tokens"].as_u64().unwrap() > 0);
        assert!(t["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
        assert_eq!(t["teacher"]["backend"], "local");
        assert_eq!(
            t["teacher"]["file_sha256"],
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        );
        // mistral.rs has no per-request seed; the record says so.
        assert_eq!(t["sampling"]["seed_honoured"], false);
        assert_eq!(t["teacher"]["engine"], "mistralrs");
    }
    assert!(stderr(&o).contains("teacher local:"), "{}", stderr(&o));
}

#[test]
fn logprobs_are_natural_log_probabilities() {
    let model = test_model();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let teacher = LocalTeacher::load(&LocalConfig {
            model: model.to_string_lossy().into_owned(),
            model_file: None,
            revision: None,
            max_num_seqs: 2,
            force_cpu: true,
            chat_template: None,
        })
        .await
        .unwrap();
        let ds = dataset::load(
            std::path::Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/datasets/arith_tiny.jsonl"
            )),
            Preset::Gsm8k,
            &FieldMap::default(),
            false,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("t.jsonl");
        let cfg = GenerateConfig {
            n: 1,
            sampling: Sampling {
                temperature: 1.0,
                top_p: 1.0,
                max_tokens: 12,
                stop: vec![],
                seed: None,
                seed_honoured: None,
                top_logprobs: 5,
            },
            concurrency: 1,
            out: out.clone(),
            progress: false,
        };
        let teacher: Arc<dyn Teacher> = Arc::new(teacher);
        let s = generate::run(
            &ds.problems[..1],
            &PromptTemplate::load("gsm8k").unwrap(),
            teacher,
            &cfg,
        )
        .await
        .unwrap();
        assert_eq!(s.samples_ok, 1);
        let r = read_lines(&out);
        let lps = r[0]["logprobs"].as_array().unwrap();
        assert!(!lps.is_empty());
        for lp in lps {
            let top: Vec<f64> = lp["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t[1].as_f64().unwrap())
                .collect();
            assert_eq!(top.len(), 5);
            // In nats the top-5 probabilities of a full softmax sum to at most 1; read as log10
            // they would not (e.g. ln p = -0.3 gives 0.74 in nats but 10^-0.3 = 0.5).
            let mass: f64 = top.iter().map(|l| l.exp()).sum();
            assert!(
                mass <= 1.0 + 1e-3 && mass > 0.2,
                "top-5 mass {mass} from {top:?}"
            );
            assert!(
                top.windows(2).all(|w| w[0] >= w[1] - 1e-6),
                "not sorted: {top:?}"
            );
        }
    });
}
