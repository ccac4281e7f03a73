//! Final-answer extraction from free-form completions.
//!
//! Markers are tried from most to least explicit; within one kind of marker
//! the last occurrence wins, because models often restate or correct an
//! answer before finishing.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Which marker located an answer; recorded as evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtractMethod {
    /// The last `\boxed{…}` or `\fbox{…}`, or several boxes written as one
    /// answer (`\boxed{1}, \boxed{2}`), whose contents are joined by `, `.
    Boxed,
    /// A GSM8K-style `#### N` line.
    Hashes,
    /// "The answer is …", "Final Answer: …", "Answer: …".
    AnswerPhrase,
    /// A bold `**…**` span near the end of the text.
    Bold,
    /// A line starting with `A:`.
    AnswerLine,
    /// The last number in the text (fallback).
    LastNumber,
    /// The last math span (`$…$`, `\(…\)`, `\[…\]`) that reads as math.
    MathSpan,
    /// The statement of the last line ("The solution is −2 ≤ x ≤ 7.").
    LastLine,
    /// The whole input (used for bare gold answers).
    Whole,
}

/// An extracted answer with its byte range in the source text, so reviewers
/// can see exactly what was graded. For several boxes read as one answer the
/// range covers them all and the text joins their contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerSpan {
    /// The extracted text: `&source[start..end]`, or the joined contents of
    /// several boxes.
    pub text: String,
    /// Byte offset of the first byte of the answer.
    pub start: usize,
    /// Byte offset one past the last byte of the answer.
    pub end: usize,
    /// The marker that found it.
    pub method: ExtractMethod,
}

/// Extracts the final answer from `text`, trying in order: last
/// `\boxed{}`/`\fbox{}`, last `####` line, answer phrases, bold spans near the
/// end, `A:` lines and, when `fallback_last_number` is set, the last number.
pub fn extract_answer(text: &str, fallback_last_number: bool) -> Option<AnswerSpan> {
    boxed_or_later_phrase(text)
        .or_else(|| last_hashes(text))
        .or_else(|| last_phrase(text))
        .or_else(|| last_bold(text))
        .or_else(|| last_answer_line(text))
        .or_else(|| fallback_last_number.then(|| last_number(text)).flatten())
}

/// Boxes read from the end of a text when looking for its answer.
const MAX_BOXES: usize = 64;

static HASHES: LazyLock<Regex> = LazyLock::new(|| regex_or_never(r"####[ \t]*([^\n]*)"));
static PHRASE: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"(?i)\banswer\**[ \t]*(?:is\b\**[ \t]*:?|[:：])"));
static BOLD: LazyLock<Regex> = LazyLock::new(|| regex_or_never(r"\*\*([^*\n]{1,80})\*\*"));
static ANSWER_LINE: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"(?m)^[ \t]*A[ \t]*:[ \t]*([^\n]+)"));
static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    regex_or_never(
        r"-?(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?:[ \u{a0}\u{2009}\u{202f}]\d{3})+\b|\d+,\d{2}\b|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+",
    )
});
static LINKING: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"(?i)\s(?:is|are|was|equals|be|of)\s|=|\\approx"));
static PROSE_WORD: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"(?:^|[^\\A-Za-z])[A-Za-z]{2,}"));
static CALCULATOR: LazyLock<Regex> = LazyLock::new(|| regex_or_never(r"<<[^<>\n]*>>"));

/// Compiles a pattern known at build time; an invalid pattern (a programming
/// error caught by the unit tests) degrades to one that never matches.
pub(crate) fn regex_or_never(pattern: &str) -> Regex {
    Regex::new(pattern)
        .or_else(|_| Regex::new(r"[^\s\S]"))
        .unwrap_or_else(|_| unreachable!("the never-matching pattern is valid"))
}

