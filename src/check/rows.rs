//! `distill check math|code`: score any JSONL dataset with the checkers, row by row.
//!
//! Input rows are echoed unchanged with three fields added: `verdict`, `passed` (bool) and
//! `evidence` (what the checker extracted, normalised and which rule decided). Output keeps the
//! input order. Rows are read and checked in chunks, each chunk in parallel, so memory stays
//! bounded on large files.
//!
//! Math rows carry `gold` and `pred` (`pred` may be a whole completion). Code rows carry the
//! HumanEval schema: `prompt`, `completion`, `test`, `entry_point`; MBPP rows may carry
//! `test_list` (asserts) instead of `test`, and stdin/stdout rows `inputs` and `outputs` lists.

use std::io::{BufRead, Write};

use serde_json::{Map, Value};

#[cfg(target_os = "linux")]
use super::code::{CodeJob, CodeTests, Sandbox, StdioCase};
use super::math::{self, MathOptions};

/// A JSON object with its 1-based line number in the input.
type NumberedRow = (usize, Map<String, Value>);

/// Rows checked per parallel chunk.
const CHUNK: usize = 2048;

/// Errors of the row checker; each names the input and line.
#[derive(Debug, thiserror::Error)]
pub enum RowsError {
    /// Reading input or writing output failed.
    #[error("{what}: {source}")]
    Io {
        /// Which stream.
        what: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A row is malformed or lacks a field.
    #[error("{input}:{line}: {message}")]
    Row {
        /// Input name.
        input: String,
        /// 1-based line.
        line: usize,
        /// What is wrong, naming the field.
        message: String,
    },
}

/// Totals for the summary line.
#[derive(Debug, Default, Clone, Copy)]
pub struct RowsSummary {
    /// Rows checked.
    pub rows: usize,
    /// Rows that passed.
    pub passed: usize,
}

/// Pulls the program out of a model completion: the answer part after the reasoning (the one
/// rule every grader uses, [`crate::check::grade::answer_part`]), then its last fenced code
/// block (```python, ```py or bare ```) that defines something, else the last fenced block,
/// else the text as is (a bare continuation of the prompt).
pub fn extract_code(completion: &str) -> String {
    let text = crate::check::grade::answer_part(completion);
    let mut blocks: Vec<&str> = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("```") {
        let after = &rest[start + 3..];
        let body_start = after.find('\n').map_or(after.len(), |i| i + 1);
        let lang = after[..body_start].trim();
        let body = &after[body_start..];
        let Some(end) = body.find("```") else {
            // Unclosed fence (often a truncated trace): take what is there.
            if lang.is_empty() || lang.starts_with("py") {
                blocks.push(body);
            }
            break;
        };
        if lang.is_empty() || lang.starts_with("py") {
            blocks.push(&body[..end]);
        }
        rest = &body[end + 3..];
    }
    blocks
        .iter()
        .rev()
        .find(|b| b.contains("def ") || b.contains("import "))
        .or(blocks.last())
        .map_or_else(|| text.to_string(), |b| b.to_string())
}

fn read_chunk(
    input: &mut dyn BufRead,
    name: &str,
    line_no: &mut usize,
) -> Result<Vec<NumberedRow>, RowsError> {
    let mut rows = Vec::with_capacity(CHUNK);
    let mut line = String::new();
    while rows.len() < CHUNK {
        line.clear();
        let n = input.read_line(&mut line).map_err(|source| RowsError::Io {
            what: name.to_string(),
            source,
        })?;
        if n == 0 {
            break;
        }
        *line_no += 1;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(m)) => rows.push((*line_no, m)),
            Ok(_) => {
                return Err(RowsError::Row {
                    input: name.into(),
                    line: *line_no,
                    message: "expected a JSON object".into(),
                })
            }
            Err(e) => {
                return Err(RowsError::Row {
                    input: name.into(),
                    line: *line_no,
                    message: format!("malformed JSON: {e}"),
                })
            }
        }
    }
    Ok(rows)
}

fn text_field(
    row: &Map<String, Value>,
    field: &str,
    name: &str,
    line: usize,
) -> Result<String, RowsError> {
    match row.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(other) => Err(RowsError::Row {
            input: name.into(),
            line,
            message: format!("field `{field}` must be a string, found {other}"),
        }),
        None => Err(RowsError::Row {
            input: name.into(),
            line,
            message: format!("field `{field}` is missing"),
        }),
    }
}

fn write_row(
    out: &mut dyn Write,
    mut row: Map<String, Value>,
    verdict: Value,
    passed: bool,
    evidence: Value,
) -> Result<(), RowsError> {
    row.insert("verdict".into(), verdict);
    row.insert("passed".into(), Value::Bool(passed));
    row.insert("evidence".into(), evidence);
    let io = |source| RowsError::Io {
        what: "output".into(),
        source,
    };
    serde_json::to_writer(&mut *out, &row).map_err(|e| io(std::io::Error::other(e)))?;
    out.write_all(b"\n").map_err(io)
}

