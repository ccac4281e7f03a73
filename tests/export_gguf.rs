//! `distill export --format gguf` on SmolLM2-135M-Instruct with a LoRA adapter merged: every
//! quantization loads in this project's engine and decodes what the f32 merged model decodes
//! (exactly at f16, the first tokens at q8_0), stays within a stated KL of it, keeps the
//! tokenizer and chat template, carries llama.cpp's metadata types, loads in mistral.rs, and
//! reads in the Python `gguf` package with the names, shapes and types llama.cpp expects.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use common::{distill, read_lines, stderr};
use distill::export::{self, GgufQuant};
use distill::infer::{BatchConfig, Completion, Engine, Request, SamplingParams};
use distill::model::load::BaseModel;
use distill::model::tokenizer::{ChatMessage, ChatTokenizer};

const QUANTS: [GgufQuant; 4] = [
    GgufQuant::F16,
    GgufQuant::Q8_0,
    GgufQuant::Q4KM,
    GgufQuant::Q4_0,
];

/// Held-out text for the KL: a GSM8K-style solution, prose and code.
const HELD_OUT: [&str; 3] = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether? In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips. The answer is 72.",
    "The mitochondria is the powerhouse of the cell. It produces energy in the form of ATP through cellular respiration, which takes place in several steps.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
];

/// A base model, a LoRA adapter with random B (so merging changes the model), and each
/// quantization of the merged model, exported once for all tests.
struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    adapter: PathBuf,
    files: HashMap<&'static str, PathBuf>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dev = Device::Cpu;
        let model = common::test_model();
        let base = BaseModel::from_gguf(&model, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let adapter =
            common::random_adapter(&base, &["q_proj", "k_proj", "down_proj"], 0.02, dir.path());
        std::fs::write(
            adapter.join("README.md"),
            "---\nlicense: apache-2.0\n---\n\n# Distilled student\n\n- `teacher-x`: licence `apache-2.0`\n",
        )
        .unwrap();
        let mut files = HashMap::new();
        for q in QUANTS {
            let out = dir.path().join(format!("student-{}.gguf", q.name()));
            let r = export::export_model(&model, Some(&adapter), q, &out).unwrap();
            eprintln!(
                "{}: {:.1} MB, {:?}",
                q.name(),
                r.file_bytes as f64 / 1e6,
                r.types
            );
            files.insert(q.name(), out);
        }
        Fixture {
            _dir: dir,
            model,
            adapter,
            files,
        }
    })
}

fn greedy_requests(e: &Engine) -> Vec<Request> {
    [
        "What is 2 + 3?",
        "Tom has 3 apples and buys 5 more. How many apples does he have now?",
        "Write one sentence about the sea.",
        "Count from one to five.",
    ]
    .iter()
    .map(|q| Request {
        prompt: e.encode_chat(&[ChatMessage::new("user", *q)]).unwrap(),
        params: SamplingParams {
            temperature: 0.0,
            max_tokens: 12,
            logprobs: true,
            top_logprobs: 2,
            ..SamplingParams::default()
        },
    })
    .collect()
}

fn decode(e: &Engine) -> Vec<Completion> {
    e.generate(greedy_requests(e), BatchConfig::default(), |_, _| {})
}

