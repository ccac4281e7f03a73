//! Math answer checking: decide whether a model completion reaches the same
//! final answer as a reference ("gold") answer.
//!
//! Distillation keeps or drops teacher traces based on this decision, so both
//! false positives (keeping a wrong trace) and false negatives (dropping a
//! right one) hurt. The checker therefore reports *why* it decided, not just
//! whether: every [`MathCheck`] carries the extracted answer span, both normal
//! forms and the [`Rule`] that settled the comparison.
//!
//! The pipeline has three stages:
//!
//! 1. **Extraction** ([`extract_answer`]): find the final answer inside a
//!    completion (last `\boxed{}`/`\fbox{}`, GSM8K `#### N`, "The answer is
//!    …", "Final Answer: …", bold answers near the end, `A: …` lines; then
//!    the last math span, the last line, and optionally the last number in the
//!    text). The gold is extracted the same way when it looks like a whole
//!    solution rather than a bare answer.
//! 2. **Normalisation and parsing** ([`normalize`], [`parse`]): strip LaTeX
//!    presentation (`\left`, `\text{}`, `$`, units, `%`, degrees, thousands
//!    separators, …) and parse into an [`Expr`] tree.
//! 3. **Comparison**: exact rational arithmetic whenever both sides are
//!    numbers (including factorials and binomials under a size cap), numeric
//!    evaluation for irrational values, evaluation at fixed sample points for
//!    expressions with free variables, and structural rules for sets, tuples,
//!    intervals, relations and multiple-choice letters.
//!
//! # Numeric rules
//!
//! * Two exact values (integers, terminating decimals, fractions, and any
//!   arithmetic on them) are equal only if they are equal as rationals.
//!   `1/2004!` and `1/2006!` are different; `0.75` and `\frac{3}{4}` are equal.
//! * **Decimal rounding**: a decimal literal written with `k >= 2` digits after
//!   the point also matches a value that is *not* a terminating decimal
//!   (`1/3`, `\pi`, `\sqrt{2}`) when that value rounds to the literal at `k`
//!   digits, i.e. `|v - d| <= 0.5 * 10^-k`. So `0.33` matches `1/3` and `3.14`
//!   matches `\pi`, but `0.3` does not match `1/3` and `0.76` does not match
//!   `0.755` (a terminating decimal must match exactly).
//! * **Numeric tolerance**: when either side is irrational the values are
//!   compared in double precision with relative tolerance
//!   [`MathOptions::rel_tol`] (default `1e-9`); values within `1e-12` of zero
//!   are compared absolutely. Values that overflow or underflow double
//!   precision are never compared numerically.
//! * **Free variables**: expressions such as `x^2 + 2x + 1` and `(x+1)^2` are
//!   evaluated at eight fixed, irregular sample points per variable; they are
//!   equal when every point where both sides are defined agrees (and at least
//!   one point is defined), and unequal as soon as one point disagrees.
//! * **Percent**: `%` is stripped, so `10\%` equals `10`; when exactly one side
//!   carried a percent sign its value divided by 100 is also accepted
//!   (`10\%` equals `0.1`).
//!
//! # Answer forms
//!
//! * **Relations**: `<`, `>`, `\le`, `\ge`, `\lt`, `\gt`, `\ne`, `<=`, `>=`, `!=` and their
//!   unicode forms. Two relations are equal when their operator agrees (after writing `<` as
//!   `>` with sides swapped) and `lhs - rhs` of one is a constant multiple of the other's at
//!   every sample point (positive for inequalities), so `-x > -1` equals `x < 1`, and lines,
//!   planes and conics equal any rearrangement or nonzero multiple (`2x+4y-3=0` and
//!   `y=-\frac{1}{2}x+\frac{3}{4}`). A chain `a < x \le b` around a label is the interval
//!   `(a, b]`, around `|x|` the union of its two mirrored intervals; a relation in one label
//!   against an interval or union is compared as the set it states, whichever side it is on.
//! * **Matrices**: `pmatrix`, `bmatrix`, `vmatrix`, `matrix` and `array` (also inside
//!   `\left[ … \right]`) are equal when they have the same shape and equal entries; sums,
//!   products and scalar multiples of written matrices are evaluated entry by entry, and a
//!   single row or column equals the tuple of its entries.
//! * **Several answers**: boxes written together (`\boxed{1}, \boxed{2}`, `\boxed{a} \quad
//!   \text{and} \quad \boxed{b}`, or a short phrase with "and"/"or" between them) are one
//!   answer, a list compared as an unordered collection with the gold's list, set or boxes; a box
//!   that a later sentence revises ("… \boxed{3}. After checking, … \boxed{5}") is not joined.
//!   Math spans joined the same way (`$x = 2$ and $x = 3$`) are one answer too. Collections
//!   compare as sets: a repeated element counts once.
//! * **Labelled answers**: an equation whose one side is a label (`x`, `AB`, `|AB|`, `f(x)`,
//!   `\frac{NO}{BO}`, `V_1 : V_2`, `(p, q)`) states its other side, so `(p,q)=(3,2)` equals
//!   `(3,2)` and `AB=4,CD=5` equals `4, 5`; `;` separates solutions (`p=5,q=2;p=7,q=2` is
//!   `(5,2),(7,2)`). A chained `x = 5+5+1 = 7 = 11` states its last value for its last label;
//!   `\approx` and what follows an exact value are dropped. The gold guides the reading, as in
//!   math-verify: a predicted equation ends in its value (`2x + z = 1` answers `1`), while a gold
//!   equation in unknowns (`2x + z = 1`) does not accept a bare `1`. `a : b` is the ratio `a/b`.
//! * **Number formats**: digit groups separated by `,`, `{,}`, `\,`, `\!`, `\ `, thin or plain
//!   spaces (`11,\! 111,\! 100`, `1 000`) are one number; currency signs and codes and unit
//!   words around a number are dropped. A lone number with a decimal comma (`1000,99`, `0,111`,
//!   `2,74`) is read as a decimal. **Ambiguous `1,222`** (a comma followed by exactly three
//!   digits) is a thousands separator, i.e. `1222`, unless the integer part is `0`; `1,2` stays
//!   the list `1, 2` unless the gold is a decimal number such as `1.2`. A numeral with a base
//!   subscript from 2 to 10 (`204_5`) is read in that base.
//! * **Long completions**: after the answer markers, the last math span (joined as above) or,
//!   for numeric golds, whichever of it and the last number comes later; then the statement of
//!   the last line. An answer phrase followed by prose ("The largest $n$ is 34") is narrowed to
//!   what follows its last linking word. A number inside a word (`AZYUK2A`) is never an answer.
//! * **Dataset oddities**: LaTeX stored with doubled backslashes (`\\frac`, `\\left(`) is read
//!   as LaTeX; two answers whose normal forms are the same text are equal even when neither
//!   parses (`12:00`).
//!
//! # Deadlines
//!
//! Every check runs against an [`Instant`] deadline that the parser and the
//! evaluator poll in their loops and recursion; no signals or threads are
//! used, so checks can run concurrently. Exact arithmetic is capped
//! ([`MathOptions::max_exact_bits`], [`MathOptions::max_factorial`]); beyond
//! the caps a value falls back to numeric evaluation or structural comparison,
//! so `2^{10^{9}}` cannot hang.