/// Builds a span for `text[start..end]` after trimming whitespace, or `None`
/// when nothing is left.
fn span(text: &str, start: usize, end: usize, method: ExtractMethod) -> Option<AnswerSpan> {
    let slice = text.get(start..end)?;
    let lead = slice.len() - slice.trim_start().len();
    let trimmed = slice.trim();
    if trimmed.is_empty() {
        return None;
    }
    Some(AnswerSpan {
        text: trimmed.to_string(),
        start: start + lead,
        end: start + lead + trimmed.len(),
        method,
    })
}

/// Index of the brace closing the one at `open`, skipping escaped braces.
/// Works on bytes: `{`, `}` and `\` never occur inside multi-byte UTF-8.
pub(crate) fn matching_brace(text: &str, open: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The last box, unless an answer phrase ("The final answer is …") follows
/// it: a model that boxes an intermediate result and then states its answer
/// means the statement.
fn boxed_or_later_phrase(text: &str) -> Option<AnswerSpan> {
    let (boxed, box_end) = last_boxed(text)?;
    let later = PHRASE
        .find_iter(text)
        .last()
        .filter(|m| m.start() >= box_end);
    if let Some(m) = later {
        if let Some((start, end)) = phrase_answer(text, m.end()) {
            if let Some(found) = span(text, start, end, ExtractMethod::AnswerPhrase) {
                return Some(found);
            }
        }
    }
    Some(boxed)
}

/// The last box with the boxes written together with it as one answer
/// (`\boxed{1}, \boxed{2}`, `\boxed{k = 45} \quad \text{and} \quad
/// \boxed{n = 2}`), and the end of the last box.
fn last_boxed(text: &str) -> Option<(AnswerSpan, usize)> {
    let mut starts: Vec<(usize, usize)> = ["\\boxed", "\\fbox"]
        .iter()
        .flat_map(|cmd| text.match_indices(cmd).map(|(i, m)| (i, i + m.len())))
        .collect();
    starts.sort_unstable();
    // From the last box backwards, lazily: each box costs a scan for its closing brace, so
    // only the boxes that can belong to the answer are read (at most a bounded number).
    let mut boxes = starts
        .iter()
        .rev()
        .take(MAX_BOXES)
        .filter_map(|&(at, after)| boxed_content(text, after).map(|(s, end)| (at, s, end)));
    let (last_at, last, last_end) = boxes.next()?;
    let mut group = vec![last];
    let mut first_at = last_at;
    for (at, content, end) in boxes {
        if end > first_at || !joinable_gap(&text[end..first_at]) {
            break;
        }
        group.push(content);
        first_at = at;
    }
    // The same answer boxed twice is one answer.
    let mut seen = Vec::new();
    group.retain(|s| {
        let new = !seen.contains(&s.text);
        seen.push(s.text.clone());
        new
    });
    if group.len() == 1 {
        return group.pop().map(|s| (s, last_end));
    }
    group.reverse();
    let texts: Vec<&str> = group.iter().map(|s| s.text.as_str()).collect();
    let joined = AnswerSpan {
        text: texts.join(", "),
        start: group[0].start,
        end: group[group.len() - 1].end,
        method: ExtractMethod::Boxed,
    };
    Some((joined, last_end))
}

/// Whether the text between two boxes joins them into one answer: only
/// separators (commas, `\quad`, math delimiters), a short phrase with "and" or
/// "or" (`\text{ and }`, "for part (a) and"), or symbols without words.
pub(crate) fn joinable_gap(gap: &str) -> bool {
    if gap.len() > 80 {
        return false;
    }
    let mut rest = gap.to_string();
    for sep in [
        "\\text", "\\mathrm", "\\qquad", "\\quad", "\\(", "\\)", "\\[", "\\]", "\\,", "\\;", "\\ ",
        "\\\\", "$", "{", "}", ",", ";", "&",
    ] {
        rest = rest.replace(sep, " ");
    }
    let words: Vec<&str> = rest.split_whitespace().collect();
    if words.is_empty() {
        return true;
    }
    let conjunction = words.iter().any(|w| {
        let w = w.trim_matches(|c: char| !c.is_ascii_alphabetic());
        w.eq_ignore_ascii_case("and") || w.eq_ignore_ascii_case("or")
    });
    if conjunction {
        return words.len() <= 5;
    }
    !gap.contains('\n') && !rest.chars().any(|c| c.is_ascii_alphanumeric()) && rest.len() <= 20
}

/// The argument of a `\boxed` whose name ends at `after` (a braced group, or
/// a space-separated token as in `\boxed 5`) and the end of the box.
fn boxed_content(text: &str, after: usize) -> Option<(AnswerSpan, usize)> {
    let rest = text.get(after..)?;
    let gap = rest.len() - rest.trim_start().len();
    let at = after + gap;
    if rest[gap..].starts_with('{') {
        let Some(close) = matching_brace(text, at) else {
            // A box left open at the end of a truncated text holds the rest of it.
            let tail = text[at + 1..].trim_end().trim_end_matches(['$', '.']);
            let end = at + 1 + tail.len();
            return span(text, at + 1, end, ExtractMethod::Boxed).map(|s| (s, text.len()));
        };
        return span(text, at + 1, close, ExtractMethod::Boxed).map(|s| (s, close + 1));
    }
    if gap == 0 {
        return None;
    }
    let token = &text[at..];
    let len = token
        .find(|c: char| c.is_whitespace() || c == '$')
        .unwrap_or(token.len());
    span(text, at, at + len, ExtractMethod::Boxed).map(|s| (s, at + len))
}

/// Math spans of `text` (`$$…$$`, `\[…\]`, `\(…\)`, `$…$` within one line),
/// as inner byte ranges in order, with whether the span used single dollars
/// (which may also be currency signs).
pub(crate) fn math_spans(text: &str) -> Vec<(usize, usize, bool)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        let (open, close, single) = if rest.starts_with(b"$$") {
            ("$$", "$$", false)
        } else if rest.starts_with(b"\\[") {
            ("\\[", "\\]", false)
        } else if rest.starts_with(b"\\(") {
            ("\\(", "\\)", false)
        } else if rest.starts_with(b"$") {
            ("$", "$", true)
        } else if rest.starts_with(b"\\") {
            i += 2;
            continue;
        } else {
            i += 1;
            continue;
        };
        let inner = i + open.len();
        let found = find_close(text, inner, close, single);
        match found {
            Some(end) => {
                out.push((inner, end, single));
                i = end + close.len();
            }
            None => i = inner,
        }
    }
    out
}

