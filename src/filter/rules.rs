//! Rule files: declarative, self-testing quality rules for traces.
//!
//! A rule file (`filters/*.toml`) is a list of `[[rule]]` tables. Every rule carries its own
//! examples, and loading a file runs them, so a rule that does not do what its author claims
//! never reaches a filtering run. Errors name the file, the line and the rule id.
//!
//! ```toml
//! [[rule]]
//! id = "refusal"
//! description = "The teacher declined to answer."
//! field = "completion"                 # completion | reasoning | answer (default completion)
//! action = "reject_if_match"           # or "require_match"
//! pattern = '''(?i)\bas an ai language model\b'''
//! examples.match = ["As an AI language model, I cannot do that."]
//! examples.no_match = ["The answer is 4."]
//!
//! [[rule]]
//! id = "truncated"
//! description = "Generation stopped at the token budget."
//! kind = "truncated"                   # a built-in check instead of a pattern
//! examples.match = [{ completion = "Let me think", finish_reason = "length" }]
//! examples.no_match = [{ completion = "Done.", finish_reason = "stop" }]
//! ```
//!
//! Keys common to all rules: `id`, `description` (both required), `field`, `kind` (default
//! `"regex"`), `on_missing` (`"skip"`, the default, or `"reject"`: what to do when the field is
//! absent from the trace), `examples`. Regex rules add `pattern` and `action`. Built-in kinds
//! (see [`crate::filter::checks`]) add their parameters:
//!
//! | kind                | parameters (defaults)                                                   |
//! |---------------------|-------------------------------------------------------------------------|
//! | `think_well_formed` | `open_tag` (`<think>`), `close_tag` (`</think>`), `allow_implicit_open` (false) |
//! | `repetition`        | `unit` (`words`/`chars`, words), `ngram` (20), `max_repeats` (4), `max_coverage` (off) |
//! | `mixed_script`      | `allowed_scripts` (`["latin", "greek"]`), `max_fraction` (0.02), `min_foreign` (1), `replacement_run` (2) |
//! | `length`            | `min_tokens`, `max_tokens` (both optional), `chars_per_token` (4.0)     |
//! | `truncated`         | `finish_reasons` (`["length"]`)                                         |
//!
//! Examples are strings (the text of the rule's field) or tables with the [`RuleInput`] fields
//! (`completion`, `reasoning`, `answer`, `finish_reason`, `completion_tokens`). For regex rules,
//! `match` examples must match the pattern and `no_match` examples must not, whatever the
//! action. For built-in kinds, `match` examples must make the check fire and `no_match` examples
//! must not. Unknown keys, and parameters that belong to a different kind, are errors.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::checks::{
    check_think, count_tokens, find_mixed_script, find_repetition, MixedScriptHit,
    MixedScriptParams, RepetitionParams, Script, ThinkParams, Unit,
};
use super::text::{floor_char_boundary, truncate_chars};

/// The default rule file, embedded so the binary works without a checkout of `filters/`.
pub const DEFAULT_RULES_TOML: &str = include_str!("../../filters/default.toml");

/// Name under which [`DEFAULT_RULES_TOML`] reports errors and findings.
pub const DEFAULT_RULES_PATH: &str = "filters/default.toml";

/// Longest evidence text attached to a finding, in characters; matches in 100 KB completions
/// must not bloat the verdict records.
pub const MAX_EVIDENCE_CHARS: usize = 200;

/// Which part of a trace a rule looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// The teacher's full answer text (may include a `<think>` block).
    #[default]
    Completion,
    /// The separately returned chain of thought, when the teacher provides one.
    Reasoning,
    /// The extracted final answer, when the filter stage has one.
    Answer,
}

impl Field {
    /// The field's name as written in rule files.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Completion => "completion",
            Field::Reasoning => "reasoning",
            Field::Answer => "answer",
        }
    }

    /// The field's text in `input`, `None` when the trace does not have it.
    pub fn get<'a>(self, input: &RuleInput<'a>) -> Option<&'a str> {
        match self {
            Field::Completion => Some(input.completion),
            Field::Reasoning => input.reasoning,
            Field::Answer => input.answer,
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a regex rule does with a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Reject the trace when the pattern matches (refusals, leaked template tokens).
    RejectIfMatch,
    /// Reject the trace when the pattern does not match (a final answer must be present).
    RequireMatch,
}