mod compare;
mod eval;
mod extract;
mod normalize;
mod parse;

use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use extract::{extract_answer, AnswerSpan, ExtractMethod};
pub use normalize::{normalize, Normalized};
pub use parse::{parse, Constant, Expr, Func, ParseError, RelOp};

/// Outcome of one check. Not a bool, so callers can tell "the model was wrong"
/// apart from "the checker could not read one side" or "the check ran out of
/// time", which a filter may want to treat differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The prediction's final answer is equivalent to the gold answer.
    Correct,
    /// Both answers were understood and they differ.
    Incorrect,
    /// No answer could be extracted from, or parsed out of, the gold.
    UnparseableGold,
    /// No answer could be extracted from, or parsed out of, the prediction.
    UnparseablePred,
    /// The deadline passed before a decision was reached.
    Timeout,
}

/// The rule that decided a check, kept as evidence so verdicts can be audited
/// and rule-specific error rates measured. For an `Incorrect` verdict it names
/// the comparison that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The normalised strings were identical.
    StringEqual,
    /// Both sides evaluated to exact rationals, compared exactly.
    RationalEqual,
    /// A decimal literal was compared with a non-terminating value by rounding.
    DecimalRounding,
    /// Values were compared in floating point with the relative tolerance.
    NumericTolerance,
    /// One side carried a percent sign and matched after dividing by 100.
    PercentScaled,
    /// Expressions with free variables were compared at sample points.
    SymbolicSample,
    /// Trees were compared by their printed structure (last resort).
    StructuralEqual,
    /// Unordered collections were matched element by element.
    SetEqual,
    /// Ordered collections were compared position by position.
    TupleEqual,
    /// Intervals were compared by bounds and open/closed ends.
    IntervalEqual,
    /// Relations (`=`, `<`, `\le`, …) were compared after canonical ordering.
    RelationEqual,
    /// Multiple-choice letters were compared.
    ChoiceEqual,
    /// Plain-text answers were compared case-insensitively.
    TextEqual,
    /// The two answers have different shapes (e.g. a set and a number).
    KindMismatch,
    /// No final answer could be extracted.
    NoAnswer,
    /// An answer was extracted but could not be parsed.
    ParseFailure,
    /// The deadline passed.
    Deadline,
}