/// The position of `close` after `from`, skipping escaped `\$`; single
/// dollars do not span lines.
fn find_close(text: &str, from: usize, close: &str, single: bool) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut j = from;
    while j < bytes.len() {
        if single && bytes[j] == b'\n' {
            return None;
        }
        if bytes[j] == b'\\' && close.starts_with('$') {
            j += 2;
            continue;
        }
        if bytes[j..].starts_with(close.as_bytes()) {
            return Some(j);
        }
        j += 1;
    }
    None
}

fn last_hashes(text: &str) -> Option<AnswerSpan> {
    let caps = HASHES.captures_iter(text).last()?;
    let m = caps.get(1)?;
    let (start, end) = trim_sentence(text, m.start(), m.end());
    span(text, start, end, ExtractMethod::Hashes)
}

fn last_phrase(text: &str) -> Option<AnswerSpan> {
    let m = PHRASE.find_iter(text).last()?;
    let (start, end) = phrase_answer(text, m.end())?;
    span(text, start, end, ExtractMethod::AnswerPhrase)
}

/// The answer following a phrase that ends at `from`: the rest of the line
/// (or the next non-empty line), narrowed to a math span or a sentence.
fn phrase_answer(text: &str, from: usize) -> Option<(usize, usize)> {
    let mut start = from;
    let line_end = |s: usize| text[s..].find('\n').map_or(text.len(), |i| s + i);
    let mut end = line_end(start);
    while text[start..end]
        .trim_matches(|c: char| c.is_whitespace() || c == '*')
        .is_empty()
    {
        if end >= text.len() {
            return None;
        }
        start = end + 1;
        end = line_end(start);
    }
    let (start, end) = skip_markup(text, start, end);
    if let Some((s, e)) = math_delimited(text, start, end) {
        // `$2$ and $3$`: math spans joined by "and", "or" or commas are one answer.
        let mut last = e;
        for (ss, ee, _) in math_spans(&text[start..end]) {
            let (ss, ee) = (start + ss, start + ee);
            if ss <= last {
                continue;
            }
            if !joinable_gap(&text[last..ss]) {
                break;
            }
            last = ee;
        }
        return Some((s, last));
    }
    let (start, end) = trim_sentence(text, start, end);
    Some(narrow_prose(text, start, end))
}