#[test]
fn every_quantization_decodes_like_the_f32_merged_model_within_a_stated_kl() {
    let f = fixture();
    let base = BaseModel::from_gguf(&f.model, &Device::Cpu).unwrap();
    let reference = Engine::from_base(&base, Some(&f.adapter)).unwrap();
    let want = decode(&reference);
    let texts: Vec<String> = HELD_OUT.iter().map(|s| s.to_string()).collect();
    // Measured here: f16 0.00000, q8_0 0.002, q4_k_m 0.06, q4_0 0.33 nats per token (on a model
    // that was Q4_1 to begin with); the bounds leave room, and order the types as they must be.
    // Greedy decoding: f16 and q8_0 follow the f32 model token for token until a position where
    // the f32 model's two best tokens are within `tie` nats (a near-tie that any rounding may
    // flip); f16 never diverges here.
    let bounds = [
        ("f16", 1e-4, 0.0),
        ("q8_0", 0.01, 0.25),
        ("q4_k_m", 0.2, f32::INFINITY),
        ("q4_0", 0.8, f32::INFINITY),
    ];
    let mut kls = Vec::new();
    for (name, bound, tie) in bounds {
        let path = &f.files[name];
        let e = Engine::load(path, None).unwrap();
        let got = decode(&e);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let Some(at) = a.tokens.iter().zip(&b.tokens).position(|(x, y)| x != y) else {
                continue;
            };
            let top = &b.logprobs[at].top;
            let margin = top[0].1 - top[1].1;
            assert!(
                margin <= tie,
                "{name}: prompt {i}: greedy token {at} differs from the f32 model's ({} vs {}) \
                 where its top-2 margin is {margin} nats",
                a.tokens[at],
                b.tokens[at]
            );
            eprintln!(
                "{name}: prompt {i} diverges at token {at} (f32 top-2 margin {margin:.3} nats)"
            );
        }
        let fid = export::fidelity::compare(&f.model, Some(&f.adapter), path, &texts).unwrap();
        eprintln!(
            "{name}: mean KL {:.5} nats/token (max {:.4}) over {} tokens, top-1 agreement {:.3}",
            fid.mean_kl, fid.max_kl, fid.tokens, fid.top1_agreement
        );
        assert!(fid.tokens > 100);
        assert!(
            fid.mean_kl <= bound,
            "{name}: mean KL {} above {bound}",
            fid.mean_kl
        );
        kls.push(fid.mean_kl);
    }
    // More bits, closer to the f32 model.
    assert!(
        kls[0] <= kls[1] && kls[1] <= kls[2] && kls[2] <= kls[3],
        "{kls:?}"
    );
    // Merging mattered: the base model alone is further from the merged one than q8_0 is.
    let unmerged = export::fidelity::compare(&f.model, Some(&f.adapter), &f.model, &texts).unwrap();
    assert!(
        unmerged.mean_kl > kls[1],
        "{} vs {}",
        unmerged.mean_kl,
        kls[1]
    );
}