/// When to fall back to the last number in a completion if no explicit answer
/// marker (`\boxed{}`, `####`, "The answer is", …) is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LastNumberFallback {
    /// Never guess: a completion without an answer marker is unparseable.
    Never,
    /// Guess only when the gold is a plain number (GSM8K-style), where the
    /// last number in a worked solution is usually the answer.
    #[default]
    PlainNumberGold,
    /// Always guess.
    Always,
}

/// Knobs for [`check`]. The defaults suit GSM8K and MATH style data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MathOptions {
    /// Last-number fallback policy for predictions.
    pub fallback: LastNumberFallback,
    /// Time budget of one check in milliseconds; [`check_batch`] applies it
    /// per row, starting when the row starts.
    pub budget_ms: u64,
    /// Relative tolerance for floating-point comparison of irrational values.
    pub rel_tol: f64,
    /// Largest exact intermediate value, in bits of numerator plus
    /// denominator; larger values fall back to floating point.
    pub max_exact_bits: u64,
    /// Largest `n` for which `n!` and `\binom{n}{k}` are computed exactly.
    pub max_factorial: u64,
}

impl Default for MathOptions {
    fn default() -> Self {
        Self {
            fallback: LastNumberFallback::default(),
            budget_ms: 2_000,
            rel_tol: 1e-9,
            max_exact_bits: 200_000,
            max_factorial: 10_000,
        }
    }
}

impl MathOptions {
    /// The per-check time budget as a [`Duration`].
    pub fn budget(&self) -> Duration {
        Duration::from_millis(self.budget_ms)
    }
}

/// A verdict plus the evidence behind it; serialisable so it can be stored
/// next to each filtered trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MathCheck {
    /// The decision.
    pub verdict: Verdict,
    /// The rule that decided.
    pub rule: Rule,
    /// The answer extracted from the gold (the whole gold for bare answers).
    pub gold_span: Option<AnswerSpan>,
    /// The answer extracted from the prediction, with its byte range.
    pub pred_span: Option<AnswerSpan>,
    /// Normal form of the gold answer.
    pub gold_normal: Option<String>,
    /// Normal form of the predicted answer.
    pub pred_normal: Option<String>,
}

