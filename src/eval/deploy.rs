//! The deployment table: what distillation and quantization bought, side by side.
//!
//! For the teacher, the student in f32 (base + adapter) and the student exported at each
//! quantization: accuracy on the same held-out problems with its interval (`distill eval`), decode
//! tokens/s at 1 and at 32 sequences, time to first token and peak memory (`distill bench
//! engine`), and the size of what one deploys. Every measurement runs in its own process, so
//! each row's peak memory is its own and one model's caches cannot flatter the next.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::export::GgufQuant;

/// Flags of `distill bench deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The student's base model (GGUF or Hugging Face directory).
    #[arg(long)]
    pub model: PathBuf,
    /// The student's LoRA adapter (`distill train --out`).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The teacher, when it is a local model (a row of its own).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Quantized exports of the student to measure (each also written as a GGUF file).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "q8_0,q4_k_m")]
    pub quant: Vec<GgufQuant>,
    /// Output directory: the exported files, each row's evaluation, deploy.json, deploy.md.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Tokens decoded per sequence in the speed measurement.
    #[arg(long, default_value_t = 32)]
    pub speed_tokens: usize,
    /// `distill eval` flags for the accuracy column (dataset, preset, prompt, max tokens...),
    /// after `--`.
    #[arg(last = true, required = true)]
    pub eval_args: Vec<String>,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct DeployRow {
    /// `teacher`, `student f32`, `student q8_0`, ...
    pub label: String,
    /// What was loaded.
    pub model: String,
    /// The adapter folded in, for the f32 student.
    pub adapter: Option<String>,
    /// Bytes one deploys: the file, or the f32 weights for the student with its adapter.
    pub bytes: u64,
    /// Held-out pass@1 and its 95% interval.
    pub pass_at_1: f64,
    /// Lower and upper bounds of the interval.
    pub ci95: (f64, f64),
    /// Problems evaluated.
    pub problems: u64,
    /// Aggregate decode tokens/s at 1 and at 32 sequences.
    pub decode_tok_s: (f64, f64),
    /// Time to first token of one request (prompt of a few dozen tokens), seconds.
    pub ttft_s: f64,
    /// Peak resident memory of the speed run (32 sequences), MB.
    pub peak_rss_mb: f64,
}

fn size_of(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|d| d.flatten().map(|e| size_of(&e.path())).sum())
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}

fn run_distill(args: &[String]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the distill binary")?;
    let status = Command::new(exe)
        .args(args)
        .status()
        .with_context(|| format!("running distill {}", args.join(" ")))?;
    if !status.success() {
        bail!("`distill {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text).with_context(|| path.display().to_string())
}

/// Measures one row: its evaluation (resumed if already there) and its speed.
fn measure(
    a: &DeployArgs,
    label: &str,
    model: &Path,
    adapter: Option<&Path>,
) -> anyhow::Result<DeployRow> {
    let slug: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    eprintln!("deploy: {label}: evaluating");
    let eval_dir = a.out_dir.join(format!("eval-{slug}"));
    let mut args = vec!["eval".to_string()];
    args.extend(a.eval_args.iter().cloned());
    args.extend(["--model".into(), model.display().to_string()]);
    if let Some(ad) = adapter {
        args.extend(["--adapter".into(), ad.display().to_string()]);
    }
    args.extend(["--out-dir".into(), eval_dir.display().to_string()]);
    run_distill(&args)?;
    let summary = read_json(&eval_dir.join("summary.json"))?;
    eprintln!("deploy: {label}: measuring speed");
    let speed_path = a.out_dir.join(format!("speed-{slug}.json"));
    let mut args = vec![
        "bench".to_string(),
        "engine".into(),
        "--quick".into(),
        "--no-mistralrs".into(),
        "--seqs".into(),
        "1,32".into(),
        "--max-tokens".into(),
        a.speed_tokens.to_string(),
        "--model".into(),
        model.display().to_string(),
        "--json".into(),
        speed_path.display().to_string(),
    ];
    if let Some(ad) = adapter {
        args.extend(["--adapter".into(), ad.display().to_string()]);
    }
    run_distill(&args)?;
    let speed = read_json(&speed_path)?;
    let row = |seqs: u64| {
        speed["rows"]
            .as_array()
            .and_then(|r| r.iter().find(|x| x["seqs"].as_u64() == Some(seqs)))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let (one, many) = (row(1), row(32));
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    Ok(DeployRow {
        label: label.to_string(),
        model: model.display().to_string(),
        adapter: adapter.map(|p| p.display().to_string()),
        // The unmerged student deploys as f32 weights (what the engine holds); a file deploys
        // as itself.
        bytes: if adapter.is_some() {
            (f(&speed["weights_mb"]) * 1e6) as u64
        } else {
            size_of(model)
        },
        pass_at_1: f(&summary["pass@1"]),
        ci95: (f(&summary["pass@1_ci95"][0]), f(&summary["pass@1_ci95"][1])),
        problems: summary["n_problems"].as_u64().unwrap_or(0),
        decode_tok_s: (f(&one["decode_tok_s"]), f(&many["decode_tok_s"])),
        ttft_s: f(&one["ttft_s"]),
        peak_rss_mb: f(&many["peak_rss_mb"]),
    })
}

/// The table as Markdown.
pub fn markdown(rows: &[DeployRow]) -> String {
    let mut s = String::from(
        "| model | pass@1 [95% CI] | decode tok/s, 1 seq | decode tok/s, 32 seqs | time to first token | size | peak RSS |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.1}% [{:.1}, {:.1}] (n={}) | {:.1} | {:.1} | {:.0} ms | {:.1} MB | {:.0} MB |\n",
            r.label,
            100.0 * r.pass_at_1,
            100.0 * r.ci95.0,
            100.0 * r.ci95.1,
            r.problems,
            r.decode_tok_s.0,
            r.decode_tok_s.1,
            1000.0 * r.ttft_s,
            r.bytes as f64 / 1e6,
            r.peak_rss_mb
        ));
    }
    s
}

/// Exports the student at each quantization, measures every row, writes `deploy.json` and
/// `deploy.md` into the output directory and returns the rows.
pub fn deploy(a: &DeployArgs) -> anyhow::Result<Vec<DeployRow>> {
    for flag in ["--model", "--adapter", "--out-dir"] {
        if a.eval_args
            .iter()
            .any(|x| x == flag || x.starts_with(&format!("{flag}=")))
        {
            bail!(
                "the `distill eval` flags after `--` must not set {flag}: each row's model, \
                 adapter and output directory are set by `bench deploy`"
            );
        }
    }
    std::fs::create_dir_all(&a.out_dir).with_context(|| a.out_dir.display().to_string())?;
    let mut rows = Vec::new();
    if let Some(t) = &a.teacher {
        rows.push(measure(a, "teacher", t, None)?);
    }
    rows.push(measure(a, "student f32", &a.model, Some(&a.adapter))?);
    for &q in &a.quant {
        let file = a.out_dir.join(format!("student-{}.gguf", q.name()));
        eprintln!("deploy: exporting {}", file.display());
        let r = crate::export::export_model(&a.model, Some(&a.adapter), q, &file)?;
        rows.push(measure(a, &format!("student {}", q.name()), &r.path, None)?);
    }
    let json = serde_json::to_vec_pretty(&rows)?;
    crate::trace::write_atomically(&a.out_dir.join("deploy.json"), &json)?;
    crate::trace::write_atomically(&a.out_dir.join("deploy.md"), markdown(&rows).as_bytes())?;
    Ok(rows)
}
