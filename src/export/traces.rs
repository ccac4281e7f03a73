//! Kept traces in the formats the big trainers read, for users who outgrow one machine:
//! TRL's `SFTTrainer` (conversational `messages`), LLaMA-Factory (ShareGPT `conversations`,
//! with its `dataset_info.json` entry) and axolotl (`chat_template` datasets, with the YAML
//! lines that point at the file).
//!
//! Each record holds exactly the conversation `distill train` trains on: the prompt messages
//! and the assistant answer with its reasoning as a `<think>` block, the way reasoning models'
//! chat templates render it, so each tool renders the same training text. [`verify`] reads an
//! export back and checks that, record by record.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use super::ExportError;
use crate::model::tokenizer::ChatMessage;
use crate::trace::Trace;
use crate::train::data::Encoder;

type Result<T> = std::result::Result<T, ExportError>;

/// A trainer's dataset format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceFormat {
    /// `{"messages": [{"role", "content"}]}`: TRL `SFTTrainer`'s conversational format.
    Trl,
    /// `{"conversations": [{"from", "value"}], "system"}`: LLaMA-Factory's ShareGPT format.
    Sharegpt,
    /// `{"messages": [{"role", "content"}]}` for axolotl's `type: chat_template`.
    Axolotl,
}

impl TraceFormat {
    /// The name used in file names and messages.
    pub fn name(self) -> &'static str {
        match self {
            TraceFormat::Trl => "trl",
            TraceFormat::Sharegpt => "sharegpt",
            TraceFormat::Axolotl => "axolotl",
        }
    }
}

/// What [`export_traces`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct TraceExport {
    /// The dataset file.
    pub path: PathBuf,
    /// The trainer's configuration snippet written beside it.
    pub config: PathBuf,
    /// Records written.
    pub records: usize,
    /// Input lines skipped (failed samples, which have no answer to train on).
    pub skipped: usize,
}

fn record(format: TraceFormat, messages: &[ChatMessage]) -> Value {
    match format {
        TraceFormat::Trl | TraceFormat::Axolotl => json!({
            "messages": messages
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect::<Vec<_>>()
        }),
        TraceFormat::Sharegpt => {
            let system: Vec<&str> = messages
                .iter()
                .filter(|m| m.role == "system")
                .map(|m| m.content.as_str())
                .collect();
            let turns: Vec<Value> = messages
                .iter()
                .filter(|m| m.role != "system")
                .map(|m| {
                    let from = match m.role.as_str() {
                        "user" => "human",
                        "assistant" => "gpt",
                        other => other,
                    };
                    json!({"from": from, "value": m.content})
                })
                .collect();
            let mut r = json!({"conversations": turns});
            if !system.is_empty() {
                r["system"] = json!(system.join("\n"));
            }
            r
        }
    }
}

/// The conversation of one exported record, read back as the target tool reads it.
pub fn read_record(
    format: TraceFormat,
    v: &Value,
) -> std::result::Result<Vec<ChatMessage>, String> {
    let str_field = |m: &Value, k: &str| -> std::result::Result<String, String> {
        m.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("`{k}` missing or not a string"))
    };
    match format {
        TraceFormat::Trl | TraceFormat::Axolotl => v
            .get("messages")
            .and_then(Value::as_array)
            .ok_or("`messages` missing or not a list")?
            .iter()
            .map(|m| {
                Ok(ChatMessage::new(
                    str_field(m, "role")?,
                    str_field(m, "content")?,
                ))
            })
            .collect(),
        TraceFormat::Sharegpt => {
            let mut out = Vec::new();
            if let Some(s) = v.get("system") {
                let s = s.as_str().ok_or("`system` is not a string")?;
                out.push(ChatMessage::new("system", s));
            }
            for t in v
                .get("conversations")
                .and_then(Value::as_array)
                .ok_or("`conversations` missing or not a list")?
            {
                let role = match str_field(t, "from")?.as_str() {
                    "human" => "user".to_string(),
                    "gpt" => "assistant".to_string(),
                    other => other.to_string(),
                };
                out.push(ChatMessage::new(role, str_field(t, "value")?));
            }
            Ok(out)
        }
    }
}