impl MathCheck {
    fn bare(verdict: Verdict, rule: Rule) -> Self {
        Self {
            verdict,
            rule,
            gold_span: None,
            pred_span: None,
            gold_normal: None,
            pred_normal: None,
        }
    }

    /// Convenience for filters: true only for [`Verdict::Correct`].
    pub fn is_correct(&self) -> bool {
        self.verdict == Verdict::Correct
    }
}

/// Raised when the deadline passes; carried through parsing and evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("math check deadline exceeded")]
pub struct TimedOut;

/// A point in time after which work must stop. Polled (cheaply) from loops
/// and recursion instead of relying on signals, so it is thread-safe.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline(Instant);

impl Deadline {
    pub(crate) fn new(at: Instant) -> Self {
        Self(at)
    }

    /// Errors once the deadline has passed.
    pub(crate) fn check(&self) -> Result<(), TimedOut> {
        if Instant::now() >= self.0 {
            Err(TimedOut)
        } else {
            Ok(())
        }
    }
}

/// Checks `pred` (a completion or a bare answer) against `gold` with the
/// budget from `opts`.
pub fn check(gold: &str, pred: &str, opts: &MathOptions) -> MathCheck {
    check_until(gold, pred, opts, Instant::now() + opts.budget())
}

/// Checks `pred` against `gold`, stopping with [`Verdict::Timeout`] once
/// `deadline` passes. Use this when a caller shares one deadline across work.
pub fn check_until(gold: &str, pred: &str, opts: &MathOptions, deadline: Instant) -> MathCheck {
    let deadline = Deadline::new(deadline);
    if deadline.check().is_err() {
        return MathCheck::bare(Verdict::Timeout, Rule::Deadline);
    }
    let Some(gold_span) = gold_answer(gold, &deadline) else {
        return MathCheck::bare(Verdict::UnparseableGold, Rule::NoAnswer);
    };
    let gold_norm = normalize(&gold_span.text);
    let gold_expr = parse::parse_with(&gold_norm.text, &deadline);
    let fallback = match opts.fallback {
        LastNumberFallback::Never => false,
        LastNumberFallback::Always => true,
        LastNumberFallback::PlainNumberGold => gold_expr.as_ref().is_ok_and(Expr::is_plain_number),
    };
    let mut out = MathCheck::bare(Verdict::Incorrect, Rule::NoAnswer);
    out.gold_normal = Some(gold_norm.text.clone());
    out.gold_span = Some(gold_span);
    let gold_is_text = matches!(gold_expr, Ok(Expr::Text(_)));
    let gold_is_number = gold_expr.as_ref().is_ok_and(Expr::is_plain_number);
    let kind = GoldKind {
        text: gold_is_text,
        number: gold_is_number,
    };
    let Some(pred_span) = pred_answer(pred, fallback, kind, &deadline) else {
        out.verdict = Verdict::UnparseablePred;
        return out;
    };
    let pred_norm = normalize(&pred_span.text);
    out.pred_normal = Some(pred_norm.text.clone());
    out.pred_span = Some(pred_span);
    let (verdict, rule) = decide(&gold_norm, gold_expr, &pred_norm, &deadline, opts);
    out.verdict = verdict;
    out.rule = rule;
    out
}

/// Checks many `(gold, pred)` rows in parallel on every core, returning the
/// results in input order. Each row gets the full budget from `opts`,
/// measured from when that row starts.
pub fn check_batch(rows: &[(String, String)], opts: &MathOptions) -> Vec<MathCheck> {
    rows.par_iter()
        .map(|(gold, pred)| check(gold, pred, opts))
        .collect()
}

