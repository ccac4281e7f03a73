//! `distill export --format trl|sharegpt|axolotl`: each export follows its tool's schema, reads
//! back to the conversation `distill train` trains on, and renders (with SmolLM2's chat
//! template) to the same training text; a changed record or a broken schema is caught.

mod common;

use std::path::Path;

use common::{distill, read_lines, stderr};
use distill::export::traces::{self, check_schema, TraceFormat};
use distill::model::load::BaseModel;
use distill::train::data::ChatRenderer;
use serde_json::{json, Value};

fn trace(id: &str, messages: Value, completion: Option<&str>, extra: Value) -> Value {
    let mut t = json!({
        "id": id, "problem_id": id, "sample_index": 0,
        "reference": {"answer": "7"},
        "messages": messages,
        "completion": completion,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 20, "completion_tokens": 60},
        "teacher": {"backend": "openai", "model": "m"},
        "sampling": {"temperature": 0.6, "top_p": 0.95, "max_tokens": 512},
        "latency_ms": 5, "attempts": 1, "created_at": "2026-01-01T00:00:00Z", "schema_version": 1
    });
    if completion.is_none() {
        t.as_object_mut().unwrap().remove("completion");
        t["error"] = json!({"kind": "timeout", "message": "timed out"});
        t["finish_reason"] = Value::Null;
    }
    if let (Value::Object(t), Value::Object(e)) = (&mut t, extra) {
        t.extend(e);
    }
    t
}

/// Kept traces: reasoning inline, reasoning in its own field, a system prompt, unicode and
/// JSON-hostile text, and one failed sample (which has nothing to train on).
fn write_kept(path: &Path) {
    let user = |q: &str| json!([{"role": "user", "content": q}]);
    let rows = [
        trace(
            "a",
            user("Janet has 3 apples and buys 4 more. How many?"),
            Some("<think>\n3 + 4 = 7\n</think>\nShe has \\boxed{7} apples."),
            json!({}),
        ),
        trace(
            "b",
            user("What is 6 × 7?"),
            Some("6 × 7 = 42, so the answer is \\boxed{42}."),
            json!({"reasoning": "Six sevens: 7+7+7+7+7+7 = 42. \"Quotes\" and\ttabs.", "reasoning_source": "field"}),
        ),
        trace(
            "c",
            json!([{"role": "system", "content": "You are a careful tutor. Think step by step."},
                   {"role": "user", "content": "Write a function that adds two numbers."}]),
            Some("```python\ndef add(a, b):\n    return a + b\n```"),
            json!({}),
        ),
        trace("d", user("Never answered"), None, json!({})),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn each_format_follows_its_schema_and_renders_the_training_text() {
    let dir = tempfile::tempdir().unwrap();
    let kept = dir.path().join("kept.jsonl");
    write_kept(&kept);
    let model = common::test_model();
    for (format, file) in [
        ("trl", "train.trl.jsonl"),
        ("sharegpt", "train.sharegpt.jsonl"),
        ("axolotl", "train.axolotl.jsonl"),
    ] {
        let out = dir.path().join(file);
        let o = distill()
            .args(["export", "--format", format, "--traces"])
            .arg(&kept)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(0), "{format}: {err}");
        assert!(err.contains("3 records"), "{err}");
        assert!(err.contains("1 failed samples skipped"), "{err}");
        assert!(
            err.contains("render to the same training text"),
            "{format}: {err}"
        );
        let records = read_lines(&out);
        assert_eq!(records.len(), 3);
        let fmt = match format {
            "trl" => TraceFormat::Trl,
            "sharegpt" => TraceFormat::Sharegpt,
            _ => TraceFormat::Axolotl,
        };
        for r in &records {
            check_schema(fmt, r).unwrap_or_else(|e| panic!("{format}: {e}: {r}"));
        }
        // Reasoning from its own field becomes the <think> block distill trains on.
        let second = records[1].to_string();
        assert!(
            second.contains("<think>\\nSix sevens"),
            "{format}: {second}"
        );
        match format {
            "sharegpt" => {
                assert_eq!(
                    records[2]["system"],
                    "You are a careful tutor. Think step by step."
                );
                assert_eq!(records[2]["conversations"][0]["from"], "human");
                let info: Value = serde_json::from_str(
                    &std::fs::read_to_string(dir.path().join("dataset_info.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(info["distill"]["formatting"], "sharegpt");
                assert_eq!(info["distill"]["file_name"], file);
            }
            "axolotl" => {
                let yml = std::fs::read_to_string(out.with_extension("axolotl.yml")).unwrap();
                assert!(yml.contains("type: chat_template"), "{yml}");
                assert!(yml.contains(file), "{yml}");
            }
            _ => {
                assert_eq!(records[2]["messages"][0]["role"], "system");
                assert!(out.with_extension("trl.py").is_file());
            }
        }
    }
}

#[test]
fn a_changed_record_or_a_broken_schema_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let kept = dir.path().join("kept.jsonl");
    write_kept(&kept);
    let out = dir.path().join("train.jsonl");
    let r = traces::export_traces(&kept, TraceFormat::Sharegpt, &out).unwrap();
    assert_eq!((r.records, r.skipped), (3, 1));
    let base = BaseModel::load(&common::test_model(), &candle_core::Device::Cpu).unwrap();
    let renderer = ChatRenderer::new(base.tokenizer, None).unwrap();
    let ok = traces::verify(&kept, &out, TraceFormat::Sharegpt, Some(&renderer)).unwrap();
    assert!(ok.mismatches.is_empty() && ok.rendered, "{ok:?}");

    // One changed character in an answer.
    let text = std::fs::read_to_string(&out).unwrap();
    std::fs::write(&out, text.replacen("\\\\boxed{42}", "\\\\boxed{43}", 1)).unwrap();
    let bad = traces::verify(&kept, &out, TraceFormat::Sharegpt, Some(&renderer)).unwrap();
    assert_eq!(
        bad.mismatches,
        vec!["line 2: conversation differs".to_string()]
    );

    // Turns out of LLaMA-Factory's human/gpt order: an error naming the file and line.
    let mut v: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    v["conversations"][0]["from"] = json!("gpt");
    std::fs::write(&out, format!("{v}\n")).unwrap();
    let err = traces::verify(&kept, &out, TraceFormat::Sharegpt, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("train.jsonl:1") && msg.contains("`from` must be `human`"),
        "{msg}"
    );

    // A TRL record must end with the assistant's turn.
    assert!(check_schema(
        TraceFormat::Trl,
        &json!({"messages": [{"role": "user", "content": "hi"}]})
    )
    .is_err());
}