/// What a rule does when its field is absent from the trace (e.g. no separate `reasoning`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    /// The rule does not apply.
    #[default]
    Skip,
    /// The rule fires: the field was required.
    Reject,
}

/// Kind of a rule: a regex or one of the built-in checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A regex with an [`Action`].
    #[default]
    Regex,
    /// [`check_think`]: at most one well-formed `<think>` block.
    ThinkWellFormed,
    /// [`find_repetition`]: degenerate looping text.
    Repetition,
    /// [`find_mixed_script`]: foreign scripts or replacement characters.
    MixedScript,
    /// Token-count bounds.
    Length,
    /// `finish_reason` says the generation hit its token budget.
    Truncated,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Regex => "regex",
            Kind::ThinkWellFormed => "think_well_formed",
            Kind::Repetition => "repetition",
            Kind::MixedScript => "mixed_script",
            Kind::Length => "length",
            Kind::Truncated => "truncated",
        }
    }
}

/// The parts of a trace the rules look at, borrowed so that rules do not depend on the trace
/// record type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleInput<'a> {
    /// The teacher's answer text.
    pub completion: &'a str,
    /// The chain of thought, when returned separately.
    pub reasoning: Option<&'a str>,
    /// The extracted final answer.
    pub answer: Option<&'a str>,
    /// Why generation stopped (`stop`, `length`, ...).
    pub finish_reason: Option<&'a str>,
    /// Completion length reported by the teacher (`usage.completion_tokens`).
    pub completion_tokens: Option<u64>,
}

/// Why a rule fired, precise enough to audit a verdict without rerunning the filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// Byte range in the rule's field, when the evidence is a piece of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<Range<usize>>,
    /// The text at `span`, cut to [`MAX_EVIDENCE_CHARS`] characters (empty without a span).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    /// Human-readable explanation (counts, thresholds, estimates).
    pub note: String,
}

impl Evidence {
    fn at(text: &str, span: Range<usize>, note: String) -> Evidence {
        Evidence {
            text: truncate_chars(&text[span.clone()], MAX_EVIDENCE_CHARS),
            span: Some(span),
            note,
        }
    }

    fn note(note: String) -> Evidence {
        Evidence {
            span: None,
            text: String::new(),
            note,
        }
    }
}

/// One rule that fired on one trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Id of the rule.
    pub rule_id: String,
    /// Field the rule looked at.
    pub field: Field,
    /// What it found.
    pub evidence: Evidence,
}

/// Parameters of the `length` kind.
#[derive(Debug, Clone, PartialEq)]
pub struct LengthParams {
    /// Fewer tokens than this fires the rule.
    pub min_tokens: Option<u64>,
    /// More tokens than this fires the rule.
    pub max_tokens: Option<u64>,
    /// Characters per token for the estimate used when the teacher reported no usage.
    pub chars_per_token: f64,
}

/// A compiled rule check.
#[derive(Debug, Clone)]
pub enum Check {
    /// A regex with its action.
    Regex {
        /// The compiled pattern.
        regex: Regex,
        /// What a match means.
        action: Action,
    },
    /// See [`Kind::ThinkWellFormed`].
    ThinkWellFormed(ThinkParams),
    /// See [`Kind::Repetition`].
    Repetition(RepetitionParams),
    /// See [`Kind::MixedScript`].
    MixedScript(MixedScriptParams),
    /// See [`Kind::Length`].
    Length(LengthParams),
    /// See [`Kind::Truncated`].
    Truncated {
        /// `finish_reason` values that mean truncation.
        finish_reasons: Vec<String>,
    },
}

/// One validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    id: String,
    description: String,
    field: Field,
    on_missing: OnMissing,
    check: Check,
    file: PathBuf,
    line: usize,
}

impl Rule {
    /// Unique id, reported in findings.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the rule is for.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Field the rule looks at.
    pub fn field(&self) -> Field {
        self.field
    }

    /// What the rule does when its field is absent.
    pub fn on_missing(&self) -> OnMissing {
        self.on_missing
    }

    /// The compiled check.
    pub fn check(&self) -> &Check {
        &self.check
    }

    /// File the rule was loaded from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Line of the rule's `id` in that file.
    pub fn line(&self) -> usize {
        self.line
    }

