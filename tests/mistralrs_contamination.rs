//! Cross-sequence contamination on the mistral.rs engine: 8 different prompts sampled
//! deterministically (top-k 1 at temperature 0.7) must give what each gives alone.
//!
//! mistral.rs 0.8.1 fails this when the 8 requests are batched (its CPU sampling path mixes
//! sequences up), so `distill generate --engine mistralrs` sends one request at a time; this
//! test checks both: that the check catches the raw batched engine, and that distill's path
//! through the same engine is clean.

mod common;

use mistralrs::{
    GgufModelBuilder, Model, RequestBuilder, SamplingParams, TextMessageRole, TokenSource,
};

const QUESTIONS: [&str; 8] = [
    "Melanie paints the orange house. What color is the house?",
    "What is 12 + 30?",
    "Name three animals that live in the sea.",
    "Write a short sentence about trains.",
    "What is the capital of Italy?",
    "Count from five down to one.",
    "Explain what a triangle is.",
    "A box holds 6 eggs. How many eggs are in 4 boxes?",
];

fn params() -> SamplingParams {
    SamplingParams {
        temperature: Some(0.7),
        top_k: Some(1),
        max_len: Some(24),
        ..SamplingParams::neutral()
    }
}

async fn ask(model: &Model, q: &str) -> String {
    let rb = RequestBuilder::new()
        .add_message(TextMessageRole::User, q)
        .set_sampling(params());
    let r = model.send_chat_request(rb).await.unwrap();
    r.choices[0].message.content.clone().unwrap_or_default()
}

#[test]
fn batched_mistralrs_sampling_is_caught_and_distill_serialises_it() {
    let path = common::test_model();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (alone, together) = rt.block_on(async {
        let dir = path.parent().unwrap().to_string_lossy().into_owned();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let model = GgufModelBuilder::new(dir, vec![file])
            .with_token_source(TokenSource::None)
            .with_force_cpu()
            .with_max_num_seqs(8)
            .build()
            .await
            .unwrap();
        let mut alone = Vec::new();
        for q in QUESTIONS {
            alone.push(ask(&model, q).await);
        }
        let together = futures::future::join_all(QUESTIONS.iter().map(|q| ask(&model, q))).await;
        (alone, together)
    });
    let differing: Vec<usize> = (0..8).filter(|&i| alone[i] != together[i]).collect();
    println!(
        "mistral.rs batched at 8: {} of 8 completions differ from alone",
        differing.len()
    );
    for &i in &differing {
        println!(
            "  [{i}] alone:    {:?}\n      together: {:?}",
            alone[i], together[i]
        );
    }
    // If this starts failing, mistral.rs batches cleanly and `--engine mistralrs` may run
    // concurrent sequences again.
    assert!(
        !differing.is_empty(),
        "the contamination check no longer catches mistral.rs's batched sampling"
    );

    // distill's mistral.rs path at --concurrency 8: one sequence at a time, clean.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("q.jsonl");
    let rows: String = QUESTIONS
        .iter()
        .enumerate()
        .map(|(i, q)| {
            format!(
                "{}\n",
                serde_json::json!({"id": format!("q{i}"), "problem": q, "answer": "0"})
            )
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let run = |out: &str, concurrency: &str| {
        let o = common::distill()
            .args([
                "generate",
                "--teacher",
                "local",
                "--engine",
                "mistralrs",
                "--quiet",
            ])
            .arg("--model")
            .arg(&path)
            .arg("--dataset")
            .arg(&data)
            .args([
                "--preset",
                "math",
                "--temperature",
                "0.6",
                "--max-tokens",
                "24",
            ])
            .args(["--concurrency", concurrency, "--out"])
            .arg(tmp.path().join(out))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", common::stderr(&o));
        let mut v: Vec<(String, String)> = common::read_lines(&tmp.path().join(out))
            .iter()
            .map(|t| {
                (
                    t["problem_id"].as_str().unwrap().to_string(),
                    t["completion"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.sort();
        (v, common::stderr(&o))
    };
    let (eight, err) = run("c8.jsonl", "8");
    assert!(err.contains("one sequence at a time"), "{err}");
    let (one, _) = run("c1.jsonl", "1");
    assert_eq!(eight, one, "distill's mistral.rs path mixed sequences up");
}
