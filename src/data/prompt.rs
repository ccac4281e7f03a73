//! Prompt templates: a system and a user template rendered with minijinja from a problem's fields.
//!
//! Templates live in `prompts/*.toml` and the shipped ones are compiled into the binary, so
//! `--prompt math` works from any directory; `--prompt path/to/mine.toml` loads a user's file.
//! Rendering is strict: a template that names a field the row lacks is an error naming the
//! template, the field and the problem, instead of silently rendering an empty string.

use std::path::{Path, PathBuf};

use minijinja::{Environment, UndefinedBehavior};
use serde::Deserialize;

use super::dataset::Problem;
use crate::trace::Message;

/// The templates shipped in `prompts/`, by name.
pub const BUILTIN: &[(&str, &str)] = &[
    ("math", include_str!("../../prompts/math.toml")),
    ("gsm8k", include_str!("../../prompts/gsm8k.toml")),
    ("code", include_str!("../../prompts/code.toml")),
    ("short", include_str!("../../prompts/short.toml")),
];

/// A prompt template file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptTemplate {
    /// One line saying what the template is for.
    #[serde(default)]
    pub description: String,
    /// Optional system message template.
    #[serde(default)]
    pub system: Option<String>,
    /// User message template.
    pub user: String,
    /// Where it came from (builtin name or file path), for error messages.
    #[serde(skip)]
    pub source: String,
}

/// Errors loading or rendering a template.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// Neither a builtin name nor a readable file.
    #[error("prompt `{name}`: not a builtin ({builtins}) and not a readable file: {source}")]
    NotFound {
        /// What the user passed.
        name: String,
        /// Builtin names.
        builtins: String,
        /// Why the file could not be read.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("{path}: {message}")]
    Toml {
        /// File at fault.
        path: PathBuf,
        /// What the TOML parser said (with line and column).
        message: String,
    },
    /// The template does not compile or names a missing field.
    #[error(
        "prompt {source_name} ({part} template), problem `{problem}` (line {line}): {message}"
    )]
    Render {
        /// Template source.
        source_name: String,
        /// `system` or `user`.
        part: &'static str,
        /// Problem id.
        problem: String,
        /// Dataset line.
        line: usize,
        /// What minijinja said.
        message: String,
    },
}

impl PromptTemplate {
    /// Loads a builtin template by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> Result<Self, PromptError> {
        if let Some((name, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(text, &format!("builtin `{name}`"), Path::new(name));
        }
        let path = Path::new(name_or_path);
        let text = std::fs::read_to_string(path).map_err(|source| PromptError::NotFound {
            name: name_or_path.to_string(),
            builtins: BUILTIN
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), path)
    }

    fn parse(text: &str, source: &str, path: &Path) -> Result<Self, PromptError> {
        let mut t: PromptTemplate = toml::from_str(text).map_err(|e| PromptError::Toml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        t.source = source.to_string();
        Ok(t)
    }

    /// Renders the chat messages for one problem. The context holds every field of the row,
    /// plus `question` and `id` as the preset mapped them.
    pub fn render(&self, problem: &Problem) -> Result<Vec<Message>, PromptError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        let mut ctx = problem.fields.clone();
        ctx.insert("question".into(), problem.question.clone().into());
        ctx.insert("id".into(), problem.id.clone().into());
        let render = |part: &'static str, tpl: &str| -> Result<String, PromptError> {
            env.render_str(tpl, &ctx).map_err(|e| PromptError::Render {
                source_name: self.source.clone(),
                part,
                problem: problem.id.clone(),
                line: problem.line,
                message: format!("{e:#}"),
            })
        };
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = &self.system {
            messages.push(Message {
                role: "system".into(),
                content: render("system", system)?,
            });
        }
        messages.push(Message {
            role: "user".into(),
            content: render("user", &self.user)?,
        });
        Ok(messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Reference;

    fn problem(fields: serde_json::Value) -> Problem {
        Problem {
            id: "p1".into(),
            line: 7,
            question: "What is 2+2?".into(),
            reference: Reference::default(),
            fields: fields.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn builtins_parse_and_render() {
        for (name, _) in BUILTIN {
            let t = PromptTemplate::load(name).unwrap();
            let m = t.render(&problem(serde_json::json!({}))).unwrap();
            assert!(m.last().unwrap().content.contains("What is 2+2?"), "{name}");
        }
        let t = PromptTemplate::load("math").unwrap();
        let m = t.render(&problem(serde_json::json!({}))).unwrap();
        assert_eq!(m.len(), 1);
        assert!(m[0].content.contains("\\boxed{}"));
    }

    #[test]
    fn missing_field_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(&p, "user = \"{{ question }} {{ level }}\"\n").unwrap();
        let t = PromptTemplate::load(p.to_str().unwrap()).unwrap();
        let e = t
            .render(&problem(serde_json::json!({})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("problem `p1` (line 7)"), "{e}");
        assert!(e.contains("level") || e.contains("undefined"), "{e}");
        let ok = t.render(&problem(serde_json::json!({"level": 3}))).unwrap();
        assert_eq!(ok[0].content, "What is 2+2? 3");
    }

    #[test]
    fn unknown_name_lists_builtins() {
        let e = PromptTemplate::load("nope").unwrap_err().to_string();
        assert!(e.contains("math, gsm8k, code"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, "usr = \"x\"\n").unwrap();
        let e = PromptTemplate::load(p.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.toml"), "{e}");
    }
}