/// An answer phrase followed by a sentence ("The largest $n$ is 34") states
/// its answer after the last linking word (`is`, `=`, …); without one, the
/// last number in the sentence is the answer ("Sphere 3 hours ago").
pub(crate) fn narrow_prose(text: &str, start: usize, end: usize) -> (usize, usize) {
    let slice = &text[start..end];
    let outside_math: String = {
        let mut kept = slice.to_string();
        for (s, e, _) in math_spans(slice).into_iter().rev() {
            kept.replace_range(s..e, &" ".repeat(e - s));
        }
        kept
    };
    let spans = math_spans(slice);
    let words = PROSE_WORD.find_iter(&outside_math).count();
    if words < 2 {
        // A filler word around one math span: "indeed $\frac{1}{2}$".
        return match spans.as_slice() {
            [(s, e, _)] if words == 1 => (start + s, start + e),
            _ => (start, end),
        };
    }
    let link = LINKING.find_iter(&outside_math).last().map(|m| m.end());
    if let Some(after) = link {
        let (inner_start, _) = skip_markup(text, start + after, end);
        if inner_start < end {
            let (s, e) = math_delimited(text, inner_start, end).unwrap_or((inner_start, end));
            let tail = &outside_math[after..];
            if PROSE_WORD.find_iter(tail).count() < 2 {
                return (s, e);
            }
        }
    }
    if let Some(&(s, e, _)) = spans.last() {
        return (start + s, start + e);
    }
    match last_number(slice) {
        Some(n) => (start + n.start, start + n.end),
        None => (start, end),
    }
}

/// The answer stated by the last line of a completion that has no answer
/// marker, math span or number to go by ("The solution is −2 ≤ x ≤ 7."),
/// when the line states it with a linking word (`is`, `=`, …).
pub(crate) fn last_line(text: &str) -> Option<AnswerSpan> {
    let trimmed = text.trim_end();
    let start = trimmed.rfind('\n').map_or(0, |i| i + 1);
    let (start, end) = skip_markup(text, start, trimmed.len());
    // The last sentence of the line.
    let line = &text[start..end];
    let body = line.trim_end_matches(['.', '!', ' ']);
    let sentence_start = body.rfind(". ").map_or(start, |i| start + i + 2);
    let (s, e) = trim_sentence(text, sentence_start, end);
    // Only a sentence that states something ("… is …", "… = …") is read.
    if !LINKING.is_match(&text[s..e]) {
        return None;
    }
    let (s, e) = narrow_prose(text, s, e);
    span(text, s, e, ExtractMethod::LastLine)
}

/// Skips leading whitespace, `*` and `:` left over from markdown.
fn skip_markup(text: &str, start: usize, end: usize) -> (usize, usize) {
    let slice = &text[start..end];
    let rest =
        slice.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '*' | ':' | '}'));
    (start + slice.len() - rest.len(), end)
}