    /// Runs the rule on one trace: `Some` when it fires.
    pub fn evaluate(&self, input: &RuleInput<'_>) -> Option<Finding> {
        let finding = |evidence| {
            Some(Finding {
                rule_id: self.id.clone(),
                field: self.field,
                evidence,
            })
        };
        if let Check::Truncated { finish_reasons } = &self.check {
            let reason = input.finish_reason?;
            if !finish_reasons.iter().any(|r| r == reason) {
                return None;
            }
            let note = format!("finish_reason = {reason:?}; the text ends mid-generation");
            return match self.field.get(input) {
                Some(text) => finding(Evidence::at(text, tail(text), note)),
                None => finding(Evidence::note(note)),
            };
        }
        let Some(text) = self.field.get(input) else {
            return match self.on_missing {
                OnMissing::Skip => None,
                OnMissing::Reject => finding(Evidence::note(format!(
                    "field `{}` is missing and this rule requires it",
                    self.field
                ))),
            };
        };
        let evidence = match &self.check {
            Check::Regex { regex, action } => match action {
                Action::RejectIfMatch => {
                    let m = regex.find(text)?;
                    Evidence::at(text, m.range(), "matched the rule's pattern".to_string())
                }
                Action::RequireMatch => {
                    if regex.is_match(text) {
                        return None;
                    }
                    Evidence::at(
                        text,
                        tail(text),
                        "required pattern not found; text shows the end of the field".to_string(),
                    )
                }
            },
            Check::ThinkWellFormed(p) => {
                let (problem, span) = check_think(text, p).err()?;
                Evidence::at(text, span, format!("malformed think block: {problem}"))
            }
            Check::Repetition(p) => {
                let hit = find_repetition(text, p)?;
                let ngram = truncate_chars(&text[hit.ngram_span.clone()], MAX_EVIDENCE_CHARS);
                Evidence::at(
                    text,
                    hit.loop_span.clone(),
                    format!(
                        "a {}-{} sequence occurs {} times (limit {}); repeated {}-grams cover \
                         {:.0}% of the text; sequence: {ngram:?}",
                        p.ngram,
                        p.unit,
                        hit.repeats,
                        p.max_repeats,
                        p.unit,
                        hit.coverage * 100.0
                    ),
                )
            }
            Check::MixedScript(p) => match find_mixed_script(text, p)? {
                MixedScriptHit::Foreign {
                    span,
                    foreign,
                    letters,
                    scripts,
                } => {
                    let scripts: Vec<String> = scripts.iter().map(Script::to_string).collect();
                    Evidence::at(
                        text,
                        span,
                        format!(
                            "{foreign} of {letters} letters ({:.1}%) are {}; limit {:.1}%",
                            foreign as f64 * 100.0 / letters.max(1) as f64,
                            scripts.join("/"),
                            p.max_fraction * 100.0
                        ),
                    )
                }
                MixedScriptHit::Replacement { span, run } => Evidence::at(
                    text,
                    span,
                    format!("run of {run} U+FFFD replacement characters"),
                ),
            },
            Check::Length(p) => {
                let reported = match self.field {
                    Field::Completion => input.completion_tokens,
                    _ => None,
                };
                let count = count_tokens(text, reported, p.chars_per_token);
                let source = if count.estimated {
                    format!(
                        "~{} tokens (estimated as {} chars / {})",
                        count.tokens, count.chars, p.chars_per_token
                    )
                } else {
                    format!("{} tokens (usage.completion_tokens)", count.tokens)
                };
                if let Some(min) = p.min_tokens.filter(|&m| count.tokens < m) {
                    Evidence::note(format!("{source}, below min_tokens = {min}"))
                } else if let Some(max) = p.max_tokens.filter(|&m| count.tokens > m) {
                    Evidence::note(format!("{source}, above max_tokens = {max}"))
                } else {
                    return None;
                }
            }
            Check::Truncated { .. } => return None,
        };
        finding(evidence)
    }
}

/// The last (up to) 120 characters of `text`, shown when the evidence is "something is
/// missing" or "it stopped here".
fn tail(text: &str) -> Range<usize> {
    let start = text
        .char_indices()
        .rev()
        .nth(119)
        .map_or(0, |(i, _)| floor_char_boundary(text, i));
    start..text.len()
}

