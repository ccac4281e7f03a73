//! `distill run CONFIG.toml`: generate → filter → train → eval of the base and of the student
//! → compare, each stage skipped when its inputs and settings are unchanged and resumed when
//! it was interrupted.
//!
//! The config has one table per stage whose keys are that subcommand's flags (`max_tokens =
//! 128` is `--max-tokens 128`, `true` a bare flag, arrays repeat the flag), so every flag a
//! stage has is available here with the same name and meaning, and nothing is re-implemented:
//! each stage runs exactly as the command would.
//!
//! ```toml
//! out_dir = "runs/quickstart"
//! model = ".cache/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
//! [generate]                       # teacher traces (model defaults to the top-level one)
//! dataset = "datasets/arith_train.jsonl"
//! n = 8
//! [filter]
//! checker = "math"
//! [label]                          # optional: soft labels from the teacher; train uses CE+KD
//! top_k = 64
//! [train]                          # the student (model defaults to the top-level one)
//! epochs = 2
//! [eval]                           # held-out problems, base then student
//! dataset = "datasets/arith_heldout.jsonl"
//! ```
//!
//! Every stage has a fingerprint: the SHA-256 of its flags, of the files it reads (dataset,
//! model, prompt and rule files) and of the fingerprints of the stages it depends on. A stage
//! whose fingerprint and completion are recorded in `OUT_DIR/stages.json` is skipped; a stage
//! whose fingerprint changed starts afresh (its old output removed); a stage that started but
//! did not finish is rerun with the same output, which the stage itself resumes (generate and
//! eval skip finished samples, train continues from its last checkpoint).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::cli::{Cli, Outcome};

/// Flags of `distill run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The pipeline config (TOML).
    pub config: PathBuf,
    /// Rerun every stage even when its fingerprint is unchanged.
    #[arg(long)]
    pub force: bool,
}

/// The stages, in order.
const STAGES: [&str; 8] = [
    "generate",
    "filter",
    "label",
    "train",
    "eval-base",
    "eval-student",
    "compare",
    "deploy",
];

/// What `stages.json` records per stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// Fingerprint of the stage's inputs and settings.
    pub fingerprint: String,
    /// Whether the stage finished.
    pub done: bool,
    /// Wall time of the last completed run, seconds.
    #[serde(default)]
    pub seconds: f64,
    /// Whether the last `distill run` skipped it.
    #[serde(default)]
    pub skipped: bool,
}

/// SHA-256 of a file, `missing` if it cannot be read.
fn file_hash(path: &Path) -> String {
    match std::fs::File::open(path) {
        Ok(mut f) => {
            let mut h = Sha256::new();
            if std::io::copy(&mut f, &mut h).is_err() {
                return "unreadable".into();
            }
            hex::encode(h.finalize())
        }
        Err(_) => "missing".into(),
    }
}

/// SHA-256 of a file or of every file under a directory (names and contents, sorted).
fn path_hash(path: &Path) -> String {
    if path.is_dir() {
        let mut files = Vec::new();
        let mut stack = vec![path.to_path_buf()];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else {
                        files.push(p);
                    }
                }
            }
        }
        files.sort();
        let mut h = Sha256::new();
        for f in files {
            h.update(
                f.strip_prefix(path)
                    .unwrap_or(&f)
                    .to_string_lossy()
                    .as_bytes(),
            );
            h.update(file_hash(&f).as_bytes());
        }
        hex::encode(h.finalize())
    } else {
        file_hash(path)
    }
}

/// A TOML table of flags as command-line arguments.
fn flags(table: &toml::Table, file: &Path, section: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for (k, v) in table {
        let flag = format!("--{}", k.replace('_', "-"));
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => bail!(
                    "{}: [{section}] {k}: expected a string, number, boolean or array, got {}",
                    file.display(),
                    other.type_str()
                ),
            })
        };
        match v {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for it in items {
                    out.push(flag.clone());
                    out.push(scalar(it)?);
                }
            }
            other => {
                out.push(flag);
                out.push(scalar(other)?);
            }
        }
    }
    Ok(out)
}