/// When the text at `start` opens `$…$`, `$$…$$`, `\(…\)` or `\[…\]` that
/// closes before `end`, the inside of that math span.
fn math_delimited(text: &str, start: usize, end: usize) -> Option<(usize, usize)> {
    let slice = &text[start..end];
    for (open, close) in [("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]"), ("$", "$")] {
        if let Some(body) = slice.strip_prefix(open) {
            let close_at = body.find(close)?;
            let inner_start = start + open.len();
            return Some((inner_start, inner_start + close_at));
        }
    }
    None
}

/// Cuts an answer at the end of its sentence: a period followed by space or
/// the end (not a decimal point), a ", " before words, or "I hope". Trailing
/// markdown and punctuation are dropped.
fn trim_sentence(text: &str, start: usize, end: usize) -> (usize, usize) {
    let slice = &text[start..end];
    let bytes = slice.as_bytes();
    let mut cut = slice.len();
    let mut depth = 0i32;
    for (i, &b) in bytes.iter().enumerate() {
        let next = bytes.get(i + 1).copied();
        match b {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b'.' if next.is_none_or(|n| n.is_ascii_whitespace()) => {
                cut = i;
                break;
            }
            b',' if depth == 0 && next == Some(b' ') && starts_word(&slice[i + 1..]) => {
                cut = i;
                break;
            }
            _ => {}
        }
    }
    if let Some(hope) = slice[..cut].find("I hope") {
        cut = hope;
    }
    let kept = slice[..cut].trim_end_matches(|c: char| {
        c.is_whitespace() || matches!(c, '*' | '.' | ',' | ';' | ':' | '!' | '?')
    });
    let kept = restore_factorial(slice, kept);
    (start, start + kept.len())
}

/// Trailing `!` is punctuation unless it follows a digit or closing bracket
/// directly, where it is a factorial (`5!`).
fn restore_factorial<'a>(slice: &'a str, kept: &'a str) -> &'a str {
    let rest = &slice[kept.len()..];
    let prev_is_operand = kept
        .chars()
        .last()
        .is_some_and(|c| c.is_ascii_digit() || matches!(c, ')' | '}'));
    if prev_is_operand && rest.starts_with('!') && !rest.starts_with("!!") {
        &slice[..kept.len() + 1]
    } else {
        kept
    }
}

/// True when `s` (after leading spaces) starts with a word of two or more
/// letters, i.e. prose rather than another list element.
fn starts_word(s: &str) -> bool {
    let letters = s
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .count();
    letters >= 2
}

fn last_bold(text: &str) -> Option<AnswerSpan> {
    let tail_start = text.trim_end().len().saturating_sub(300);
    let caps = BOLD.captures_iter(text).last()?;
    let m = caps.get(1)?;
    if m.start() < tail_start {
        return None;
    }
    let content = m.as_str();
    let looks_like_answer = content.chars().any(|c| c.is_ascii_digit())
        || content.trim().trim_matches(['(', ')']).len() == 1;
    if !looks_like_answer {
        return None;
    }
    let (start, end) = skip_markup(text, m.start(), m.end());
    let (start, end) = trim_sentence(text, start, end);
    span(text, start, end, ExtractMethod::Bold)
}

fn last_answer_line(text: &str) -> Option<AnswerSpan> {
    let caps = ANSWER_LINE.captures_iter(text).last()?;
    let m = caps.get(1)?;
    let (start, end) = match math_delimited(text, m.start(), m.end()) {
        Some(inner) => inner,
        None => trim_sentence(text, m.start(), m.end()),
    };
    span(text, start, end, ExtractMethod::AnswerLine)
}