/// Checks one record against the rules its tool applies when it loads a dataset:
/// TRL's conversational test (a `messages` list of `role`/`content` string pairs), LLaMA-Factory's
/// ShareGPT converter (turns alternate `human`/`gpt`, starting with `human`, an even count, the
/// system prompt in its own column) and axolotl's `chat_template` (known roles, an assistant turn
/// to train on).
pub fn check_schema(format: TraceFormat, v: &Value) -> std::result::Result<(), String> {
    match format {
        TraceFormat::Trl | TraceFormat::Axolotl => {
            let msgs = v
                .get("messages")
                .and_then(Value::as_array)
                .ok_or("`messages` missing or not a list")?;
            if msgs.is_empty() {
                return Err("`messages` is empty".into());
            }
            for (i, m) in msgs.iter().enumerate() {
                let role = m.get("role").and_then(Value::as_str);
                let content = m.get("content").and_then(Value::as_str);
                match (role, content) {
                    (Some("system" | "user" | "assistant" | "tool"), Some(_)) => {}
                    _ => {
                        return Err(format!(
                            "messages[{i}]: needs a known `role` and a string `content`"
                        ))
                    }
                }
            }
            if msgs.last().and_then(|m| m["role"].as_str()) != Some("assistant") {
                return Err("the last message is not the assistant's".into());
            }
            Ok(())
        }
        TraceFormat::Sharegpt => {
            let turns = v
                .get("conversations")
                .and_then(Value::as_array)
                .ok_or("`conversations` missing or not a list")?;
            if turns.is_empty() || turns.len() % 2 != 0 {
                return Err(format!(
                    "{} turns: LLaMA-Factory needs human/gpt pairs",
                    turns.len()
                ));
            }
            for (i, t) in turns.iter().enumerate() {
                let want = if i % 2 == 0 { "human" } else { "gpt" };
                if t.get("from").and_then(Value::as_str) != Some(want) {
                    return Err(format!("conversations[{i}]: `from` must be `{want}`"));
                }
                if !t.get("value").is_some_and(Value::is_string) {
                    return Err(format!("conversations[{i}]: `value` is not a string"));
                }
            }
            if v.get("system").is_some_and(|s| !s.is_string()) {
                return Err("`system` is not a string".into());
            }
            Ok(())
        }
    }
}

/// Writes the kept traces of `input` as `format` to `out` (atomically), plus the tool's
/// configuration snippet beside it.
pub fn export_traces(input: &Path, format: TraceFormat, out: &Path) -> Result<TraceExport> {
    let file = std::fs::File::open(input).map_err(|e| ExportError::io(input, e))?;
    let mut tmp = super::temp_beside(out)?;
    let (mut records, mut skipped) = (0, 0);
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| ExportError::io(input, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let trace: Trace = serde_json::from_str(&line).map_err(|e| ExportError::Record {
                path: input.to_path_buf(),
                line: i + 1,
                msg: e.to_string(),
            })?;
            let Some(messages) = Encoder::trace_messages(&trace) else {
                skipped += 1;
                continue;
            };
            serde_json::to_writer(&mut w, &record(format, &messages))
                .map_err(|e| ExportError::io(out, e.into()))?;
            w.write_all(b"\n").map_err(|e| ExportError::io(out, e))?;
            records += 1;
        }
        w.flush().map_err(|e| ExportError::io(out, e))?;
    }
    super::publish(tmp, out)?;
    let config = write_config(format, out)?;
    Ok(TraceExport {
        path: out.to_path_buf(),
        config,
        records,
        skipped,
    })
}