#[test]
fn the_tokenizer_template_and_llama_cpp_metadata_types_survive() {
    let f = fixture();
    let path = &f.files["q8_0"];
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut src = std::fs::File::open(&f.model).unwrap();
    let original = gguf_file::Content::read(&mut src).unwrap();
    let ours = ChatTokenizer::from_gguf(&content, "export").unwrap();
    let theirs = ChatTokenizer::from_gguf(&original, "original").unwrap();
    for text in [
        "Hello world 12345, it's 3.14!",
        "<|im_start|>user\nWhat is 7*8?<|im_end|>\n",
        "  leading spaces\tand tabs\n\nnew lines",
        "naïve café — 東京",
    ] {
        assert_eq!(
            ours.encode(text, true).unwrap(),
            theirs.encode(text, true).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(ours.chat_template(), theirs.chat_template());
    assert_eq!(ours.bos_token(), theirs.bos_token());
    assert_eq!(ours.eos_token(), theirs.eos_token());

    let md = &content.metadata;
    let is_u32 = |k: &str| matches!(md.get(k), Some(gguf_file::Value::U32(_)));
    let is_f32 = |k: &str| matches!(md.get(k), Some(gguf_file::Value::F32(_)));
    for k in [
        "llama.context_length",
        "llama.embedding_length",
        "llama.block_count",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.dimension_count",
        "general.file_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
    ] {
        assert!(is_u32(k), "{k}: {:?}", md.get(k));
    }
    for k in [
        "llama.attention.layer_norm_rms_epsilon",
        "llama.rope.freq_base",
    ] {
        assert!(is_f32(k), "{k}: {:?}", md.get(k));
        assert_eq!(
            md.get(k).map(|v| v.to_f32().unwrap()),
            original.metadata.get(k).map(|v| v.to_f32().unwrap()),
            "{k}"
        );
    }
    let types = md["tokenizer.ggml.token_type"].to_vec().unwrap();
    assert!(types.iter().all(|t| matches!(t, gguf_file::Value::I32(_))));
    let tokens = md["tokenizer.ggml.tokens"].to_vec().unwrap();
    assert_eq!(
        tokens.len(),
        content.tensor_infos["token_embd.weight"].shape.dims()[0]
    );
    assert_eq!(md["general.license"].to_string().unwrap(), "apache-2.0");
    let description = md["general.description"].to_string().unwrap();
    assert!(description.contains("teacher-x"), "{description}");
    assert!(md.contains_key("distill.adapter"));
    // Tied embeddings stay tied; every tensor name is one llama.cpp knows.
    assert!(!content.tensor_infos.contains_key("output.weight"));
    for name in content.tensor_infos.keys() {
        assert!(
            distill::model::load::gguf_to_hf_name(name).is_some(),
            "{name}"
        );
    }
}

#[test]
fn the_exported_file_generates_in_mistral_rs() {
    let f = fixture();
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
        ])
        .arg(&f.files["q8_0"])
        .args([
            "--dataset",
            dataset,
            "--limit",
            "2",
            "--n",
            "1",
            "--max-tokens",
            "24",
        ])
        .args(["--temperature", "0", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let traces = read_lines(&out);
    assert_eq!(traces.len(), 2);
    for t in &traces {
        assert_eq!(t["teacher"]["engine"], "mistralrs");
        let c = t["completion"].as_str().unwrap_or("");
        assert!(!c.trim().is_empty(), "{t}");
        // The licence the export carries reaches the traces.
        assert_eq!(t["teacher"]["license"], "apache-2.0");
    }
}

/// A venv with the Python `gguf` package (llama.cpp's own reader), created once.
fn gguf_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/test-venv");
    let py = root.join("bin/python");
    let ok = |py: &Path| {
        Command::new(py)
            .args(["-c", "import gguf"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !ok(&py) {
        let s = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&root)
            .status()
            .expect("python3 -m venv");
        assert!(s.success(), "python3 -m venv {} failed", root.display());
        let s = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("gguf==0.19.0")
            .status()
            .expect("pip install gguf");
        assert!(s.success(), "pip install gguf==0.19.0 failed");
    }
    py
}

#[test]
fn the_python_gguf_reader_sees_llama_cpp_names_shapes_and_types() {
    let f = fixture();
    let py = gguf_python();
    let script = r#"
import json, sys, gguf
r = gguf.GGUFReader(sys.argv[1])
out = {"tensors": {t.name: [t.tensor_type.name, [int(d) for d in t.shape]] for t in r.tensors},
       "fields": {k: [v.name for v in f.types] for k, f in r.fields.items()},
       "arch": r.fields["general.architecture"].contents(),
       "blocks": r.fields["llama.block_count"].contents()}
print(json.dumps(out))
"#;
    for (name, want_matrix) in [("f16", "F16"), ("q8_0", "Q8_0"), ("q4_k_m", "Q4_K")] {
        let path = &f.files[name];
        let o = Command::new(&py)
            .args(["-c", script])
            .arg(path)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["arch"], "llama");
        assert_eq!(v["blocks"], 30);
        let tensors = v["tensors"].as_object().unwrap();
        assert_eq!(tensors.len(), 2 + 30 * 9, "{name}");
        // ggml order: [ne0 = in_features, ne1 = out_features].
        assert_eq!(
            tensors["token_embd.weight"][1],
            serde_json::json!([576, 49152])
        );
        assert_eq!(
            tensors["blk.0.attn_k.weight"][1],
            serde_json::json!([576, 192])
        );
        assert_eq!(
            tensors["blk.0.ffn_down.weight"][1],
            serde_json::json!([1536, 576])
        );
        assert_eq!(tensors["blk.0.attn_norm.weight"][0], "F32");
        assert_eq!(tensors["output_norm.weight"][0], "F32");
        let matrices = tensors
            .iter()
            .filter(|(k, _)| k.ends_with(".weight") && !k.contains("norm"))
            .filter(|(_, t)| t[0] == want_matrix)
            .count();
        assert!(
            matrices > 0,
            "{name}: no {want_matrix} matrices: {tensors:?}"
        );
        let fields = v["fields"].as_object().unwrap();
        assert_eq!(fields["llama.block_count"], serde_json::json!(["UINT32"]));
        assert_eq!(
            fields["llama.rope.freq_base"],
            serde_json::json!(["FLOAT32"])
        );
        assert_eq!(
            fields["tokenizer.ggml.token_type"],
            serde_json::json!(["ARRAY", "INT32"])
        );
    }
}