/// An error in a rule file. Every variant that concerns the file's content names the file and
/// the line; those inside a rule also name the rule.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The file could not be read.
    #[error("{}: cannot read rule file: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax errors, unknown keys and values of the wrong type.
    #[error("{}:{line}: {}{message}", file.display(), in_rule(rule.as_deref()))]
    Parse {
        /// The rule file.
        file: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// The enclosing rule's id, when it could be determined.
        rule: Option<String>,
        /// The parser's message.
        message: String,
    },
    /// A pattern that does not compile.
    #[error("{}:{line}: rule `{rule}`: invalid regex: {source}", file.display())]
    Regex {
        /// The rule file.
        file: PathBuf,
        /// 1-based line of the `pattern`.
        line: usize,
        /// The rule's id.
        rule: String,
        /// The regex compiler's error.
        #[source]
        source: Box<regex::Error>,
    },
    /// An inline example that the rule does not classify as its author said.
    #[error("{}:{line}: rule `{rule}`: example failed: {message}", file.display())]
    Example {
        /// The rule file.
        file: PathBuf,
        /// 1-based line of the example.
        line: usize,
        /// The rule's id.
        rule: String,
        /// Which example and what happened.
        message: String,
    },
    /// A rule that parses but makes no sense (missing pattern, parameter of another kind,
    /// duplicate id, out-of-range value).
    #[error("{}:{line}: rule `{rule}`: {message}", file.display())]
    Invalid {
        /// The rule file.
        file: PathBuf,
        /// 1-based line of the offending key.
        line: usize,
        /// The rule's id.
        rule: String,
        /// What is wrong.
        message: String,
    },
}

fn in_rule(rule: Option<&str>) -> String {
    rule.map(|r| format!("rule `{r}`: ")).unwrap_or_default()
}

impl RuleError {
    /// The rule file the error is about.
    pub fn file(&self) -> &Path {
        match self {
            RuleError::Io { path, .. } => path,
            RuleError::Parse { file, .. }
            | RuleError::Regex { file, .. }
            | RuleError::Example { file, .. }
            | RuleError::Invalid { file, .. } => file,
        }
    }

    /// 1-based line, when the error concerns the file's content.
    pub fn line(&self) -> Option<usize> {
        match self {
            RuleError::Io { .. } => None,
            RuleError::Parse { line, .. }
            | RuleError::Regex { line, .. }
            | RuleError::Example { line, .. }
            | RuleError::Invalid { line, .. } => Some(*line),
        }
    }

