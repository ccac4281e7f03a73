//! Problem sets: JSONL files (or one JSON array) mapped onto [`Problem`]s by a preset or by
//! explicit field flags.
//!
//! Presets cover the shapes users meet every day, so that `--preset gsm8k` is all it takes:
//!
//! | preset      | id                     | question           | reference                               |
//! |-------------|------------------------|--------------------|-----------------------------------------|
//! | `gsm8k`     | `id` (else hash)       | `question`         | `answer` (solution ending `#### N`)     |
//! | `math`      | `unique_id`/`id`       | `problem`          | `answer`, `solution`                    |
//! | `humaneval` | `task_id`              | `prompt`           | `test`, `entry_point`                   |
//! | `mbpp`      | `task_id`              | `prompt` or `text` | `test` or `test_list`, `entry_point`    |
//!
//! `auto` picks one from the first row's keys. Rows without an id field get the hash of their
//! question, so ids survive reordering and appending. A malformed row is an error naming the
//! file, line and field, unless the caller asks to skip and count invalid rows.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::trace::Reference;

/// One problem, ready to be rendered into a prompt.
#[derive(Debug, Clone)]
pub struct Problem {
    /// Stable problem id (from the id field, else a hash of the question).
    pub id: String,
    /// 1-based line (JSONL) or element index + 1 (JSON array) in the source file.
    pub line: usize,
    /// The text the prompt template shows as `{{ question }}`.
    pub question: String,
    /// What checkers compare against.
    pub reference: Reference,
    /// The raw row, so templates can use any field.
    pub fields: Map<String, Value>,
}

/// A named dataset shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Detect from the first row's keys.
    Auto,
    /// GSM8K: `question`, `answer` ending in `#### N`.
    Gsm8k,
    /// MATH / MATH-500: `problem`, `solution`, `answer`.
    Math,
    /// HumanEval: `task_id`, `prompt`, `test`, `entry_point`.
    Humaneval,
    /// MBPP: `task_id`, `prompt`/`text`, `test`/`test_list`.
    Mbpp,
    /// No preset: only the explicit field flags.
    None,
}

impl Preset {
    /// The prompt template that suits this shape.
    pub fn default_prompt(self) -> &'static str {
        match self {
            Preset::Gsm8k => "gsm8k",
            Preset::Humaneval | Preset::Mbpp => "code",
            _ => "math",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Preset::Auto => "auto",
            Preset::Gsm8k => "gsm8k",
            Preset::Math => "math",
            Preset::Humaneval => "humaneval",
            Preset::Mbpp => "mbpp",
            Preset::None => "none",
        }
    }

    fn detect(row: &Map<String, Value>) -> Preset {
        let has = |k: &str| row.contains_key(k);
        if has("task_id") && has("entry_point") && has("test") && has("prompt") {
            Preset::Humaneval
        } else if has("task_id") && (has("test_list") || has("text")) {
            Preset::Mbpp
        } else if has("question") && has("answer") {
            Preset::Gsm8k
        } else if has("problem") {
            Preset::Math
        } else {
            Preset::None
        }
    }
}

/// Explicit field names; each overrides the preset's choice.
#[derive(Debug, Clone, Default)]
pub struct FieldMap {
    /// Field holding the problem id.
    pub id: Option<String>,
    /// Field holding the question text.
    pub question: Option<String>,
    /// Field holding the final answer.
    pub answer: Option<String>,
    /// Field holding a reference solution.
    pub solution: Option<String>,
    /// Field holding test code (string, or list of strings joined by newlines).
    pub tests: Option<String>,
    /// Field holding the entry point function name.
    pub entry_point: Option<String>,
}

/// Errors loading a dataset; each names the file and, for row errors, the line and field.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The file could not be read.
    #[error("{path}: cannot read dataset: {source}")]
    Io {
        /// File at fault.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A line is not valid JSON or not an object.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// File at fault.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A required field is absent or has the wrong type.
    #[error("{path}:{line}: field `{field}` {problem}{hint}")]
    Field {
        /// File at fault.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The field.
        field: String,
        /// What is wrong with it.
        problem: String,
        /// How to fix it.
        hint: String,
    },
    /// Two rows share an id.
    #[error("{path}:{line}: duplicate problem id `{id}` (first seen on line {first})")]
    DuplicateId {
        /// File at fault.
        path: PathBuf,
        /// 1-based line of the second occurrence.
        line: usize,
        /// The id.
        id: String,
        /// Line of the first occurrence.
        first: usize,
    },
    /// The file has no problems.
    #[error("{path}: no problems found")]
    Empty {
        /// File at fault.
        path: PathBuf,
    },
}