/// The last number outside GSM8K calculator annotations (`<<4*2=8>>`). A
/// leading `-` counts as a sign only when it does not follow an operand
/// (`30-7.5` ends in `7.5`, `= -22` ends in `-22`).
fn last_number(text: &str) -> Option<AnswerSpan> {
    let hidden: Vec<(usize, usize)> = CALCULATOR
        .find_iter(text)
        .map(|m| (m.start(), m.end()))
        .collect();
    let in_word = |m: &regex::Match| {
        let before = text[..m.start()].chars().last();
        let after = text[m.end()..].chars().next();
        before.is_some_and(char::is_alphabetic)
            || (m.as_str().contains(',') && after.is_some_and(|c| c == ',' || c.is_ascii_digit()))
    };
    let m = NUMBER
        .find_iter(text)
        .filter(|m| !hidden.iter().any(|&(s, e)| m.start() >= s && m.end() <= e))
        .filter(|m| !in_word(m))
        .last()?;
    let mut start = m.start();
    if text[start..].starts_with('-') {
        let prev = text[..start].chars().last();
        if prev.is_some_and(|c| c.is_alphanumeric() || matches!(c, ')' | ']' | '}')) {
            start += 1;
        }
    }
    span(text, start, m.end(), ExtractMethod::LastNumber)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(s: &str, fallback: bool) -> Option<(String, ExtractMethod)> {
        extract_answer(s, fallback).map(|a| (a.text, a.method))
    }

    fn ans(s: &str) -> String {
        extract_answer(s, true).map(|a| a.text).unwrap_or_default()
    }

    #[test]
    fn boxed_is_balanced_and_last() {
        assert_eq!(
            ans("first \\boxed{1} then \\boxed{\\frac{1}{2}}."),
            "\\frac{1}{2}"
        );
        assert_eq!(ans("\\boxed{\\{1, 2\\}}"), "\\{1, 2\\}");
        assert_eq!(ans("so \\fbox{7} done"), "7");
        assert_eq!(ans("so $\\boxed 42$"), "42");
        assert_eq!(ans("\\boxed{a{b}c}"), "a{b}c");
        let got = text_of("$\\boxed{3}$ and \\boxed{", false);
        assert_eq!(got, Some(("3".into(), ExtractMethod::Boxed)));
    }

    #[test]
    fn span_offsets_point_into_source() {
        let s = "Thus the answer is \\boxed{ 12 }.";
        let a = extract_answer(s, false);
        let Some(a) = a else {
            panic!("no answer");
        };
        assert_eq!(&s[a.start..a.end], "12");
    }

    #[test]
    fn hashes_and_phrases() {
        assert_eq!(ans("blah\n#### 1,260"), "1,260");
        assert_eq!(ans("blah\n#### 58 dollars"), "58 dollars");
        assert_eq!(ans("The answer is $48."), "$48");
        assert_eq!(ans("The answer is -48."), "-48");
        assert_eq!(ans("The answer is $\\frac{1}{2}$. Done"), "\\frac{1}{2}");
        assert_eq!(
            ans("Final Answer: The final answer is 700. I hope it is correct."),
            "700"
        );
        assert_eq!(ans("**Answer:** 30"), "30");
        assert_eq!(ans("text\n\n**Final answer: 27**"), "27");
        assert_eq!(ans("The answer is:\n\n42\n"), "42");
        assert_eq!(ans("The answer is 3.5, since it works"), "3.5");
        assert_eq!(ans("The answer is (1, 2)."), "(1, 2)");
        assert_eq!(ans("The answer is 5!."), "5!");
    }

    #[test]
    fn bold_and_answer_lines() {
        assert_eq!(ans("so in total we get **42** apples"), "42");
        assert_eq!(ans("Q: foo\nA: 60"), "60");
    }

    #[test]
    fn last_number_fallback() {
        assert_eq!(ans("so 30-7.5 = 22.5 pounds"), "22.5");
        assert_eq!(ans("so <<2*3=6>>6 and then 12 <<1+1=2>>"), "12");
        assert_eq!(ans("total = -22 pizzas"), "-22");
        assert_eq!(ans("costs 1,000,000 dollars"), "1,000,000");
        assert_eq!(ans("it is 2/3 of it"), "2/3");
        assert_eq!(text_of("it is 12 apples", false), None);
    }

    #[test]
    fn matching_brace_handles_escapes() {
        assert_eq!(matching_brace("{a\\}b}", 0), Some(5));
        assert_eq!(matching_brace("{a", 0), None);
    }
}