    /// The rule's id, when the error is inside a rule.
    pub fn rule(&self) -> Option<&str> {
        match self {
            RuleError::Io { .. } => None,
            RuleError::Parse { rule, .. } => rule.as_deref(),
            RuleError::Regex { rule, .. }
            | RuleError::Example { rule, .. }
            | RuleError::Invalid { rule, .. } => Some(rule),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw file format
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    description: Spanned<String>,
    field: Option<Spanned<Field>>,
    kind: Option<Spanned<Kind>>,
    on_missing: Option<Spanned<OnMissing>>,
    examples: Option<RawExamples>,
    // regex
    pattern: Option<Spanned<String>>,
    action: Option<Spanned<Action>>,
    // think_well_formed
    open_tag: Option<Spanned<String>>,
    close_tag: Option<Spanned<String>>,
    allow_implicit_open: Option<Spanned<bool>>,
    // repetition
    unit: Option<Spanned<Unit>>,
    ngram: Option<Spanned<usize>>,
    max_repeats: Option<Spanned<usize>>,
    max_coverage: Option<Spanned<f64>>,
    // mixed_script
    allowed_scripts: Option<Spanned<Vec<Script>>>,
    max_fraction: Option<Spanned<f64>>,
    min_foreign: Option<Spanned<usize>>,
    replacement_run: Option<Spanned<usize>>,
    // length
    min_tokens: Option<Spanned<u64>>,
    max_tokens: Option<Spanned<u64>>,
    chars_per_token: Option<Spanned<f64>>,
    // truncated
    finish_reasons: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExamples {
    #[serde(rename = "match", default)]
    matches: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    no_match: Vec<Spanned<toml::Value>>,
}

/// An example after its shape has been checked: examples are parsed as plain values first so
/// that a malformed one is reported at its own line with a precise message.
enum RawExample {
    Text(String),
    Record(RawRecord),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    #[serde(default)]
    completion: String,
    reasoning: Option<String>,
    answer: Option<String>,
    finish_reason: Option<String>,
    completion_tokens: Option<u64>,
}

/// Only the rule headers, parsed leniently to name the rule around a parse error.
#[derive(Deserialize)]
struct LenientFile {
    #[serde(default)]
    rule: Vec<Spanned<LenientRule>>,
}

#[derive(Deserialize)]
struct LenientRule {
    id: Option<String>,
}

fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Context for turning spans into errors while one rule is being compiled.
struct Ctx<'a> {
    src: &'a str,
    file: &'a Path,
    rule: &'a str,
}

impl Ctx<'_> {
    fn invalid(&self, span: Range<usize>, message: impl Into<String>) -> RuleError {
        RuleError::Invalid {
            file: self.file.to_path_buf(),
            line: line_of(self.src, span.start),
            rule: self.rule.to_string(),
            message: message.into(),
        }
    }

    fn example(&self, span: Range<usize>, message: String) -> RuleError {
        RuleError::Example {
            file: self.file.to_path_buf(),
            line: line_of(self.src, span.start),
            rule: self.rule.to_string(),
            message,
        }
    }
}

fn parse_error(src: &str, file: &Path, err: toml::de::Error) -> RuleError {
    let offset = err.span().map_or(0, |s| s.start);
    let rule = toml::from_str::<LenientFile>(src).ok().and_then(|f| {
        f.rule
            .into_iter()
            .take_while(|r| r.span().start <= offset)
            .last()
            .and_then(|r| r.into_inner().id)
    });
    RuleError::Parse {
        file: file.to_path_buf(),
        line: line_of(src, offset),
        rule,
        message: err.message().trim().to_string(),
    }
}

fn compile_rule(raw: RawRule, ctx: &Ctx<'_>) -> Result<Rule, RuleError> {
    let kind = raw.kind.as_ref().map_or(Kind::Regex, |k| *k.get_ref());
    let kind_span = raw.kind.as_ref().map_or(raw.id.span(), |k| k.span());

    // Parameters present in the file, by name, with the kinds they belong to.
    let params: [(&str, Option<Range<usize>>, Kind); 17] = [
        (
            "pattern",
            raw.pattern.as_ref().map(Spanned::span),
            Kind::Regex,
        ),
        (
            "action",
            raw.action.as_ref().map(Spanned::span),
            Kind::Regex,
        ),
        (
            "open_tag",
            raw.open_tag.as_ref().map(Spanned::span),
            Kind::ThinkWellFormed,
        ),
        (
            "close_tag",
            raw.close_tag.as_ref().map(Spanned::span),
            Kind::ThinkWellFormed,
        ),
        (
            "allow_implicit_open",
            raw.allow_implicit_open.as_ref().map(Spanned::span),
            Kind::ThinkWellFormed,
        ),
        (
            "unit",
            raw.unit.as_ref().map(Spanned::span),
            Kind::Repetition,
        ),
        (
            "ngram",
            raw.ngram.as_ref().map(Spanned::span),
            Kind::Repetition,
        ),
        (
            "max_repeats",
            raw.max_repeats.as_ref().map(Spanned::span),
            Kind::Repetition,
        ),
        (
            "max_coverage",
            raw.max_coverage.as_ref().map(Spanned::span),
            Kind::Repetition,
        ),
        (
            "allowed_scripts",
            raw.allowed_scripts.as_ref().map(Spanned::span),
            Kind::MixedScript,
        ),
        (
            "max_fraction",
            raw.max_fraction.as_ref().map(Spanned::span),
            Kind::MixedScript,
        ),
        (
            "min_foreign",
            raw.min_foreign.as_ref().map(Spanned::span),
            Kind::MixedScript,
        ),
        (
            "replacement_run",
            raw.replacement_run.as_ref().map(Spanned::span),
            Kind::MixedScript,
        ),
        (
            "min_tokens",
            raw.min_tokens.as_ref().map(Spanned::span),
            Kind::Length,
        ),
        (
            "max_tokens",
            raw.max_tokens.as_ref().map(Spanned::span),
            Kind::Length,
        ),
        (
            "chars_per_token",
            raw.chars_per_token.as_ref().map(Spanned::span),
            Kind::Length,
        ),
        (
            "finish_reasons",
            raw.finish_reasons.as_ref().map(Spanned::span),
            Kind::Truncated,
        ),
    ];
    for (name, span, owner) in &params {
        if let (Some(span), true) = (span, *owner != kind) {
            return Err(ctx.invalid(
                span.clone(),
                format!(
                    "`{name}` is a parameter of kind `{}`, not of kind `{}`",
                    owner.as_str(),
                    kind.as_str()
                ),
            ));
        }
    }

    let fraction = |v: &Option<Spanned<f64>>, name: &str| -> Result<Option<f64>, RuleError> {
        match v {
            Some(s) if !(0.0..=1.0).contains(s.get_ref()) => {
                Err(ctx.invalid(s.span(), format!("`{name}` must be between 0 and 1")))
            }
            Some(s) => Ok(Some(*s.get_ref())),
            None => Ok(None),
        }
    };

    let check = match kind {
        Kind::Regex => {
            let pattern = raw
                .pattern
                .as_ref()
                .ok_or_else(|| ctx.invalid(kind_span.clone(), "regex rule without `pattern`"))?;
            let action = raw
                .action
                .as_ref()
                .ok_or_else(|| ctx.invalid(kind_span.clone(), "regex rule without `action`"))?;
            let regex = Regex::new(pattern.get_ref()).map_err(|e| RuleError::Regex {
                file: ctx.file.to_path_buf(),
                line: line_of(ctx.src, pattern.span().start),
                rule: ctx.rule.to_string(),
                source: Box::new(e),
            })?;
            Check::Regex {
                regex,
                action: *action.get_ref(),
            }
        }
        Kind::ThinkWellFormed => {
            let d = ThinkParams::default();
            let p = ThinkParams {
                open_tag: raw.open_tag.map_or(d.open_tag, Spanned::into_inner),
                close_tag: raw.close_tag.map_or(d.close_tag, Spanned::into_inner),
                allow_implicit_open: raw
                    .allow_implicit_open
                    .map_or(d.allow_implicit_open, Spanned::into_inner),
            };
            if p.open_tag.is_empty() || p.close_tag.is_empty() || p.open_tag == p.close_tag {
                return Err(ctx.invalid(kind_span, "tags must be non-empty and different"));
            }
            Check::ThinkWellFormed(p)
        }
        Kind::Repetition => {
            let d = RepetitionParams::default();
            if let Some(n) = raw.ngram.as_ref().filter(|n| *n.get_ref() == 0) {
                return Err(ctx.invalid(n.span(), "`ngram` must be at least 1"));
            }
            Check::Repetition(RepetitionParams {
                unit: raw.unit.map_or(d.unit, Spanned::into_inner),
                ngram: raw.ngram.map_or(d.ngram, Spanned::into_inner),
                max_repeats: raw.max_repeats.map_or(d.max_repeats, Spanned::into_inner),
                max_coverage: fraction(&raw.max_coverage, "max_coverage")?.or(d.max_coverage),
            })
        }
        Kind::MixedScript => {
            let d = MixedScriptParams::default();
            Check::MixedScript(MixedScriptParams {
                allowed: raw.allowed_scripts.map_or(d.allowed, Spanned::into_inner),
                max_fraction: fraction(&raw.max_fraction, "max_fraction")?
                    .unwrap_or(d.max_fraction),
                min_foreign: raw.min_foreign.map_or(d.min_foreign, Spanned::into_inner),
                replacement_run: raw
                    .replacement_run
                    .map_or(d.replacement_run, Spanned::into_inner),
            })
        }
        Kind::Length => {
            if raw.min_tokens.is_none() && raw.max_tokens.is_none() {
                return Err(
                    ctx.invalid(kind_span, "length rule needs `min_tokens` or `max_tokens`")
                );
            }
            if let (Some(min), Some(max)) = (&raw.min_tokens, &raw.max_tokens) {
                if min.get_ref() > max.get_ref() {
                    return Err(ctx.invalid(min.span(), "`min_tokens` is above `max_tokens`"));
                }
            }
            let chars_per_token = match &raw.chars_per_token {
                Some(c) if !(*c.get_ref() > 0.0 && c.get_ref().is_finite()) => {
                    return Err(ctx.invalid(c.span(), "`chars_per_token` must be positive"));
                }
                Some(c) => *c.get_ref(),
                None => 4.0,
            };
            Check::Length(LengthParams {
                min_tokens: raw.min_tokens.map(Spanned::into_inner),
                max_tokens: raw.max_tokens.map(Spanned::into_inner),
                chars_per_token,
            })
        }
        Kind::Truncated => Check::Truncated {
            finish_reasons: raw
                .finish_reasons
                .map_or_else(|| vec!["length".to_string()], Spanned::into_inner),
        },
    };

    let rule = Rule {
        id: ctx.rule.to_string(),
        description: raw.description.into_inner(),
        field: raw.field.map_or(Field::Completion, Spanned::into_inner),
        on_missing: raw.on_missing.map_or(OnMissing::Skip, Spanned::into_inner),
        check,
        file: ctx.file.to_path_buf(),
        line: line_of(ctx.src, raw.id.span().start),
    };
    if let Some(examples) = raw.examples {
        for (expected, list) in [(true, &examples.matches), (false, &examples.no_match)] {
            for ex in list {
                check_example(&rule, ex, expected, ctx)?;
            }
        }
    }
    Ok(rule)
}

fn check_example(
    rule: &Rule,
    ex: &Spanned<toml::Value>,
    expected: bool,
    ctx: &Ctx<'_>,
) -> Result<(), RuleError> {
    let list = if expected { "match" } else { "no_match" };
    let example = match ex.get_ref() {
        toml::Value::String(t) => RawExample::Text(t.clone()),
        v @ toml::Value::Table(_) => {
            RawExample::Record(v.clone().try_into().map_err(|e: toml::de::Error| {
                ctx.invalid(ex.span(), format!("{list} example: {}", e.message().trim()))
            })?)
        }
        other => {
            return Err(ctx.invalid(
                ex.span(),
                format!(
                    "{list} example must be a string or a table, not {}",
                    other.type_str()
                ),
            ))
        }
    };
    let mut input = RuleInput::default();
    let shown;
    match &example {
        RawExample::Text(t) => {
            match rule.field {
                Field::Completion => input.completion = t,
                Field::Reasoning => input.reasoning = Some(t),
                Field::Answer => input.answer = Some(t),
            }
            shown = format!("{:?}", truncate_chars(t, 80));
        }
        RawExample::Record(r) => {
            input = RuleInput {
                completion: &r.completion,
                reasoning: r.reasoning.as_deref(),
                answer: r.answer.as_deref(),
                finish_reason: r.finish_reason.as_deref(),
                completion_tokens: r.completion_tokens,
            };
            shown = format!("{:?}", truncate_chars(&r.completion, 80));
        }
    }
    let (got, what) = match &rule.check {
        Check::Regex { regex, .. } => {
            let text = rule.field.get(&input).ok_or_else(|| {
                ctx.example(
                    ex.span(),
                    format!("{list} example has no `{}` text", rule.field),
                )
            })?;
            (regex.is_match(text), "the pattern matches")
        }
        _ => (rule.evaluate(&input).is_some(), "the check fires"),
    };
    if got == expected {
        return Ok(());
    }
    let verdict = if expected {
        format!("expected {what}, but it does not")
    } else {
        format!("expected not ({what}), but it does")
    };
    Err(ctx.example(ex.span(), format!("{list} example {shown}: {verdict}")))
}

/// A validated, ordered set of rules, safe to share across threads.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    /// Parses and validates one rule file's contents; `file` is only used in errors and
    /// findings. Every inline example is checked.
    pub fn from_toml_str(src: &str, file: impl AsRef<Path>) -> Result<RuleSet, RuleError> {
        let file = file.as_ref();
        let raw: RawFile = toml::from_str(src).map_err(|e| parse_error(src, file, e))?;
        let mut set = RuleSet::default();
        for r in raw.rule {
            let id = r.id.get_ref().clone();
            let ctx = Ctx {
                src,
                file,
                rule: &id,
            };
            if id.trim().is_empty() {
                return Err(ctx.invalid(r.id.span(), "rule id is empty"));
            }
            let rule = compile_rule(r, &ctx)?;
            set.push(rule)?;
        }
        Ok(set)
    }