/// Flag values that name files whose contents a stage depends on.
fn input_files(table: &toml::Table, keys: &[&str]) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for k in keys {
        match table.get(*k) {
            Some(toml::Value::String(s)) => v.push(PathBuf::from(s)),
            Some(toml::Value::Array(items)) => {
                v.extend(items.iter().filter_map(|i| i.as_str()).map(PathBuf::from))
            }
            _ => {}
        }
    }
    v
}

/// One stage's command line, fingerprint and output paths.
struct Stage {
    name: &'static str,
    args: Vec<String>,
    fingerprint: String,
    outputs: Vec<PathBuf>,
    /// Extra flags when resuming an unfinished run of the same fingerprint.
    resume_args: Vec<String>,
}

fn fingerprint(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..16])
}

fn table(cfg: &toml::Table, name: &str) -> toml::Table {
    cfg.get(name)
        .and_then(|v| v.as_table())
        .cloned()
        .unwrap_or_default()
}

/// A stage's table with the top-level `model` filled in where the table names none.
fn table_with_model(cfg: &toml::Table, name: &str, model: Option<&str>) -> toml::Table {
    let mut t = table(cfg, name);
    if let (Some(m), false) = (model, t.contains_key("model")) {
        t.insert("model".into(), toml::Value::String(m.to_string()));
    }
    t
}

/// A stage's fingerprint: the version, its name, the upstream stage's fingerprint, its
/// command line, and the hashes of the files named by `keys` in its table.
fn stage_fingerprint(
    name: &str,
    upstream: Option<&str>,
    args: &[String],
    table: &toml::Table,
    keys: &[&str],
) -> String {
    let hashes: Vec<String> = input_files(table, keys)
        .iter()
        .map(|p| path_hash(p))
        .collect();
    let mut parts: Vec<&str> = vec![env!("CARGO_PKG_VERSION"), name];
    parts.extend(upstream);
    parts.extend(args.iter().map(String::as_str));
    parts.extend(hashes.iter().map(String::as_str));
    fingerprint(&parts)
}

