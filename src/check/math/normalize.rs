//! Text-level normalisation of an extracted answer: removes presentation that
//! does not change the value (math delimiters, `\left`/`\right`, `\text{}`
//! wrappers, units, `%`, degrees, thousands separators) and rewrites
//! notational variants (`\dfrac`, unicode operators, mixed numbers) into one
//! spelling the parser understands.

use std::sync::LazyLock;

use regex::{Captures, Regex};
use serde::{Deserialize, Serialize};

use super::extract::{matching_brace, regex_or_never};

/// A normalised answer. The percent flag is kept because `10\%` may be meant
/// as `10` or as `0.1`, and only the comparison can tell which fits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Normalized {
    /// The normal form, ready for [`super::parse`].
    pub text: String,
    /// Whether a percent sign was removed.
    pub percent: bool,
}

/// Normalises one extracted answer (not a whole completion).
pub fn normalize(raw: &str) -> Normalized {
    let mut s = raw.trim().to_string();
    s = undouble_backslashes(&s);
    s = replace_symbols(&s);
    s = repeating_decimals(&s);
    s = unwrap_commands(&s);
    s = matrices(&s);
    s = strip_delimiters(&s);
    s = SIZING.replace_all(&s, "").into_owned();
    s = join_thin_thousands(&s);
    s = SPACING.replace_all(&s, " ").into_owned();
    s = SINGLE_BRACE.replace_all(&s, "$1$2").into_owned();
    s = FRAC_VARIANT.replace_all(&s, "\\frac$1").into_owned();
    s = BINOM_VARIANT.replace_all(&s, "\\binom$1").into_owned();
    s = DEGREES.replace_all(&s, "").into_owned();
    let percent = s.contains('%') || PERCENT_WORD.is_match(&s);
    s = s.replace("\\%", "").replace('%', "");
    s = PERCENT_WORD.replace_all(&s, "").into_owned();
    s = MEMBERSHIP.replace(&s, "").into_owned();
    s = list_conjunctions(&s);
    s = expand_plus_minus(&s);
    s = strip_units(&s);
    s = decimal_comma(&s);
    s = join_thousands(&s);
    s = mixed_numbers(&s);
    s = trim_punctuation(&s);
    s = WHITESPACE.replace_all(&s, " ").trim().to_string();
    Normalized { text: s, percent }
}