    /// Loads one rule file.
    pub fn load_file(path: impl AsRef<Path>) -> Result<RuleSet, RuleError> {
        let path = path.as_ref();
        let src = std::fs::read_to_string(path).map_err(|source| RuleError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        RuleSet::from_toml_str(&src, path)
    }

    /// Loads several rule files in order into one set; rule ids must be unique across them.
    pub fn load_files<P: AsRef<Path>>(paths: &[P]) -> Result<RuleSet, RuleError> {
        let mut set = RuleSet::default();
        for p in paths {
            set.extend(RuleSet::load_file(p)?)?;
        }
        Ok(set)
    }

    /// Loads every `*.toml` file of a directory, in file-name order so that rule order (and
    /// therefore the order of findings) does not depend on the file system.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<RuleSet, RuleError> {
        let dir = dir.as_ref();
        let io = |source| RuleError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        RuleSet::load_files(&paths)
    }

    /// The embedded [`DEFAULT_RULES_TOML`].
    pub fn builtin_default() -> Result<RuleSet, RuleError> {
        RuleSet::from_toml_str(DEFAULT_RULES_TOML, DEFAULT_RULES_PATH)
    }

    /// Appends the rules of `other`; an id that is already present is an error naming both
    /// places.
    pub fn extend(&mut self, other: RuleSet) -> Result<(), RuleError> {
        for rule in other.rules {
            self.push(rule)?;
        }
        Ok(())
    }