/// Builds every stage from the config.
fn plan(cfg: &toml::Table, file: &Path, out: &Path) -> anyhow::Result<Vec<Stage>> {
    let model = cfg.get("model").and_then(|v| v.as_str());
    let mut stages = Vec::new();

    let gen = table_with_model(cfg, "generate", model);
    let traces = out.join("traces.jsonl");
    let mut args = vec!["generate".to_string()];
    args.extend(flags(&gen, file, "generate")?);
    args.extend(["--out".into(), traces.display().to_string()]);
    let gen_fp = stage_fingerprint(
        "generate",
        None,
        &args,
        &gen,
        &["dataset", "model", "prompt", "adapter"],
    );
    stages.push(Stage {
        name: "generate",
        args,
        fingerprint: gen_fp.clone(),
        outputs: vec![traces.clone(), crate::generate::summary_path(&traces)],
        resume_args: vec![],
    });

    let filt = table(cfg, "filter");
    let filtered = out.join("filtered");
    let mut args = vec!["filter".to_string()];
    args.extend(flags(&filt, file, "filter")?);
    args.extend([
        "--traces".into(),
        traces.display().to_string(),
        "--out-dir".into(),
        filtered.display().to_string(),
    ]);
    let filt_fp = stage_fingerprint(
        "filter",
        Some(&gen_fp),
        &args,
        &filt,
        &["rules", "eval_set", "eval_sets"],
    );
    stages.push(Stage {
        name: "filter",
        args,
        fingerprint: filt_fp.clone(),
        outputs: vec![filtered.clone()],
        resume_args: vec![],
    });

    // Soft labels of the kept traces, when asked for: the teacher (the generate model unless
    // [label] names one) scores them, and the student trains with CE+KD on them unless [train]
    // says otherwise.
    let kept = filtered.join("kept.jsonl");
    let labels = out.join("labels");
    let mut train_upstream = filt_fp.clone();
    let mut tr = table_with_model(cfg, "train", model);
    if cfg.contains_key("label") {
        let teacher = gen.get("model").and_then(|v| v.as_str());
        let lab = table_with_model(cfg, "label", teacher);
        let mut args = vec!["label".to_string()];
        args.extend(flags(&lab, file, "label")?);
        args.extend([
            "--traces".into(),
            kept.display().to_string(),
            "--out".into(),
            labels.display().to_string(),
        ]);
        let label_fp = stage_fingerprint(
            "label",
            Some(&filt_fp),
            &args,
            &lab,
            &["model", "adapter", "chat_template"],
        );
        stages.push(Stage {
            name: "label",
            args,
            fingerprint: label_fp.clone(),
            outputs: vec![labels.clone()],
            resume_args: vec![],
        });
        train_upstream = label_fp;
        if !tr.contains_key("soft_labels") {
            tr.insert(
                "soft_labels".into(),
                toml::Value::String(labels.display().to_string()),
            );
        }
        if !tr.contains_key("loss") {
            tr.insert("loss".into(), toml::Value::String("ce+kd".into()));
        }
    }
    let student = out.join("student");
    let mut args = vec!["train".to_string()];
    args.extend(flags(&tr, file, "train")?);
    args.extend([
        "--data".into(),
        kept.display().to_string(),
        "--out".into(),
        student.display().to_string(),
    ]);
    let train_fp = stage_fingerprint(
        "train",
        Some(&train_upstream),
        &args,
        &tr,
        &["model", "config", "chat_template", "teacher"],
    );
    stages.push(Stage {
        name: "train",
        args,
        fingerprint: train_fp.clone(),
        outputs: vec![student.clone()],
        resume_args: vec!["--resume".into()],
    });

    let ev = table_with_model(cfg, "eval", model);
    // With full-parameter training the student is a whole model, not an adapter.
    let full = tr
        .get("full_finetune")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    for (name, adapter, upstream) in [
        ("eval-base", None, None),
        ("eval-student", Some(student.clone()), Some(&train_fp)),
    ] {
        let dir = out.join(name);
        let mut args = vec!["eval".to_string()];
        let mut row = ev.clone();
        if let (Some(a), true) = (&adapter, full) {
            row.insert("model".into(), toml::Value::String(a.display().to_string()));
        }
        args.extend(flags(&row, file, "eval")?);
        args.extend(["--out-dir".into(), dir.display().to_string()]);
        if let (Some(a), false) = (&adapter, full) {
            args.extend(["--adapter".into(), a.display().to_string()]);
        }
        stages.push(Stage {
            name,
            fingerprint: stage_fingerprint(
                name,
                upstream.map(String::as_str),
                &args,
                &ev,
                &["dataset", "model", "prompt"],
            ),
            args,
            outputs: vec![dir],
            resume_args: vec![],
        });
    }
    let fp_of = |name: &str| {
        stages
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.fingerprint.clone())
            .unwrap_or_default()
    };
    let cmp_fp = fingerprint(&[
        env!("CARGO_PKG_VERSION"),
        "compare",
        &fp_of("eval-base"),
        &fp_of("eval-student"),
    ]);
    stages.push(Stage {
        name: "compare",
        args: vec![
            "eval".into(),
            "--compare".into(),
            out.join("eval-base").display().to_string(),
            out.join("eval-student").display().to_string(),
            "--out-dir".into(),
            out.display().to_string(),
        ],
        fingerprint: cmp_fp,
        outputs: vec![out.join("compare.json")],
        resume_args: vec![],
    });
    // The deployment table, when asked for: the student exported at each quantization and
    // measured beside the teacher (when local) and the f32 student.
    if cfg.contains_key("deploy") {
        let dep = table(cfg, "deploy");
        let dir = out.join("deploy");
        let mut args = vec!["bench".to_string(), "deploy".to_string()];
        args.extend(flags(&dep, file, "deploy")?);
        let student_base = tr
            .get("model")
            .and_then(|v| v.as_str())
            .or(model)
            .map(str::to_string)
            .unwrap_or_default();
        if full {
            args.extend(["--model".into(), student.display().to_string()]);
        } else {
            args.extend([
                "--model".into(),
                student_base,
                "--adapter".into(),
                student.display().to_string(),
            ]);
        }
        args.extend(["--out-dir".into(), dir.display().to_string()]);
        if let Some(t) = gen.get("model").and_then(|v| v.as_str()) {
            if !dep.contains_key("teacher") && Path::new(t).exists() {
                args.extend(["--teacher".into(), t.to_string()]);
            }
        }
        // The [eval] flags without the model, adapter and output: `bench deploy` names each
        // row's model and its output directory itself.
        let mut row_eval = table(cfg, "eval");
        for k in ["model", "adapter", "out_dir"] {
            row_eval.remove(k);
        }
        args.push("--".into());
        args.extend(flags(&row_eval, file, "eval")?);
        stages.push(Stage {
            name: "deploy",
            fingerprint: stage_fingerprint("deploy", Some(&train_fp), &args, &dep, &["teacher"]),
            args,
            outputs: vec![dir],
            resume_args: vec![],
        });
    }
    Ok(stages)
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn save_records(path: &Path, recs: &BTreeMap<String, StageRecord>) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(recs)?;
    crate::trace::write_atomically(path, &json)?;
    Ok(())
}