/// A loaded dataset plus what was skipped.
#[derive(Debug)]
pub struct Dataset {
    /// The problems, in file order.
    pub problems: Vec<Problem>,
    /// The preset actually used (after `auto` detection).
    pub preset: Preset,
    /// Rows skipped because they were invalid (only with `skip_invalid`), with their errors.
    pub skipped: Vec<DatasetError>,
    /// Rows dropped because an identical question (same hashed id) appeared earlier.
    pub duplicates: usize,
}

/// Loads `path` with `preset` and `fields`. With `skip_invalid`, bad rows are counted and
/// returned in [`Dataset::skipped`] instead of failing the load.
pub fn load(
    path: &Path,
    preset: Preset,
    fields: &FieldMap,
    skip_invalid: bool,
) -> Result<Dataset, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let rows = parse_rows(path, &text, skip_invalid)?;
    let mut skipped = rows.skipped;
    let Some((_, first)) = rows.rows.first() else {
        return Err(DatasetError::Empty {
            path: path.to_path_buf(),
        });
    };
    let preset = match preset {
        Preset::Auto => {
            let p = Preset::detect(first);
            tracing::info!(preset = p.name(), "detected dataset preset");
            p
        }
        p => p,
    };
    let mut problems = Vec::with_capacity(rows.rows.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut duplicates = 0;
    for (line, row) in rows.rows {
        match to_problem(path, line, row, preset, fields) {
            Ok((p, hashed_id)) => {
                if let Some(&first) = seen.get(&p.id) {
                    if hashed_id {
                        duplicates += 1;
                        continue;
                    }
                    let err = DatasetError::DuplicateId {
                        path: path.to_path_buf(),
                        line,
                        id: p.id,
                        first,
                    };
                    if skip_invalid {
                        skipped.push(err);
                        continue;
                    }
                    return Err(err);
                }
                seen.insert(p.id.clone(), line);
                problems.push(p);
            }
            Err(e) if skip_invalid => skipped.push(e),
            Err(e) => return Err(e),
        }
    }
    if problems.is_empty() {
        return Err(DatasetError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(Dataset {
        problems,
        preset,
        skipped,
        duplicates,
    })
}

struct Rows {
    rows: Vec<(usize, Map<String, Value>)>,
    skipped: Vec<DatasetError>,
}

fn parse_rows(path: &Path, text: &str, skip_invalid: bool) -> Result<Rows, DatasetError> {
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let parse_err = |line: usize, message: String| DatasetError::Parse {
        path: path.to_path_buf(),
        line,
        message,
    };
    if text.trim_start().starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(text)
            .map_err(|e| parse_err(e.line(), format!("not a valid JSON array of objects: {e}")))?;
        for (i, item) in v.into_iter().enumerate() {
            match item {
                Value::Object(m) => rows.push((i + 1, m)),
                other => {
                    let e = parse_err(
                        i + 1,
                        format!("element {} is {}, not an object", i, kind(&other)),
                    );
                    if !skip_invalid {
                        return Err(e);
                    }
                    skipped.push(e);
                }
            }
        }
        return Ok(Rows { rows, skipped });
    }
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let res = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(other) => Err(parse_err(
                i + 1,
                format!("expected a JSON object, found {}", kind(&other)),
            )),
            Err(e) => Err(parse_err(
                i + 1,
                format!("malformed JSON at column {}: {e}", e.column()),
            )),
        };
        match res {
            Ok(m) => rows.push((i + 1, m)),
            Err(e) if skip_invalid => skipped.push(e),
            Err(e) => return Err(e),
        }
    }
    Ok(Rows { rows, skipped })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Per-preset field choices: candidates in order of preference, and whether they are required.
struct Spec {
    id: &'static [&'static str],
    question: &'static [&'static str],
    answer: (&'static [&'static str], bool),
    solution: (&'static [&'static str], bool),
    tests: (&'static [&'static str], bool),
    entry_point: (&'static [&'static str], bool),
}