static SIZING: LazyLock<Regex> = LazyLock::new(|| {
    regex_or_never(r"\\(?:left|right|[bB]igg?[lr]?|displaystyle|textstyle)(?:\.|\b)")
});
static SPACING: LazyLock<Regex> = LazyLock::new(|| regex_or_never(r"\\[,;:! ]|\\q?quad|~|\\\\"));
static SINGLE_BRACE: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"([_^])\{\s*([A-Za-z0-9])\s*\}"));
static FRAC_VARIANT: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"\\[dtc]frac([^A-Za-z]|$)"));
static BINOM_VARIANT: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"\\[dt]binom([^A-Za-z]|$)"));
static DEGREES: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"\^\s*\{?\s*\\circ\s*\}?|\\circ\b|\\degree\b|°|\bdegrees?\b"));
static PERCENT_WORD: LazyLock<Regex> = LazyLock::new(|| regex_or_never(r"(?i)\s*\bpercent\b"));
static MEMBERSHIP: LazyLock<Regex> = LazyLock::new(|| regex_or_never(r"^\s*[A-Za-z]\s*\\in\b\s*"));
static CONJUNCTION: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"\s*,?\s+(?:or|and)\s+|([)\]\d])\s*(?:or|and)\s*([(\[A-Z])"));
static WHITESPACE: LazyLock<Regex> = LazyLock::new(|| regex_or_never(r"\s+"));
static UNIT: LazyLock<Regex> = LazyLock::new(|| {
    regex_or_never(concat!(
        r"(?i)([\d}).]|\\pi)\s*(?:square\s+|sq\.?\s+|cubic\s+)?",
        r"(?:dollars?|cents?|usd|euros?|pounds?|lbs?|ounces?|oz|grams?|kg|kilograms?|mg|tons?|",
        r"meters?|metres?|cm|mm|km|kilometers?|centimeters?|millimeters?|inch(?:es)?|feet|foot|ft|",
        r"yards?|yd|miles?|mph|seconds?|secs?|minutes?|mins?|hours?|hrs?|days?|weeks?|months?|",
        r"years?|yrs?|liters?|litres?|ml|gallons?|gal|quarts?|cups?|units?)",
        r"(?:\s*\^\s*\{?\d\}?)?\.?\s*$"
    ))
});
static RATE_UNIT: LazyLock<Regex> = LazyLock::new(|| {
    regex_or_never(concat!(
        r"(?i)([\d}])\s*(?:k?m|cm|mi|ft|miles?|meters?|kilometers?|km)\s*/\s*",
        r"(?:h|hr|hours?|s|sec|seconds?|min|minutes?)\.?\s*$"
    ))
});
static CURRENCY_CODE: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"^(?:USD|EUR|GBP|INR|Rs\.?)\s*(-?[\d.])"));
static SHORT_UNIT: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"(\d)\s+(?:m|g|s|h|l|L)(?:\s*\^\s*\{?\d\}?)?\s*$"));
static TRAILING_WORDS: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"([\d})\]]|\\pi)((?:\s+[A-Za-z][A-Za-z'’\-]+\.?)+)\s*$"));
static THIN_THOUSANDS: LazyLock<Regex> = LazyLock::new(|| {
    regex_or_never(r"(\d)(?:\\,|\s*\{\s*,\s*\}\s*|\\ |\\;|,?\\!\s*|,\\,\s*)(\d{3})\b")
});
static SPACE_THOUSANDS: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"^-?[1-9]\d{0,2}(?: \d{3})+(?:\.\d+)?$"));
static DECIMAL_COMMA: LazyLock<Regex> = LazyLock::new(|| regex_or_never(r"^(-?)(\d+),(\d+)$"));
static ROW_SKIP: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"^\[\s*-?[\d.]+\s*(?:pt|em|ex|mm|cm|in)\s*\]"));
static DOUBLED: LazyLock<Regex> = LazyLock::new(|| {
    regex_or_never(concat!(
        r"(^|[^\\])\\\\(frac|dfrac|tfrac|left|right|sqrt|boxed|text|textbf|mathrm|mathbf|",
        r"pi|le|leq|ge|geq|lt|gt|ne|neq|cdot|times|infty|begin|end|quad|qquad|in|cup|cap|pm|",
        r"circ|sin|cos|tan|log|ln|binom|approx|emptyset|varnothing|dots|ldots|cdots|theta|alpha|",
        r"beta|sqrt|overline|mid|infty)\b"
    ))
});
static THOUSANDS: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?"));
static MIXED_SLASH: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"(^|[^\d.^_])(\d+)\s+(\d+)\s*/\s*(\d+)"));
static MIXED_FRAC: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"(^|[^\d.}^_])(\d+)\s*\\frac(?:\{(\d+)\}\{(\d+)\}|(\d)(\d))"));

/// Unicode operators and look-alikes to their LaTeX spelling.
fn replace_symbols(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '−' | '–' | '‐' | '‑' => out.push('-'),
            '×' | '∙' => out.push_str("\\times "),
            '·' | '⋅' => out.push_str("\\cdot "),
            '÷' => out.push_str("\\div "),
            'π' => out.push_str("\\pi "),
            '∞' => out.push_str("\\infty "),
            '√' => out.push_str("\\sqrt "),
            '≤' => out.push_str("\\le "),
            '≥' => out.push_str("\\ge "),
            '≠' => out.push_str("\\ne "),
            '∪' => out.push_str("\\cup "),
            '∅' => out.push_str("\\emptyset "),
            '\u{00a0}' | '\u{2009}' | '\u{202f}' | '"' | '“' | '”' => out.push(' '),
            '≈' => out.push_str("\\approx "),
            '€' | '£' | '¥' | '₹' | '₽' | '₩' => out.push(' '),
            _ => out.push(c),
        }
    }
    out
}