/// Runs the pipeline.
pub fn run(a: RunArgs) -> anyhow::Result<Outcome> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let cfg: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: invalid TOML", a.config.display()))?;
    for k in cfg.keys() {
        if ![
            "out_dir", "model", "generate", "filter", "label", "train", "eval", "deploy",
        ]
        .contains(&k.as_str())
        {
            bail!(
                "{}: unknown key `{k}` (expected out_dir, model, [generate], [filter], [label], [train], [eval], [deploy])",
                a.config.display()
            );
        }
    }
    let Some(out) = cfg
        .get("out_dir")
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
    else {
        bail!("{}: `out_dir` is required", a.config.display());
    };
    std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
    let stages = plan(&cfg, &a.config, &out)?;
    let rec_path = out.join("stages.json");
    let mut recs: BTreeMap<String, StageRecord> = read_json(&rec_path)
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let started = Instant::now();
    for st in &stages {
        let prev = recs.get(st.name).cloned().unwrap_or_default();
        if !a.force && prev.done && prev.fingerprint == st.fingerprint {
            eprintln!("distill run: {} unchanged, skipped", st.name);
            recs.insert(
                st.name.into(),
                StageRecord {
                    skipped: true,
                    ..prev
                },
            );
            continue;
        }
        let resuming = !a.force && !prev.done && prev.fingerprint == st.fingerprint;
        if !resuming {
            for o in &st.outputs {
                if o.is_dir() {
                    std::fs::remove_dir_all(o).with_context(|| o.display().to_string())?;
                } else if o.exists() {
                    std::fs::remove_file(o).with_context(|| o.display().to_string())?;
                }
            }
        }
        eprintln!(
            "distill run: {} ({})",
            st.name,
            if resuming { "resuming" } else { "running" }
        );
        recs.insert(
            st.name.into(),
            StageRecord {
                fingerprint: st.fingerprint.clone(),
                done: false,
                seconds: 0.0,
                skipped: false,
            },
        );
        save_records(&rec_path, &recs)?;
        let mut argv = vec!["distill".to_string()];
        argv.extend(st.args.iter().cloned());
        if resuming && st.outputs.iter().any(|o| o.exists()) {
            argv.extend(st.resume_args.iter().cloned());
        }
        let cli = Cli::try_parse_from(&argv).map_err(|e| {
            anyhow::anyhow!(
                "{}: [{}] does not parse as `distill {}` flags:\n{e}",
                a.config.display(),
                st.name.trim_start_matches("eval-"),
                st.args[0]
            )
        })?;
        let t = Instant::now();
        let outcome = crate::cli::run(cli)
            .with_context(|| format!("stage {} of {}", st.name, a.config.display()))?;
        if outcome.interrupted {
            eprintln!("distill run: interrupted in {}; rerun to resume", st.name);
            return Ok(outcome);
        }
        recs.insert(
            st.name.into(),
            StageRecord {
                fingerprint: st.fingerprint.clone(),
                done: true,
                seconds: t.elapsed().as_secs_f64(),
                skipped: false,
            },
        );
        save_records(&rec_path, &recs)?;
    }
    write_manifest(&cfg, &a.config, &out, &stages, &recs)?;
    let report = report(&out, &recs);
    println!("{report}");
    eprintln!(
        "distill run: done in {:.1} s; {} and {}",
        started.elapsed().as_secs_f64(),
        out.join("manifest.json").display(),
        out.join("report.html").display()
    );
    Ok(Outcome::default())
}