/// The snippet that tells the tool how to read the file.
fn write_config(format: TraceFormat, data: &Path) -> Result<PathBuf> {
    let name = data
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (path, text) = match format {
        TraceFormat::Trl => (
            data.with_extension("trl.py"),
            format!(
                "# TRL: the file is a conversational dataset; SFTTrainer applies the model's chat\n\
                 # template to `messages` (reasoning stays inside the assistant's <think> block).\n\
                 from datasets import load_dataset\n\
                 dataset = load_dataset(\"json\", data_files=\"{name}\", split=\"train\")\n\
                 # trainer = trl.SFTTrainer(model=..., train_dataset=dataset, args=trl.SFTConfig(assistant_only_loss=True))\n"
            ),
        ),
        TraceFormat::Sharegpt => (
            data.with_file_name("dataset_info.json"),
            serde_json::to_string_pretty(&json!({
                "distill": {
                    "file_name": name,
                    "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "system": "system"},
                    "tags": {"role_tag": "from", "content_tag": "value",
                             "user_tag": "human", "assistant_tag": "gpt"}
                }
            }))
            .map_err(|e| ExportError::io(data, e.into()))?,
        ),
        TraceFormat::Axolotl => (
            data.with_extension("axolotl.yml"),
            format!(
                "# axolotl: add to your config; the model's chat template renders `messages`,\n\
                 # and only assistant turns are trained on (reasoning inside <think>).\n\
                 datasets:\n  - path: {name}\n    ds_type: json\n    type: chat_template\n    \
                 field_messages: messages\n    roles_to_train: [\"assistant\"]\n"
            ),
        ),
    };
    crate::trace::write_atomically(&path, text.as_bytes())
        .map_err(|e| ExportError::Other(e.to_string()))?;
    Ok(path)
}

/// How an export compared with the traces it came from.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verification {
    /// Records compared.
    pub records: usize,
    /// Records whose conversation (and rendered text, when a tokenizer was given) differs, as
    /// `line: what differs` (the first ten).
    pub mismatches: Vec<String>,
    /// Whether the rendered training text was compared (a tokenizer was given).
    pub rendered: bool,
}

/// Reads `export` back as its tool would and compares every record with the conversation
/// `distill train` builds from the same trace of `input`, and, with `renderer`, the rendered
/// training text.
pub fn verify(
    input: &Path,
    export: &Path,
    format: TraceFormat,
    renderer: Option<&crate::train::data::ChatRenderer>,
) -> Result<Verification> {
    let read = |p: &Path| -> Result<Vec<String>> {
        let text = std::fs::read_to_string(p).map_err(|e| ExportError::io(p, e))?;
        Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect())
    };
    let mut expected = Vec::new();
    for (i, line) in read(input)?.iter().enumerate() {
        let trace: Trace = serde_json::from_str(line).map_err(|e| ExportError::Record {
            path: input.to_path_buf(),
            line: i + 1,
            msg: e.to_string(),
        })?;
        if let Some(m) = Encoder::trace_messages(&trace) {
            expected.push(m);
        }
    }
    let got = read(export)?;
    let mut v = Verification {
        records: got.len(),
        rendered: renderer.is_some(),
        ..Default::default()
    };
    if got.len() != expected.len() {
        v.mismatches.push(format!(
            "{} records exported, {} traces with an answer",
            got.len(),
            expected.len()
        ));
    }
    for (i, (line, want)) in got.iter().zip(&expected).enumerate() {
        let value: Value = serde_json::from_str(line).map_err(|e| ExportError::Record {
            path: export.to_path_buf(),
            line: i + 1,
            msg: e.to_string(),
        })?;
        let record_err = |msg| ExportError::Record {
            path: export.to_path_buf(),
            line: i + 1,
            msg,
        };
        check_schema(format, &value).map_err(record_err)?;
        let messages = read_record(format, &value).map_err(record_err)?;
        let same_messages = messages.len() == want.len()
            && messages
                .iter()
                .zip(want)
                .all(|(a, b)| a.role == b.role && a.content == b.content);
        let problem = if !same_messages {
            Some("conversation differs".to_string())
        } else if let Some(r) = renderer {
            let a = r.render(&messages, false)?;
            let b = r.render(want, false)?;
            (a != b).then(|| "rendered text differs".to_string())
        } else {
            None
        };
        if let Some(p) = problem {
            if v.mismatches.len() < 10 {
                v.mismatches.push(format!("line {}: {p}", i + 1));
            }
        }
    }
    Ok(v)
}