/// Picks the answer out of the gold: bare answers are used whole, solutions
/// (GSM8K `####`, MATH `\boxed{}`, or long multi-line text) go through
/// extraction without the last-number guess, and a sentence around math that
/// does not parse whole gives its answer marker or last math span.
fn gold_answer(gold: &str, deadline: &Deadline) -> Option<AnswerSpan> {
    let trimmed = gold.trim();
    if trimmed.is_empty() {
        return None;
    }
    if looks_like_solution(trimmed) {
        if let Some(span) = extract_answer(gold, false) {
            return Some(span);
        }
    }
    if ["$", "\\(", "\\["].iter().any(|d| trimmed.contains(d)) {
        // A sentence around math ("Therefore $x \ge 5$ is the solution.") states the math.
        let whole = parse::parse_with(&normalize(trimmed).text, deadline);
        if !whole.is_ok_and(|e| !matches!(e, Expr::Text(_))) {
            let kind = GoldKind {
                text: false,
                number: false,
            };
            let found =
                extract_answer(gold, false).or_else(|| last_math_span(gold, kind, deadline));
            if found.is_some() {
                return found;
            }
        }
    }
    let start = gold.len() - gold.trim_start().len();
    Some(AnswerSpan {
        text: trimmed.to_string(),
        start,
        end: start + trimmed.len(),
        method: ExtractMethod::Whole,
    })
}

/// What the gold is, as far as reading the prediction depends on it.
#[derive(Debug, Clone, Copy)]
struct GoldKind {
    /// The gold is plain text.
    text: bool,
    /// The gold is a plain number.
    number: bool,
}

/// Picks the answer out of the prediction: an explicit marker first, then
/// the whole prediction when it is a short bare answer, then the last math
/// span, then (if allowed) the last number.
fn pred_answer(
    pred: &str,
    fallback: bool,
    gold: GoldKind,
    deadline: &Deadline,
) -> Option<AnswerSpan> {
    if let Some(found) =
        extract_answer(pred, false).or_else(|| bare_answer(pred, gold.text, deadline))
    {
        return Some(narrow_boxed_prose(pred, found, gold, deadline));
    }
    let span = last_math_span(pred, gold, deadline);
    let number = fallback.then(|| extract_answer(pred, true)).flatten();
    match (span, number) {
        // Whichever comes last is the conclusion; a number inside the span is part of it.
        (Some(s), Some(n)) => Some(if n.end > s.end { n } else { s }),
        (None, None) => last_line_answer(pred, gold, deadline),
        (s, n) => s.or(n),
    }
}

/// A marked answer written as a sentence (`\boxed{\text{The answer is } 5}`)
/// against a gold that is not text: the value the sentence states.
fn narrow_boxed_prose(
    pred: &str,
    found: AnswerSpan,
    gold: GoldKind,
    deadline: &Deadline,
) -> AnswerSpan {
    let parsed = |s: &str| parse::parse_with(&normalize(s).text, deadline);
    let is_text = |s: &str| matches!(parsed(s), Ok(Expr::Text(_)));
    let is_slice = pred.get(found.start..found.end) == Some(found.text.as_str());
    if gold.text || !is_slice || !is_text(&found.text) {
        return found;
    }
    let (start, end) = extract::narrow_prose(pred, found.start, found.end);
    let text = pred[start..end].trim();
    let reads_as_math = parsed(text).is_ok_and(|e| !matches!(e, Expr::Text(_)));
    if (start, end) == (found.start, found.end) || !reads_as_math {
        return found;
    }
    let lead = pred[start..end].len() - pred[start..end].trim_start().len();
    AnswerSpan {
        text: text.to_string(),
        start: start + lead,
        end: start + lead + text.len(),
        method: found.method,
    }
}

/// The statement of the last line, when it reads as math.
fn last_line_answer(pred: &str, gold: GoldKind, deadline: &Deadline) -> Option<AnswerSpan> {
    let found = extract::last_line(pred)?;
    let parsed = parse::parse_with(&normalize(&found.text).text, deadline).ok()?;
    (!matches!(parsed, Expr::Text(_)) || gold.text).then_some(found)
}