/// `manifest.json`: what produced the result.
fn write_manifest(
    cfg: &toml::Table,
    file: &Path,
    out: &Path,
    stages: &[Stage],
    recs: &BTreeMap<String, StageRecord>,
) -> anyhow::Result<()> {
    let mut files = BTreeMap::new();
    for section in ["generate", "filter", "label", "train", "eval"] {
        let t = table(cfg, section);
        for p in input_files(
            &t,
            &["dataset", "model", "prompt", "rules", "adapter", "config"],
        ) {
            files.insert(p.display().to_string(), path_hash(&p));
        }
    }
    if let Some(m) = cfg.get("model").and_then(|v| v.as_str()) {
        files.insert(m.to_string(), path_hash(Path::new(m)));
    }
    let summary = |d: &str| read_json(&out.join(d).join("summary.json"));
    let gen_summary = read_json(&crate::generate::summary_path(&out.join("traces.jsonl")));
    let teacher_trace = std::fs::read_to_string(out.join("traces.jsonl"))
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .and_then(|l| serde_json::from_str::<Value>(l).ok())
        });
    let licence = teacher_trace
        .as_ref()
        .and_then(|t| t["teacher"].get("license").cloned());
    let manifest = json!({
        "distill_version": env!("CARGO_PKG_VERSION"),
        "config": {"path": file.display().to_string(), "sha256": file_hash(file), "values": cfg},
        "files": files,
        "default_rules_sha256": hex::encode(Sha256::digest(crate::filter::rules::DEFAULT_RULES_TOML.as_bytes())),
        "checker_version": crate::check::grade::CHECKER_VERSION,
        "teacher": teacher_trace.as_ref().map(|t| t["teacher"].clone()),
        "teacher_license": licence,
        "generate_sampling": teacher_trace.as_ref().map(|t| t["sampling"].clone()),
        "generate_summary": gen_summary,
        "filter_summary": read_json(&out.join("filtered").join("summary.json")),
        "eval_base": summary("eval-base"),
        "eval_student": summary("eval-student"),
        "compare": read_json(&out.join("compare.json")),
        "stages": stages.iter().map(|s| json!({
            "name": s.name,
            "command": format!("distill {}", s.args.join(" ")),
            "fingerprint": s.fingerprint,
            "seconds": recs.get(s.name).map(|r| r.seconds),
            "skipped": recs.get(s.name).map(|r| r.skipped),
        })).collect::<Vec<_>>(),
    });
    crate::trace::write_atomically(
        &out.join("manifest.json"),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(())
}