fn spec(preset: Preset) -> Spec {
    match preset {
        Preset::Gsm8k => Spec {
            id: &["id"],
            question: &["question"],
            answer: (&[], false),
            solution: (&["answer"], true),
            tests: (&[], false),
            entry_point: (&[], false),
        },
        Preset::Math => Spec {
            id: &["unique_id", "id"],
            question: &["problem"],
            answer: (&["answer"], false),
            solution: (&["solution"], false),
            tests: (&[], false),
            entry_point: (&[], false),
        },
        Preset::Humaneval => Spec {
            id: &["task_id"],
            question: &["prompt"],
            answer: (&[], false),
            solution: (&["canonical_solution"], false),
            tests: (&["test"], true),
            entry_point: (&["entry_point"], true),
        },
        Preset::Mbpp => Spec {
            id: &["task_id"],
            question: &["prompt", "text"],
            answer: (&[], false),
            solution: (&["code"], false),
            tests: (&["test", "test_list"], true),
            entry_point: (&["entry_point"], false),
        },
        Preset::Auto | Preset::None => Spec {
            id: &["id"],
            question: &["question"],
            answer: (&["answer"], false),
            solution: (&[], false),
            tests: (&[], false),
            entry_point: (&[], false),
        },
    }
}

fn to_problem(
    path: &Path,
    line: usize,
    row: Map<String, Value>,
    preset: Preset,
    fields: &FieldMap,
) -> Result<(Problem, bool), DatasetError> {
    let s = spec(preset);
    let field_err = |field: &str, problem: String, flag: &str| DatasetError::Field {
        path: path.to_path_buf(),
        line,
        field: field.to_string(),
        problem,
        hint: format!(
            " (preset {}); fields present: {}; map another field with {flag}",
            preset.name(),
            row.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    };
    // Picks the override if given, else the first candidate present in the row.
    let pick = |over: &Option<String>, cands: &[&'static str]| -> Option<String> {
        match over {
            Some(f) => Some(f.clone()),
            None => cands
                .iter()
                .find(|c| row.contains_key(**c))
                .or(cands.first())
                .map(|c| c.to_string()),
        }
    };
    let get_text = |name: &str,
                    flag: &str,
                    required: bool|
     -> Result<Option<String>, DatasetError> {
        match row.get(name) {
            None | Some(Value::Null) if required => Err(field_err(name, "is missing".into(), flag)),
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Array(items)) => {
                let mut parts = Vec::with_capacity(items.len());
                for it in items {
                    match it {
                        Value::String(s) => parts.push(s.clone()),
                        other => {
                            return Err(field_err(
                                name,
                                format!("is a list containing {}, expected strings", kind(other)),
                                flag,
                            ))
                        }
                    }
                }
                Ok(Some(parts.join("\n")))
            }
            Some(other) => Err(field_err(
                name,
                format!("is {}, expected a string", kind(other)),
                flag,
            )),
        }
    };

    let qname = pick(&fields.question, s.question).unwrap_or_else(|| "question".into());
    let question = get_text(&qname, "--question-field", true)?.unwrap_or_default();
    if question.trim().is_empty() {
        return Err(field_err(&qname, "is empty".into(), "--question-field"));
    }
    let opt =
        |over: &Option<String>, (cands, req): (&'static [&'static str], bool), flag| match pick(
            over, cands,
        ) {
            Some(name) => get_text(&name, flag, req || over.is_some()),
            None => Ok(None),
        };
    let mut answer = opt(&fields.answer, s.answer, "--answer-field")?;
    // An explicit answer field makes the preset's solution field optional.
    let sol_spec = (s.solution.0, s.solution.1 && fields.answer.is_none());
    let solution = opt(&fields.solution, sol_spec, "--solution-field")?;
    let tests = opt(&fields.tests, s.tests, "--tests-field")?;
    let entry_point = opt(&fields.entry_point, s.entry_point, "--entry-point-field")?;
    if preset == Preset::Gsm8k && answer.is_none() {
        let sol = solution.as_deref().unwrap_or_default();
        match sol.rsplit_once("####") {
            Some((_, a)) if !a.trim().is_empty() => answer = Some(a.trim().to_string()),
            _ => {
                return Err(field_err(
                    "answer",
                    "does not end with `#### <final answer>`".into(),
                    "--answer-field",
                ))
            }
        }
    }
    let code_prompt = matches!(preset, Preset::Humaneval).then(|| question.clone());

    let (id, hashed) = match pick(&fields.id, s.id) {
        Some(name) if row.contains_key(&name) || fields.id.is_some() => {
            let v = get_text(&name, "--id-field", true)?.unwrap_or_default();
            (v, false)
        }
        _ => {
            let d = Sha256::digest(question.as_bytes());
            (format!("q-{}", hex::encode(&d[..6])), true)
        }
    };
    Ok((
        Problem {
            id,
            line,
            question,
            reference: Reference {
                answer,
                solution,
                tests,
                entry_point,
                code_prompt,
            },
            fields: row,
        },
        hashed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, body: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn gsm8k_answer_is_split_off_the_solution() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "g.jsonl",
            "{\"question\":\"1+1?\",\"answer\":\"1+1=2\\n#### 2\"}\n\n{\"question\":\"2+2?\",\"answer\":\"#### 4\"}\n",
        );
        let d = load(&p, Preset::Auto, &FieldMap::default(), false).unwrap();
        assert_eq!(d.preset, Preset::Gsm8k);
        assert_eq!(d.problems.len(), 2);
        assert_eq!(d.problems[0].reference.answer.as_deref(), Some("2"));
        assert_eq!(d.problems[1].line, 3);
        assert!(d.problems[0].id.starts_with("q-"));
    }

    #[test]
    fn malformed_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "bad.jsonl",
            "{\"question\":\"a\",\"answer\":\"#### 1\"}\n{oops\n",
        );
        let e = load(&p, Preset::Gsm8k, &FieldMap::default(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.jsonl:2:"), "{e}");
        let d = load(&p, Preset::Gsm8k, &FieldMap::default(), true).unwrap();
        assert_eq!(d.problems.len(), 1);
        assert_eq!(d.skipped.len(), 1);
    }

    #[test]
    fn missing_preset_field_names_field_and_flag() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "m.jsonl", "{\"problem\":\"x\",\"solution\":\"y\"}\n");
        let e = load(&p, Preset::Gsm8k, &FieldMap::default(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.jsonl:1: field `question` is missing"), "{e}");
        assert!(e.contains("--question-field"), "{e}");
        let fm = FieldMap {
            question: Some("problem".into()),
            answer: Some("solution".into()),
            ..Default::default()
        };
        let d = load(&p, Preset::Gsm8k, &fm, false).unwrap();
        assert_eq!(d.problems[0].question, "x");
    }

    #[test]
    fn humaneval_and_mbpp_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "h.json",
            r#"[{"task_id":"HumanEval/0","prompt":"def f():\n","test":"def check(c): pass","entry_point":"f"}]"#,
        );
        let d = load(&p, Preset::Auto, &FieldMap::default(), false).unwrap();
        assert_eq!(d.preset, Preset::Humaneval);
        assert_eq!(d.problems[0].id, "HumanEval/0");
        assert_eq!(d.problems[0].reference.entry_point.as_deref(), Some("f"));
        let p = write(
            &dir,
            "m.jsonl",
            r#"{"task_id":11,"text":"Write f.","test_list":["assert f()==1","assert f()!=2"]}"#,
        );
        let d = load(&p, Preset::Auto, &FieldMap::default(), false).unwrap();
        assert_eq!(d.preset, Preset::Mbpp);
        assert_eq!(d.problems[0].id, "11");
        assert_eq!(
            d.problems[0].reference.tests.as_deref(),
            Some("assert f()==1\nassert f()!=2")
        );
    }

    #[test]
    fn duplicate_explicit_ids_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "d.jsonl",
            "{\"id\":1,\"question\":\"a\",\"answer\":\"#### 1\"}\n{\"id\":1,\"question\":\"b\",\"answer\":\"#### 2\"}\n",
        );
        let e = load(&p, Preset::Gsm8k, &FieldMap::default(), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("d.jsonl:2: duplicate problem id `1` (first seen on line 1)"),
            "{e}"
        );
    }
}