/// Text-style wrappers whose argument is kept verbatim.
const WRAPPERS: [&str; 14] = [
    "\\text",
    "\\textbf",
    "\\textit",
    "\\textrm",
    "\\textnormal",
    "\\mathrm",
    "\\mathbf",
    "\\mathit",
    "\\mathsf",
    "\\mbox",
    "\\boxed",
    "\\fbox",
    "\\operatorname",
    "\\hbox",
];

/// Replaces every `\text{…}`-style wrapper by its (space-padded) argument.
fn unwrap_commands(s: &str) -> String {
    let mut s = s.to_string();
    // Each pass removes one wrapper, so the loop is bounded by the input size.
    while let Some((start, open)) = find_wrapper(&s) {
        let Some(close) = matching_brace(&s, open) else {
            break;
        };
        let inner = s[open + 1..close].to_string();
        s.replace_range(start..=close, &format!(" {inner} "));
    }
    s
}

/// Position of the first wrapper command followed by `{`, and of that brace.
fn find_wrapper(s: &str) -> Option<(usize, usize)> {
    WRAPPERS
        .iter()
        .filter_map(|cmd| {
            s.match_indices(cmd).find_map(|(i, _)| {
                let after = i + cmd.len();
                let rest = &s[after..];
                let gap = rest.len() - rest.trim_start().len();
                rest[gap..].starts_with('{').then_some((i, after + gap))
            })
        })
        .min()
}

/// Removes `$`, `\$`, `\(`, `\)`, `\[`, `\]`.
fn strip_delimiters(s: &str) -> String {
    s.replace("\\$", " ")
        .replace('$', " ")
        .replace("\\(", " ")
        .replace("\\)", " ")
        .replace("\\[", " ")
        .replace("\\]", " ")
}

/// Some datasets store LaTeX with every backslash doubled (`\\frac`, `\\left(`); a doubled
/// backslash before a command name is a line break followed by plain letters in LaTeX, which
/// never occurs in an answer, so it is read as the command.
fn undouble_backslashes(s: &str) -> String {
    if !s.contains("\\\\") {
        return s.to_string();
    }
    let mut out = s.to_string();
    // Adjacent commands share no characters, so a few passes reach a fixed point.
    for _ in 0..4 {
        let next = DOUBLED.replace_all(&out, "$1\\$2").into_owned();
        if next == out {
            break;
        }
        out = next;
    }
    if out == s {
        return out;
    }
    out.replace("\\\\\\\\", "\\\\")
}

/// Matrix environments (`pmatrix`, `bmatrix`, `vmatrix`, `matrix`, `array` with its column
/// specification) become `\begmat a & b \cr c & d \endmat`, so that row breaks survive the
/// removal of `\\` line breaks. Unknown environments are left alone.
fn matrices(s: &str) -> String {
    if !s.contains("\\begin") {
        return s.to_string();
    }
    let mut out = s.to_string();
    for _ in 0..8 {
        let Some(start) = out.find("\\begin{") else {
            break;
        };
        let name_start = start + "\\begin{".len();
        let Some(name_len) = out[name_start..].find('}') else {
            break;
        };
        let name = out[name_start..name_start + name_len].to_string();
        let known = matches!(
            name.as_str(),
            "pmatrix"
                | "bmatrix"
                | "Bmatrix"
                | "vmatrix"
                | "Vmatrix"
                | "matrix"
                | "smallmatrix"
                | "array"
        );
        let end_tag = format!("\\end{{{name}}}");
        let Some(end) = out.find(&end_tag) else {
            break;
        };
        if !known || end < name_start {
            break;
        }
        let mut body_start = name_start + name_len + 1;
        if name == "array" && out[body_start..].trim_start().starts_with('{') {
            let gap = out[body_start..].len() - out[body_start..].trim_start().len();
            if let Some(close) = matching_brace(&out, body_start + gap) {
                body_start = close + 1;
            }
        }
        if body_start > end {
            break;
        }
        let body = out[body_start..end].trim().trim_end_matches("\\\\").trim();
        let rows: Vec<String> = body
            .split("\\\\")
            .map(|row| ROW_SKIP.replace(row.trim(), "").trim().to_string())
            .collect();
        let replaced = format!(" \\begmat {} \\endmat ", rows.join(" \\cr "));
        out.replace_range(start..end + end_tag.len(), &replaced);
    }
    out
}