/// The last math span of a completion without an answer marker, when it
/// reads as math rather than prose. Single-dollar spans double as currency
/// signs in word problems (`$5 and $7`), so against a plain-number gold they
/// count only when they hold LaTeX commands; the last-number guess covers
/// the rest.
fn last_math_span(pred: &str, gold: GoldKind, deadline: &Deadline) -> Option<AnswerSpan> {
    let spans: Vec<(usize, usize, bool)> = extract::math_spans(pred)
        .into_iter()
        .filter(|&(s, e, _)| !pred[s..e].trim().is_empty())
        .collect();
    let &(mut start, end, single) = spans.last()?;
    // `$x = 2$ and $x = 3$`: spans joined by "and", "or" or commas are one answer.
    for &(s, e, _) in spans.iter().rev().skip(1) {
        if e > start || !extract::joinable_gap(&pred[e..start]) {
            break;
        }
        start = s;
    }
    let inner = &pred[start..end];
    if single && gold.number && !inner.contains('\\') {
        return None;
    }
    let parsed = parse::parse_with(&normalize(inner).text, deadline).ok()?;
    if matches!(parsed, Expr::Text(_)) && !gold.text {
        return None;
    }
    let lead = inner.len() - inner.trim_start().len();
    let text = inner.trim();
    Some(AnswerSpan {
        text: text.to_string(),
        start: start + lead,
        end: start + lead + text.len(),
        method: ExtractMethod::MathSpan,
    })
}

/// The whole prediction, when it is one short line that parses as math
/// (or as text, when the gold is text too) rather than prose, or that is
/// wholly one math span (`$…$`).
fn bare_answer(pred: &str, gold_is_text: bool, deadline: &Deadline) -> Option<AnswerSpan> {
    let trimmed = pred.trim();
    if trimmed.is_empty() || trimmed.contains('\n') || trimmed.len() > 200 {
        return None;
    }
    let whole_span = extract::math_spans(trimmed)
        .first()
        .is_some_and(|&(s, e, _)| {
            trimmed[..s]
                .trim_start_matches(['$', '\\', '(', '['])
                .is_empty()
                && trimmed[e..]
                    .trim_end_matches(['$', '\\', ')', ']', '.'])
                    .is_empty()
        });
    if !whole_span {
        let parsed = parse::parse_with(&normalize(trimmed).text, deadline).ok()?;
        if matches!(parsed, Expr::Text(_)) && !gold_is_text {
            return None;
        }
    }
    let start = pred.len() - pred.trim_start().len();
    Some(AnswerSpan {
        text: trimmed.to_string(),
        start,
        end: start + trimmed.len(),
        method: ExtractMethod::Whole,
    })
}

/// A gold is treated as a solution when it carries an answer marker or reads
/// like prose rather than a formula.
fn looks_like_solution(gold: &str) -> bool {
    gold.contains("\\boxed")
        || gold.contains("\\fbox")
        || gold.contains("####")
        || gold.contains('\n')
        || gold.len() > 80
}

/// Compares two normalised answers, parsing them as needed.
fn decide(
    gold: &Normalized,
    gold_expr: Result<Expr, ParseError>,
    pred: &Normalized,
    deadline: &Deadline,
    opts: &MathOptions,
) -> (Verdict, Rule) {
    let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    if !gold.text.is_empty() && squash(&gold.text) == squash(&pred.text) {
        return (Verdict::Correct, Rule::StringEqual);
    }
    let gold_expr = match gold_expr {
        Ok(expr) => expr,
        Err(ParseError::TimedOut) => return (Verdict::Timeout, Rule::Deadline),
        Err(_) => return (Verdict::UnparseableGold, Rule::ParseFailure),
    };
    let pred_text = decimal_comma_for(&gold_expr, &pred.text);
    let pred_expr = match parse::parse_with(&pred_text, deadline) {
        Ok(expr) => expr,
        Err(ParseError::TimedOut) => return (Verdict::Timeout, Rule::Deadline),
        Err(_) => return (Verdict::UnparseablePred, Rule::ParseFailure),
    };
    let cx = compare::Ctx::new(deadline, opts);
    match compare::with_percent(&gold_expr, gold.percent, &pred_expr, pred.percent, &cx) {
        Ok((true, rule)) => (Verdict::Correct, rule),
        Ok((false, rule)) => (Verdict::Incorrect, rule),
        Err(TimedOut) => (Verdict::Timeout, Rule::Deadline),
    }
}