    fn push(&mut self, rule: Rule) -> Result<(), RuleError> {
        if let Some(prev) = self.get(&rule.id) {
            return Err(RuleError::Invalid {
                file: rule.file.clone(),
                line: rule.line,
                rule: rule.id.clone(),
                message: format!(
                    "duplicate rule id (first defined at {}:{})",
                    prev.file.display(),
                    prev.line
                ),
            });
        }
        self.rules.push(rule);
        Ok(())
    }

    /// Keeps only the rules for which `keep` returns true (e.g. to disable rules by id).
    pub fn retain(&mut self, keep: impl FnMut(&Rule) -> bool) {
        self.rules.retain(keep);
    }

    /// The rules, in load order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule with this id.
    pub fn get(&self, id: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id)
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Runs every rule on one trace; findings come in rule order. An empty result means the
    /// trace passes.
    pub fn evaluate(&self, input: &RuleInput<'_>) -> Vec<Finding> {
        self.rules
            .iter()
            .filter_map(|r| r.evaluate(input))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn types_are_thread_safe() {
        assert_send_sync::<RuleSet>();
        assert_send_sync::<Rule>();
        assert_send_sync::<Finding>();
    }

    #[test]
    fn embedded_default_loads() {
        let set = RuleSet::builtin_default().unwrap_or_else(|e| panic!("{e}"));
        assert!(!set.is_empty());
    }

    #[test]
    fn param_of_other_kind_is_rejected_with_line() {
        let src = "[[rule]]\nid = \"len\"\ndescription = \"d\"\nkind = \"length\"\nmin_tokens = 3\nngram = 4\n";
        let err = RuleSet::from_toml_str(src, "x.toml").expect_err("must fail");
        assert_eq!(err.line(), Some(6), "{err}");
        assert_eq!(err.rule(), Some("len"));
    }

    #[test]
    fn unknown_key_names_rule_and_line() {
        let src = "[[rule]]\nid = \"a\"\ndescription = \"d\"\npattern = \"x\"\naction = \"reject_if_match\"\n\n[[rule]]\nid = \"b\"\ndescription = \"d\"\npatern = \"x\"\n";
        let err = RuleSet::from_toml_str(src, "x.toml").expect_err("must fail");
        assert_eq!(err.line(), Some(10), "{err}");
        assert_eq!(err.rule(), Some("b"), "{err}");
    }

    #[test]
    fn missing_field_policy() {
        let src = "[[rule]]\nid = \"r\"\ndescription = \"d\"\nfield = \"reasoning\"\non_missing = \"reject\"\npattern = \"x\"\naction = \"require_match\"\n";
        let set = RuleSet::from_toml_str(src, "x.toml").unwrap_or_else(|e| panic!("{e}"));
        let input = RuleInput {
            completion: "x",
            ..RuleInput::default()
        };
        assert_eq!(set.evaluate(&input).len(), 1);
    }
}