/// Checks math rows (`gold`, `pred`) from `input`, writing echoed rows to `out`.
pub fn check_math_rows(
    input: &mut dyn BufRead,
    name: &str,
    out: &mut dyn Write,
    opts: &MathOptions,
) -> Result<RowsSummary, RowsError> {
    let mut summary = RowsSummary::default();
    let mut line_no = 0;
    loop {
        let rows = read_chunk(input, name, &mut line_no)?;
        if rows.is_empty() {
            return Ok(summary);
        }
        let pairs = rows
            .iter()
            .map(|(line, r)| {
                Ok((
                    text_field(r, "gold", name, *line)?,
                    text_field(r, "pred", name, *line)?,
                ))
            })
            .collect::<Result<Vec<_>, RowsError>>()?;
        let checks = math::check_batch(&pairs, opts);
        for ((_, row), c) in rows.into_iter().zip(checks) {
            let passed = c.is_correct();
            summary.rows += 1;
            summary.passed += usize::from(passed);
            let (verdict, evidence) = super::split_verdict(&c);
            write_row(out, row, Value::String(verdict), passed, evidence)?;
        }
    }
}

#[cfg(target_os = "linux")]
/// Builds the code job of one row (HumanEval, MBPP or stdin/stdout shape).
pub fn code_job(row: &Map<String, Value>, name: &str, line: usize) -> Result<CodeJob, RowsError> {
    let completion = extract_code(&text_field(row, "completion", name, line)?);
    let prompt = match row.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let entry_point = match row.get("entry_point") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let strings = |v: &Value, field: &str| -> Result<Vec<String>, RowsError> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| match x {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect()
            })
            .ok_or_else(|| RowsError::Row {
                input: name.into(),
                line,
                message: format!("field `{field}` must be a list"),
            })
    };
    let tests = if let Some(t) = row.get("test") {
        match t {
            Value::String(s) => CodeTests::Function {
                test_code: s.clone(),
                entry_point,
            },
            other => CodeTests::Asserts {
                asserts: strings(other, "test")?,
                setup: None,
                entry_point,
            },
        }
    } else if let Some(t) = row.get("test_list") {
        CodeTests::Asserts {
            asserts: strings(t, "test_list")?,
            setup: row
                .get("test_setup_code")
                .and_then(Value::as_str)
                .filter(|s| !s.trim().is_empty())
                .map(str::to_string),
            entry_point,
        }
    } else if let (Some(i), Some(o)) = (row.get("inputs"), row.get("outputs")) {
        let (i, o) = (strings(i, "inputs")?, strings(o, "outputs")?);
        if i.len() != o.len() {
            return Err(RowsError::Row {
                input: name.into(),
                line,
                message: format!(
                    "`inputs` has {} cases but `outputs` has {}",
                    i.len(),
                    o.len()
                ),
            });
        }
        CodeTests::Stdio {
            cases: i
                .into_iter()
                .zip(o)
                .map(|(input, expected_output)| StdioCase {
                    input,
                    expected_output,
                })
                .collect(),
        }
    } else {
        return Err(RowsError::Row {
            input: name.into(),
            line,
            message: "no tests: expected field `test` (HumanEval), `test_list` (MBPP) or `inputs`/`outputs` (stdin/stdout)".into(),
        });
    };
    Ok(CodeJob {
        prompt,
        completion,
        tests,
    })
}

#[cfg(target_os = "linux")]
/// Checks code rows from `input` in `sandbox`, writing echoed rows to `out`.
pub fn check_code_rows(
    input: &mut dyn BufRead,
    name: &str,
    out: &mut dyn Write,
    sandbox: &Sandbox,
) -> Result<RowsSummary, RowsError> {
    let mut summary = RowsSummary::default();
    let mut line_no = 0;
    loop {
        let rows = read_chunk(input, name, &mut line_no)?;
        if rows.is_empty() {
            return Ok(summary);
        }
        let jobs = rows
            .iter()
            .map(|(line, r)| code_job(r, name, *line))
            .collect::<Result<Vec<_>, _>>()?;
        let results = sandbox.check_batch(&jobs);
        for ((_, row), r) in rows.into_iter().zip(results) {
            let passed = r.passed();
            summary.rows += 1;
            summary.passed += usize::from(passed);
            let (verdict, evidence) = super::split_verdict(&r);
            write_row(out, row, Value::String(verdict), passed, evidence)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_pulled_from_fences_after_thinking() {
        let c = "<think>maybe ```python\nwrong()\n```</think>\nHere:\n```python\ndef f(x):\n    return x\n```\nDone.";
        assert_eq!(extract_code(c), "def f(x):\n    return x\n");
        assert_eq!(extract_code("    return 1\n"), "    return 1\n");
        let two = "```python\ndef a(): pass\n```\ntext\n```\nprint(a())\n```";
        assert_eq!(extract_code(two), "def a(): pass\n");
        assert_eq!(
            extract_code("```py\ndef g():\n  return 2"),
            "def g():\n  return 2"
        );
    }

    #[test]
    fn math_rows_are_echoed_in_order_with_verdicts() {
        let input = "{\"gold\":\"72\",\"pred\":\"so \\\\boxed{72}\",\"k\":1}\n\n{\"gold\":\"1/2\",\"pred\":\"0.4\"}\n";
        let mut out = Vec::new();
        let s = check_math_rows(
            &mut input.as_bytes(),
            "in",
            &mut out,
            &MathOptions::default(),
        )
        .unwrap();
        assert_eq!((s.rows, s.passed), (2, 1));
        let lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["k"], 1);
        assert_eq!(lines[0]["verdict"], "correct");
        assert_eq!(lines[0]["passed"], true);
        assert!(lines[0]["evidence"]["rule"].is_string());
        assert_eq!(lines[1]["verdict"], "incorrect");
        let e = check_math_rows(
            &mut "{\"gold\":\"1\"}\n".as_bytes(),
            "in.jsonl",
            &mut Vec::new(),
            &MathOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "in.jsonl:1: field `pred` is missing");
    }
}