/// The terminal summary of a run, and `report.html` beside it.
fn report(out: &Path, recs: &BTreeMap<String, StageRecord>) -> String {
    let mut s = String::from("distill run:\n");
    for name in STAGES {
        if let Some(r) = recs.get(name) {
            s.push_str(&format!(
                "  {name:<13} {:>8.1} s{}\n",
                r.seconds,
                if r.skipped {
                    "  (skipped: unchanged)"
                } else {
                    ""
                }
            ));
        }
    }
    let acc = |d: &str| {
        read_json(&out.join(d).join("summary.json")).map(|v| {
            (
                v["pass@1"].as_f64().unwrap_or(0.0),
                v["pass@1_ci95"][0].as_f64().unwrap_or(0.0),
                v["pass@1_ci95"][1].as_f64().unwrap_or(0.0),
                v["n_problems"].as_u64().unwrap_or(0),
            )
        })
    };
    let (base, student) = (acc("eval-base"), acc("eval-student"));
    for (label, a) in [("base", base), ("student", student)] {
        if let Some((p, lo, hi, n)) = a {
            s.push_str(&format!(
                "  {label:<8} pass@1 {:.1}% [{:.1}, {:.1}] on {n} held-out problems\n",
                100.0 * p,
                100.0 * lo,
                100.0 * hi
            ));
        }
    }
    let cmp = read_json(&out.join("compare.json"));
    if let Some(c) = &cmp {
        s.push_str(&format!(
            "  change   {:+.1} points [{:+.1}, {:+.1}], paired p = {:.4} ({} won, {} lost)\n",
            100.0 * c["delta"].as_f64().unwrap_or(0.0),
            100.0 * c["ci95"][0].as_f64().unwrap_or(0.0),
            100.0 * c["ci95"][1].as_f64().unwrap_or(0.0),
            c["p_value"].as_f64().unwrap_or(1.0),
            c["wins"].as_u64().unwrap_or(0),
            c["losses"].as_u64().unwrap_or(0)
        ));
    }
    let loss: Vec<(f64, f64)> =
        std::fs::read_to_string(out.join("student").join(crate::train::recipe::METRICS_FILE))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get("loss")?.as_f64()?)))
            .collect();
    let summary = |d: &str| read_json(&out.join(d).join("summary.json"));
    let outcome = json!({
        "loss": loss.iter().map(|(x, y)| json!([x, y])).collect::<Vec<_>>(),
        "base": summary("eval-base"),
        "student": summary("eval-student"),
        "compare": cmp,
        "deploy": read_json(&out.join("deploy").join("deploy.json")),
    });
    if let Ok(md) = std::fs::read_to_string(out.join("deploy").join("deploy.md")) {
        s.push_str("  deployment:\n");
        for line in md.lines() {
            s.push_str(&format!("  {line}\n"));
        }
    }
    // The audit report of the kept traces, extended with what they led to. A convenience: a
    // failure to write it must not fail the run.
    let filtered = out.join("filtered");
    if crate::trace::write_atomically(
        &filtered.join(crate::audit::OUTCOME_FILE),
        outcome.to_string().as_bytes(),
    )
    .is_ok()
    {
        if let Ok(run) = crate::audit::load_run(&filtered) {
            let _ = crate::audit::write_html(&run, &out.join("report.html"));
            let _ = crate::audit::write_html(&run, &filtered.join("report.html"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of<'a>(stages: &'a [Stage], name: &str) -> &'a [String] {
        &stages
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no stage {name}"))
            .args
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    /// A LoRA student is evaluated and deployed as base + adapter; a full-parameter one as a
    /// model of its own, with no adapter flag and one `--model`.
    #[test]
    fn full_finetune_students_are_evaluated_as_models() -> anyhow::Result<()> {
        let text = |full: bool| {
            format!(
                "model = \"teacher.gguf\"\n[generate]\ndataset = \"d.jsonl\"\n[train]\n\
                 max_steps = 2\nfull_finetune = {full}\n[eval]\ndataset = \"e.jsonl\"\n[deploy]\n"
            )
        };
        let out = Path::new("runs/x");
        let file = Path::new("run.toml");
        let lora = plan(&toml::from_str(&text(false))?, file, out)?;
        let student = out.join("student").display().to_string();
        let ev = args_of(&lora, "eval-student");
        assert_eq!(value_after(ev, "--adapter"), [student.as_str()]);
        assert_eq!(value_after(ev, "--model"), ["teacher.gguf"]);
        assert_eq!(
            value_after(args_of(&lora, "deploy"), "--adapter"),
            [student.as_str()]
        );

        let full = plan(&toml::from_str(&text(true))?, file, out)?;
        assert!(args_of(&full, "train").contains(&"--full-finetune".to_string()));
        for stage in ["eval-student", "deploy"] {
            let a = args_of(&full, stage);
            assert!(value_after(a, "--adapter").is_empty(), "{stage}: {a:?}");
            assert_eq!(value_after(a, "--model")[0], student, "{stage}: {a:?}");
        }
        assert_eq!(
            value_after(args_of(&full, "eval-base"), "--model"),
            ["teacher.gguf"]
        );
        Ok(())
    }
}