/// Against a gold written with a decimal point (`2.5`), a prediction `2,5`
/// is the same number with a decimal comma rather than a list of two.
fn decimal_comma_for(gold: &Expr, pred: &str) -> String {
    let decimal_gold = match gold {
        Expr::Num { places, .. } => *places > 0,
        Expr::Neg(inner) => matches!(**inner, Expr::Num { places, .. } if places > 0),
        _ => false,
    };
    let t = pred.trim();
    let digits = t.strip_prefix('-').unwrap_or(t);
    let comma_number = digits.split_once(',').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    });
    if decimal_gold && comma_number {
        t.replacen(',', ".", 1)
    } else {
        pred.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(gold: &str, pred: &str) -> Verdict {
        check(gold, pred, &MathOptions::default()).verdict
    }

    #[test]
    fn gold_solution_is_extracted() {
        let gold = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7";
        assert_eq!(verdict(gold, "The answer is 7."), Verdict::Correct);
        assert_eq!(
            verdict("So $x = \\boxed{\\frac{1}{2}}$.", "0.5"),
            Verdict::Correct
        );
    }

    #[test]
    fn empty_inputs_are_unparseable() {
        assert_eq!(verdict("", "5"), Verdict::UnparseableGold);
        assert_eq!(verdict("5", ""), Verdict::UnparseablePred);
        assert_eq!(
            check("5", "no digits here", &MathOptions::default()).rule,
            Rule::NoAnswer
        );
    }

    #[test]
    fn fallback_policy_is_respected() {
        let never = MathOptions {
            fallback: LastNumberFallback::Never,
            ..MathOptions::default()
        };
        let pred = "So she has 12 apples left";
        assert_eq!(check("12", pred, &never).verdict, Verdict::UnparseablePred);
        assert_eq!(verdict("12", pred), Verdict::Correct);
        assert_eq!(verdict("x^2", "so we get x^2"), Verdict::UnparseablePred);
    }

    #[test]
    fn expired_deadline_times_out() {
        let past = Instant::now();
        let out = check_until("1", "1", &MathOptions::default(), past);
        assert_eq!(out.verdict, Verdict::Timeout);
        assert_eq!(out.rule, Rule::Deadline);
    }

    #[test]
    fn evidence_is_recorded() {
        let pred = "We add them.\nThe answer is $\\frac{1}{2}$.";
        let out = check("0.5", pred, &MathOptions::default());
        assert_eq!(out.verdict, Verdict::Correct);
        assert_eq!(out.rule, Rule::RationalEqual);
        let span = out
            .pred_span
            .as_ref()
            .map(|s| (s.text.as_str(), s.start, s.end));
        let start = pred.find("\\frac").unwrap_or(0);
        assert_eq!(span, Some(("\\frac{1}{2}", start, start + 11)));
        assert_eq!(out.gold_normal.as_deref(), Some("0.5"));
        assert_eq!(out.pred_normal.as_deref(), Some("\\frac{1}{2}"));
    }

    #[test]
    fn verdict_serializes_snake_case() {
        let json = serde_json::to_string(&Verdict::UnparseablePred).unwrap_or_default();
        assert_eq!(json, "\"unparseable_pred\"");
        let json = serde_json::to_string(&Rule::RationalEqual).unwrap_or_default();
        assert_eq!(json, "\"rational_equal\"");
    }
}