/// `1\,000`, `1{,}000` and `1\ 000` become `1000`.
fn join_thin_thousands(s: &str) -> String {
    let mut s = s.to_string();
    // Left to right, one group at a time: each pass removes one separator.
    for _ in 0..64 {
        let next = THIN_THOUSANDS.replace(&s, "$1$2").into_owned();
        if next == s {
            break;
        }
        s = next;
    }
    s
}

/// `x = 3 or x = 5` and `2 and 3` become comma lists, so several solutions
/// compare as a list. Only applied to mathematical answers, not prose.
fn list_conjunctions(s: &str) -> String {
    if s.contains('=') || s.chars().any(|c| c.is_ascii_digit()) {
        CONJUNCTION
            .replace_all(s, |c: &Captures| match (c.get(1), c.get(2)) {
                (Some(close), Some(open)) => format!("{}, {}", close.as_str(), open.as_str()),
                _ => ", ".to_string(),
            })
            .into_owned()
    } else {
        s.to_string()
    }
}

/// Expands `a \pm b` into the list `a+b, a-b` (the two solutions it stands for), in a lone
/// answer or in each element of a list or set (`\{1\pm\sqrt{5},-2\}`). Tuples are left alone.
fn expand_plus_minus(s: &str) -> String {
    if !s.contains("\\pm") {
        return s.to_string();
    }
    let t = s.trim();
    let (open, inner, close) = match t.strip_prefix("\\{").and_then(|r| r.strip_suffix("\\}")) {
        Some(inner) => ("\\{", inner, "\\}"),
        None => ("", t, ""),
    };
    let items = split_top_level(inner);
    if items.len() == 1 && open.is_empty() {
        return expand_one(s);
    }
    let expanded: Vec<String> = items.iter().map(|item| expand_one(item)).collect();
    format!("{open}{}{close}", expanded.join(", "))
}

/// `s` split at commas outside brackets and braces.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' | '(' | '[' => depth += 1,
            '}' | ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&s[start..]);
    items
}

/// Expands one top-level `a \pm b`. A `\pm` nested in braces or brackets
/// (`\frac{1 \pm \sqrt{5}}{2}`) or next to a comma is left alone: splitting there would not
/// give the two values.
fn expand_one(s: &str) -> String {
    let Some(pos) = s.find("\\pm") else {
        return s.to_string();
    };
    if s[pos + 3..].contains("\\pm") || s.contains(',') {
        return s.to_string();
    }
    let depth = s[..pos].chars().fold(0i32, |d, c| match c {
        '{' | '(' | '[' => d + 1,
        '}' | ')' | ']' => d - 1,
        _ => d,
    });
    if depth != 0 {
        return s.to_string();
    }
    let (lhs, rhs) = (s[..pos].trim(), s[pos + 3..].trim());
    if rhs.is_empty() {
        return s.to_string();
    }
    // Keep an `x =` prefix in front of the list only once.
    let (prefix, lhs) = match lhs.split_once('=') {
        Some((v, l)) if !v.trim().is_empty() && v.trim().chars().all(char::is_alphabetic) => {
            (format!("{} = ", v.trim()), l.trim())
        }
        _ => (String::new(), lhs),
    };
    if lhs.is_empty() {
        return format!("{prefix}{rhs}, -{rhs}");
    }
    format!("{prefix}{lhs}+{rhs}, {lhs}-{rhs}")
}

/// Drops trailing unit words (`5 cm^2`, `58 dollars`, `15 years old`).
fn strip_units(s: &str) -> String {
    let mut s = s.trim().to_string();
    s = CURRENCY_CODE.replace(&s, "$1").into_owned();
    for _ in 0..4 {
        let next = RATE_UNIT.replace(&s, "$1").into_owned();
        let next = UNIT.replace(&next, "$1").into_owned();
        let next = SHORT_UNIT.replace(&next, "$1").into_owned();
        let next = TRAILING_WORDS.replace(&next, "$1").into_owned();
        let next = next.trim().to_string();
        if next == s {
            break;
        }
        s = next;
    }
    s
}

/// Removes commas from digit groups like `1,000,000` unless the answer is a
/// bracketed collection, where commas separate elements.
fn join_thousands(s: &str) -> String {
    if SPACE_THOUSANDS.is_match(s.trim()) {
        return s.replace(' ', "");
    }
    if s.contains("\\{") || is_bracketed(s) {
        return s.to_string();
    }
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for m in THOUSANDS.find_iter(s) {
        let before = m.start().checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(m.end()).copied();
        let clean_before = !before.is_some_and(|b| b.is_ascii_digit() || b == b'.' || b == b',');
        let clean_after = !after.is_some_and(|b| b.is_ascii_digit() || b == b',');
        if clean_before && clean_after {
            out.push_str(&s[last..m.start()]);
            out.push_str(&m.as_str().replace(',', ""));
            last = m.end();
        }
    }
    out.push_str(&s[last..]);
    out
}

/// A lone number with a decimal comma (`1000,99`, `0,111`, `2,74`) as a decimal point. A
/// comma followed by exactly three digits (`1,222`) stays a thousands separator unless the
/// integer part is `0` (`0,111`), and a comma followed by one digit (`1,2`) stays a list of two
/// numbers, as in LaTeX answers such as `$1,2$`.
fn decimal_comma(s: &str) -> String {
    let Some(c) = DECIMAL_COMMA.captures(s.trim()) else {
        return s.to_string();
    };
    let (sign, int, frac) = (&c[1], &c[2], &c[3]);
    let zero_int = int.chars().all(|d| d == '0');
    let decimal = zero_int || (frac.len() >= 2 && frac.len() != 3);
    if decimal {
        format!("{sign}{int}.{frac}")
    } else {
        s.to_string()
    }
}

fn is_bracketed(s: &str) -> bool {
    let t = s.trim();
    matches!(t.chars().next(), Some('(' | '[' | '{'))
        && matches!(t.chars().last(), Some(')' | ']' | '}'))
}

/// Mixed numbers `2 1/2` and `2\frac{1}{2}` become `(2+1/2)`.
static REPEATING: LazyLock<Regex> =
    LazyLock::new(|| regex_or_never(r"(\d*)\.(\d*)\\(?:overline|bar)\{(\d+)\}"));

/// A repeating decimal (`0.\overline{3}`, `1.2\overline{45}`) as the exact
/// fraction it denotes, so that it equals `\frac{1}{3}` exactly rather than
/// within a tolerance (or not at all once the bar is dropped). Too many digits
/// for 128-bit arithmetic leave the text as it is.
fn repeating_decimals(s: &str) -> String {
    REPEATING
        .replace_all(s, |c: &Captures| {
            let whole = c.get(0).map_or("", |m| m.as_str()).to_string();
            let (int, fixed, rep) = (&c[1], &c[2], &c[3]);
            let value = |digits: &str| -> Option<u128> {
                if digits.is_empty() {
                    Some(0)
                } else if digits.len() > 36 {
                    None
                } else {
                    digits.parse().ok()
                }
            };
            let pow10 = |n: usize| 10u128.checked_pow(u32::try_from(n).ok()?);
            let fraction = (|| {
                let all = value(&format!("{int}{fixed}{rep}"))?;
                let head = value(&format!("{int}{fixed}"))?;
                let den = pow10(fixed.len())?.checked_mul(pow10(rep.len())?.checked_sub(1)?)?;
                Some(format!("\\frac{{{}}}{{{den}}}", all.checked_sub(head)?))
            })();
            fraction.unwrap_or(whole)
        })
        .into_owned()
}

fn mixed_numbers(s: &str) -> String {
    let s = MIXED_SLASH.replace_all(s, "$1($2+$3/$4)").into_owned();
    MIXED_FRAC
        .replace_all(&s, |c: &Captures| {
            let get = |i: usize| c.get(i).map_or("", |m| m.as_str());
            let (num, den) = if c.get(3).is_some() {
                (get(3), get(4))
            } else {
                (get(5), get(6))
            };
            format!("{}({}+\\frac{{{}}}{{{}}})", get(1), get(2), num, den)
        })
        .into_owned()
}

/// Drops sentence punctuation around the answer; a trailing `!` after an
/// operand is kept as a factorial.
fn trim_punctuation(s: &str) -> String {
    let t = s.trim().trim_start_matches([':', ',', ';']);
    let t = t.trim_end_matches(|c: char| {
        c.is_whitespace() || matches!(c, '.' | ',' | ';' | ':' | '。' | '，')
    });
    t.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> String {
        normalize(s).text
    }

    #[test]
    fn delimiters_and_wrappers() {
        assert_eq!(n("$\\frac{1}{2}$"), "\\frac{1}{2}");
        assert_eq!(n("\\text{(B)}"), "(B)");
        assert_eq!(n("\\textbf{B}"), "B");
        assert_eq!(n("\\left( 1, 2 \\right)"), "( 1, 2 )");
        assert_eq!(n("\\dfrac{3}{4}"), "\\frac{3}{4}");
        assert_eq!(n("\\mathrm{x}=3"), "x =3");
    }

    #[test]
    fn money_percent_degrees() {
        assert_eq!(n("\\$1,000"), "1000");
        assert_eq!(n("$48"), "48");
        let p = normalize("10\\%");
        assert_eq!((p.text.as_str(), p.percent), ("10", true));
        assert_eq!(n("45^\\circ"), "45");
        assert_eq!(n("45^{\\circ}"), "45");
        assert_eq!(n("45°"), "45");
    }

    #[test]
    fn units_are_dropped() {
        assert_eq!(n("58 dollars"), "58");
        assert_eq!(n("12 \\text{ cm}^2"), "12");
        assert_eq!(n("15 years old"), "15");
        assert_eq!(n("5 m"), "5");
        assert_eq!(n("5cm"), "5");
        assert_eq!(n("2 \\pi"), "2 \\pi");
        assert_eq!(n("3 x"), "3 x");
        assert_eq!(n("x = 3 \\text{ or } x = 5"), "x = 3, x = 5");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(n("1,000,000"), "1000000");
        assert_eq!(n("1\\,000"), "1000");
        assert_eq!(n("1{,}000{,}000"), "1000000");
        assert_eq!(n("(1,000)"), "(1,000)");
        assert_eq!(n("1,2"), "1,2");
        assert_eq!(n("12,345.5"), "12345.5");
    }

    #[test]
    fn decimal_commas_digit_groups_and_currency() {
        assert_eq!(n("1000,99"), "1000.99");
        assert_eq!(n("0,111"), "0.111");
        assert_eq!(n("1,222"), "1222");
        assert_eq!(n("1 000"), "1000");
        assert_eq!(n("11,\\! 111,\\! 100"), "11111100");
        assert_eq!(n("14 {,}916"), "14916");
        assert_eq!(n("€5"), "5");
        assert_eq!(n("USD 1,000"), "1000");
        assert_eq!(n("60 km/h"), "60");
    }

    #[test]
    fn matrices_doubled_backslashes_and_glued_conjunctions() {
        assert_eq!(
            n("\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}"),
            "\\begmat 1 & 2 \\cr 3 & 4 \\endmat"
        );
        assert_eq!(
            n("\\left[\\begin{array}{cc}1 & 2 \\\\ 3 & 4\\end{array}\\right]"),
            "[ \\begmat 1 & 2 \\cr 3 & 4 \\endmat ]"
        );
        assert_eq!(n("\\\\frac{1}{2}"), "\\frac{1}{2}");
        assert_eq!(n("(11,7)or(7,11)"), "(11,7), (7,11)");
    }

    #[test]
    fn mixed_numbers_and_unicode() {
        assert_eq!(n("2 1/2"), "(2+1/2)");
        assert_eq!(n("2\\frac{1}{2}"), "(2+\\frac{1}{2})");
        assert_eq!(n("-2\\frac12"), "-(2+\\frac{1}{2})");
        assert_eq!(n("−5"), "-5");
        assert_eq!(n("x^2\\frac{1}{2}"), "x^2\\frac{1}{2}");
    }
}
