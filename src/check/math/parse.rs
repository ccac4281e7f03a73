//! Tokeniser and recursive-descent parser from normalised LaTeX/plain text to
//! an [`Expr`] tree.
//!
//! The grammar is deliberately forgiving (implicit multiplication, `\frac12`
//! shorthand, `**` as power) but bounded: inputs over [`MAX_TOKENS`] tokens or
//! nested deeper than [`MAX_DEPTH`] are rejected so evaluation can never
//! exhaust the stack, and the deadline is polled once per token.

use std::fmt;
use std::time::Instant;

use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{One, Pow, Zero};

use super::{Deadline, TimedOut};

/// Longest accepted answer, in tokens. Final answers are short; anything
/// longer is almost certainly not an answer and is not worth evaluating.
pub const MAX_TOKENS: usize = 1_000;
/// Deepest accepted nesting of brackets and arguments.
pub const MAX_DEPTH: usize = 64;
/// Largest accepted decimal exponent in a literal such as `1e300`.
const MAX_LITERAL_EXPONENT: i64 = 400;

/// Why an answer could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The normalised answer is empty.
    #[error("empty answer")]
    Empty,
    /// A character or command the grammar does not know.
    #[error("unexpected input: {0}")]
    Unexpected(String),
    /// Over `MAX_TOKENS` tokens or `MAX_DEPTH` nesting.
    #[error("answer too long or too deeply nested")]
    TooComplex,
    /// The deadline passed while parsing.
    #[error("deadline exceeded while parsing")]
    TimedOut,
}

impl From<TimedOut> for ParseError {
    fn from(_: TimedOut) -> Self {
        ParseError::TimedOut
    }
}

/// Named constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Constant {
    /// π.
    Pi,
    /// Euler's number; a bare `e` is read as this constant.
    E,
    /// ∞ (only meaningful as an interval bound).
    Infinity,
}

/// Elementary functions evaluated numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Func {
    /// Sine.
    Sin,
    /// Cosine.
    Cos,
    /// Tangent.
    Tan,
    /// Cotangent.
    Cot,
    /// Secant.
    Sec,
    /// Cosecant.
    Csc,
    /// Inverse sine.
    Asin,
    /// Inverse cosine.
    Acos,
    /// Inverse tangent.
    Atan,
    /// Natural logarithm (`\ln`; `\log_b x` is `\ln x / \ln b`, `\log x` is base 10).
    Ln,
    /// Exponential.
    Exp,
    /// Absolute value (`|x|`).
    Abs,
}

/// Relation symbols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelOp {
    /// `=`
    Eq,
    /// `\ne`
    Ne,
    /// `<`
    Lt,
    /// `\le`
    Le,
    /// `>`
    Gt,
    /// `\ge`
    Ge,
}

/// A parsed answer. Scalars, collections, relations, multiple-choice letters
/// and plain text share one tree so collections can nest (`\{(1,2),(3,4)\}`).
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A numeric literal, exact; `places` is the number of digits written
    /// after the decimal point (used by the decimal-rounding rule).
    Num {
        /// The exact value.
        value: BigRational,
        /// Digits after the decimal point as written.
        places: u32,
    },
    /// A named constant.
    Const(Constant),
    /// A free variable (`x`, `\alpha`, `x_1`).
    Var(String),
    /// Negation.
    Neg(Box<Expr>),
    /// Sum.
    Add(Box<Expr>, Box<Expr>),
    /// Difference.
    Sub(Box<Expr>, Box<Expr>),
    /// Product (explicit or implicit).
    Mul(Box<Expr>, Box<Expr>),
    /// Quotient.
    Div(Box<Expr>, Box<Expr>),
    /// Power.
    Pow(Box<Expr>, Box<Expr>),
    /// `index`-th root of `radicand`.
    Root(Box<Expr>, Box<Expr>),
    /// `n!`.
    Factorial(Box<Expr>),
    /// `\binom{n}{k}`.
    Binom(Box<Expr>, Box<Expr>),
    /// A function application.
    Func(Func, Box<Expr>),
    /// An ordered tuple `(a, b, …)` or list `[a, b, c]`.
    Tuple(Vec<Expr>),
    /// An unordered set `\{a, b\}`.
    Set(Vec<Expr>),
    /// A bare comma-separated list `a, b` (solutions; compared unordered).
    List(Vec<Expr>),
    /// An interval with open (`false`) or closed (`true`) ends.
    Interval {
        /// Whether the left end is closed.
        left_closed: bool,
        /// Lower bound.
        lo: Box<Expr>,
        /// Upper bound.
        hi: Box<Expr>,
        /// Whether the right end is closed.
        right_closed: bool,
    },
    /// A union of intervals or sets.
    Union(Vec<Expr>),
    /// A relation such as `x = 3` or `x > 3`.
    Relation(Box<Expr>, RelOp, Box<Expr>),
    /// A matrix, as rows of equal length (`pmatrix`, `bmatrix`, `array`, …).
    Matrix(Vec<Vec<Expr>>),
    /// A multiple-choice letter.
    Choice(char),
    /// Plain text (lower-cased, whitespace collapsed).
    Text(String),
}

impl Expr {
    /// True for a bare number (`72`, `-3.5`, `1/2`, `\frac{1}{2}`): golds like
    /// this enable the last-number fallback.
    pub fn is_plain_number(&self) -> bool {
        match self {
            Expr::Num { .. } => true,
            Expr::Neg(inner) => inner.is_plain_number(),
            Expr::Div(a, b) => {
                matches!(**a, Expr::Num { .. } | Expr::Neg(_)) && matches!(**b, Expr::Num { .. })
            }
            _ => false,
        }
    }
}

/// Parses a normalised answer (see [`super::normalize`]), giving up with
/// [`ParseError::TimedOut`] once `deadline` passes.
pub fn parse(text: &str, deadline: Instant) -> Result<Expr, ParseError> {
    parse_with(text, &Deadline::new(deadline))
}

/// [`parse`] against an existing deadline.
pub(crate) fn parse_with(text: &str, deadline: &Deadline) -> Result<Expr, ParseError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ParseError::Empty);
    }
    if let Some(letter) = choice_letter(text) {
        return Ok(Expr::Choice(letter));
    }
    let tokens = tokenize(text, deadline)?;
    if tokens.iter().any(|t| matches!(t, Tok::Word(_))) {
        return Ok(Expr::Text(text.to_lowercase()));
    }
    let mut parser = Parser {
        tokens,
        pos: 0,
        depth: 0,
        deadline,
    };
    let expr = parser.answer()?;
    if parser.pos != parser.tokens.len() {
        return Err(ParseError::Unexpected(format!(
            "{:?}",
            parser.tokens[parser.pos]
        )));
    }
    Ok(expr)
}

/// A multiple-choice answer: `B`, `(B)`, `B)`, `(b)`, `B.`.
pub(crate) fn choice_letter(text: &str) -> Option<char> {
    let t = text.trim().trim_end_matches(['.', ':']);
    let (inner, parenthesised) = match t.strip_prefix('(') {
        Some(rest) => (rest.strip_suffix(')')?, true),
        None => (t.strip_suffix(')').unwrap_or(t), t.ends_with(')')),
    };
    let mut chars = inner.trim().chars();
    let c = chars.next()?;
    if chars.next().is_some() {
        return None;
    }
    let upper = c.to_ascii_uppercase();
    let is_choice = ('A'..='J').contains(&upper) && (c.is_ascii_uppercase() || parenthesised);
    is_choice.then_some(upper)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(String),
    Letter(char),
    Word(String),
    Cmd(String),
    Op(char),
    Open(char),
    Close(char),
    Bar,
    Rel(RelOp),
    Cup,
    /// `&`, the column separator of a matrix.
    Amp,
    /// `;`, a separator between groups of answers (`p=5,q=2;p=7,q=2`).
    Semi,
    /// `\approx`: what follows is an approximation of the value before it.
    Approx,
}

/// Names read as commands even without a backslash (`sqrt(2)`, `pi`).
const BARE_COMMANDS: [&str; 18] = [
    "sqrt", "pi", "sin", "cos", "tan", "cot", "sec", "csc", "ln", "log", "exp", "arcsin", "arccos",
    "arctan", "infty", "inf", "frac", "binom",
];

fn tokenize(s: &str, deadline: &Deadline) -> Result<Vec<Tok>, ParseError> {
    let chars: Vec<char> = s.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        deadline.check()?;
        if toks.len() > MAX_TOKENS {
            return Err(ParseError::TooComplex);
        }
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            i = number(&chars, i, &mut toks);
        } else if c.is_ascii_alphabetic() {
            i = letters(&chars, i, &mut toks);
        } else if c == '\\' {
            i = command(&chars, i, &mut toks)?;
        } else {
            i = symbol(&chars, i, &mut toks)?;
        }
    }
    Ok(toks)
}

fn number(chars: &[char], start: usize, toks: &mut Vec<Tok>) -> usize {
    let mut i = start;
    let mut seen_dot = false;
    while i < chars.len() {
        let c = chars[i];
        let dot_ok = c == '.' && !seen_dot && chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if c.is_ascii_digit() || dot_ok {
            seen_dot |= c == '.';
            i += 1;
        } else {
            break;
        }
    }
    if matches!(chars.get(i), Some('e' | 'E')) {
        let sign = usize::from(matches!(chars.get(i + 1), Some('+' | '-')));
        if chars.get(i + 1 + sign).is_some_and(char::is_ascii_digit) {
            i += 1 + sign;
            while chars.get(i).is_some_and(char::is_ascii_digit) {
                i += 1;
            }
        }
    }
    toks.push(Tok::Num(chars[start..i].iter().collect()));
    i
}

fn letters(chars: &[char], start: usize, toks: &mut Vec<Tok>) -> usize {
    let mut i = start;
    while chars.get(i).is_some_and(char::is_ascii_alphabetic) {
        i += 1;
    }
    let word: String = chars[start..i].iter().collect();
    let subscript = matches!(toks.last(), Some(Tok::Op('_')))
        || (matches!(toks.last(), Some(Tok::Open('{')))
            && matches!(
                toks.len().checked_sub(2).map(|j| &toks[j]),
                Some(Tok::Op('_'))
            ));
    if subscript {
        // `S_{MBCN}` names a point set, not prose.
        toks.extend(word.chars().map(Tok::Letter));
    } else if BARE_COMMANDS.contains(&word.as_str()) {
        toks.push(command_token(&word));
    } else if word.len() >= 3 {
        toks.push(Tok::Word(word));
    } else {
        toks.extend(word.chars().map(Tok::Letter));
    }
    i
}

fn command(chars: &[char], start: usize, toks: &mut Vec<Tok>) -> Result<usize, ParseError> {
    let mut i = start + 1;
    while chars.get(i).is_some_and(char::is_ascii_alphabetic) {
        i += 1;
    }
    if i == start + 1 {
        return match chars.get(i) {
            Some('{') => {
                toks.push(Tok::Open('s'));
                Ok(i + 1)
            }
            Some('}') => {
                toks.push(Tok::Close('s'));
                Ok(i + 1)
            }
            Some('|') => {
                toks.push(Tok::Bar);
                Ok(i + 1)
            }
            Some(',' | ';' | ':' | '!' | ' ' | '\\' | '%' | '$') => Ok(i + 1),
            other => Err(ParseError::Unexpected(format!("\\{other:?}"))),
        };
    }
    let name: String = chars[start + 1..i].iter().collect();
    if !matches!(
        name.as_str(),
        "quad" | "qquad" | "displaystyle" | "left" | "right"
    ) {
        toks.push(command_token(&name));
    }
    Ok(i)
}

fn command_token(name: &str) -> Tok {
    match name {
        "times" | "cdot" | "ast" => Tok::Op('*'),
        "div" => Tok::Op('/'),
        "le" | "leq" | "leqslant" => Tok::Rel(RelOp::Le),
        "ge" | "geq" | "geqslant" => Tok::Rel(RelOp::Ge),
        "ne" | "neq" => Tok::Rel(RelOp::Ne),
        "lt" => Tok::Rel(RelOp::Lt),
        "gt" => Tok::Rel(RelOp::Gt),
        "cup" => Tok::Cup,
        "approx" | "simeq" => Tok::Approx,
        "lbrace" => Tok::Open('s'),
        "rbrace" => Tok::Close('s'),
        "langle" => Tok::Open('('),
        "rangle" => Tok::Close(')'),
        "mid" | "vert" | "lvert" | "rvert" => Tok::Bar,
        "inf" | "infin" => Tok::Cmd("infty".to_string()),
        other => Tok::Cmd(other.to_string()),
    }
}

fn symbol(chars: &[char], i: usize, toks: &mut Vec<Tok>) -> Result<usize, ParseError> {
    let next = chars.get(i + 1).copied();
    let (tok, len) = match (chars[i], next) {
        ('*', Some('*')) => (Tok::Op('^'), 2),
        ('<', Some('=')) => (Tok::Rel(RelOp::Le), 2),
        ('>', Some('=')) => (Tok::Rel(RelOp::Ge), 2),
        ('!', Some('=')) => (Tok::Rel(RelOp::Ne), 2),
        ('=', Some('=')) => (Tok::Rel(RelOp::Eq), 2),
        ('=', _) => (Tok::Rel(RelOp::Eq), 1),
        ('<', _) => (Tok::Rel(RelOp::Lt), 1),
        ('>', _) => (Tok::Rel(RelOp::Gt), 1),
        ('+' | '-' | '*' | '/' | '^' | '_' | '!' | ',' | '\'', _) => (Tok::Op(chars[i]), 1),
        (';', _) => (Tok::Semi, 1),
        (':', _) => (Tok::Op(':'), 1),
        ('&', _) => (Tok::Amp, 1),
        ('(' | '[' | '{', _) => (Tok::Open(chars[i]), 1),
        (')' | ']' | '}', _) => (Tok::Close(chars[i]), 1),
        ('|', _) => (Tok::Bar, 1),
        (c, _) => return Err(ParseError::Unexpected(c.to_string())),
    };
    toks.push(tok);
    Ok(i + len)
}

struct Parser<'a> {
    tokens: Vec<Tok>,
    pos: usize,
    depth: usize,
    deadline: &'a Deadline,
}

type PResult = Result<Expr, ParseError>;

fn bx(e: Expr) -> Box<Expr> {
    Box::new(e)
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos)
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        if self.peek() == Some(tok) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn next(&mut self) -> Result<Tok, ParseError> {
        let tok = self
            .tokens
            .get(self.pos)
            .cloned()
            .ok_or_else(|| ParseError::Unexpected("end of input".into()))?;
        self.pos += 1;
        Ok(tok)
    }

    fn unexpected(&self) -> ParseError {
        ParseError::Unexpected(format!("{:?}", self.peek()))
    }

    /// Runs `f` one nesting level deeper, enforcing the depth cap and the
    /// deadline.
    fn nested(&mut self, f: impl FnOnce(&mut Self) -> PResult) -> PResult {
        self.deadline.check()?;
        if self.depth >= MAX_DEPTH {
            return Err(ParseError::TooComplex);
        }
        self.depth += 1;
        let out = f(self);
        self.depth -= 1;
        out
    }

    /// Groups separated by `;`; a group of several items is one solution
    /// (`p=5,q=2;p=7,q=2` lists the solutions `(p=5,q=2)` and `(p=7,q=2)`).
    fn answer(&mut self) -> PResult {
        let first = self.list()?;
        if self.peek() != Some(&Tok::Semi) {
            return Ok(first);
        }
        let mut groups = vec![first];
        while self.eat(&Tok::Semi) {
            if self.peek().is_none() {
                break;
            }
            groups.push(self.list()?);
        }
        let groups = groups
            .into_iter()
            .map(|g| match g {
                Expr::List(items) => Expr::Tuple(items),
                other => other,
            })
            .collect();
        Ok(Expr::List(groups))
    }

    fn list(&mut self) -> PResult {
        let first = self.union()?;
        if self.peek() != Some(&Tok::Op(',')) {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.eat(&Tok::Op(',')) {
            items.push(self.union()?);
        }
        Ok(Expr::List(items))
    }

    fn union(&mut self) -> PResult {
        let first = self.relation()?;
        if self.peek() != Some(&Tok::Cup) {
            return Ok(first);
        }
        let mut parts = vec![first];
        while self.eat(&Tok::Cup) {
            parts.push(self.relation()?);
        }
        Ok(Expr::Union(parts))
    }

    /// A relation, or a chain of them: `x = 5+5+1 = 11` states `x = 11`,
    /// `0 < x \le 1` states `x \in (0, 1]`, and `x = \frac13 \approx 0.33`
    /// states the exact value before `\approx`.
    fn relation(&mut self) -> PResult {
        let mut items = vec![self.ratio()?];
        let mut ops = Vec::new();
        loop {
            match self.peek().cloned() {
                Some(Tok::Rel(op)) => {
                    self.pos += 1;
                    ops.push(op);
                    items.push(self.ratio()?);
                }
                Some(Tok::Approx) if ops.is_empty() => {
                    // `x \approx 11` states the value of `x`.
                    self.pos += 1;
                    ops.push(RelOp::Eq);
                    items.push(self.ratio()?);
                }
                Some(Tok::Approx) => {
                    // The approximation is dropped, along with anything chained after it.
                    while matches!(self.peek(), Some(Tok::Approx | Tok::Rel(_))) {
                        self.pos += 1;
                        self.ratio()?;
                    }
                    break;
                }
                _ => break,
            }
        }
        if ops.is_empty() {
            return Ok(items.remove(0));
        }
        if ops.len() == 1 {
            let rhs = items.pop().ok_or(ParseError::Empty)?;
            let lhs = items.pop().ok_or(ParseError::Empty)?;
            return Ok(Expr::Relation(bx(lhs), ops[0], bx(rhs)));
        }
        chain(items, &ops)
    }

    /// `a : b`, a ratio, read as the quotient.
    fn ratio(&mut self) -> PResult {
        let mut acc = self.sum()?;
        while self.eat(&Tok::Op(':')) {
            acc = Expr::Div(bx(acc), bx(self.sum()?));
        }
        Ok(acc)
    }

    fn sum(&mut self) -> PResult {
        let mut acc = self.term()?;
        loop {
            self.deadline.check()?;
            if self.eat(&Tok::Op('+')) {
                acc = Expr::Add(bx(acc), bx(self.term()?));
            } else if self.eat(&Tok::Op('-')) {
                acc = Expr::Sub(bx(acc), bx(self.term()?));
            } else {
                return Ok(acc);
            }
        }
    }

    fn term(&mut self) -> PResult {
        let mut acc = self.unary()?;
        loop {
            self.deadline.check()?;
            if self.eat(&Tok::Op('*')) {
                acc = Expr::Mul(bx(acc), bx(self.unary()?));
            } else if self.eat(&Tok::Op('/')) {
                acc = Expr::Div(bx(acc), bx(self.unary()?));
            } else if self.starts_implicit_factor(&acc) {
                acc = Expr::Mul(bx(acc), bx(self.power()?));
            } else {
                return Ok(acc);
            }
        }
    }

    /// Whether the next token begins a factor multiplied implicitly (`2\pi`,
    /// `3\sqrt{2}`, `2(x+1)`). Two adjacent literals (`2 3`) are not.
    fn starts_implicit_factor(&self, acc: &Expr) -> bool {
        match self.peek() {
            Some(Tok::Num(_)) => !matches!(acc, Expr::Num { .. }),
            Some(Tok::Letter(_) | Tok::Open('(') | Tok::Open('{')) => true,
            Some(Tok::Cmd(name)) => is_atom_command(name),
            _ => false,
        }
    }

    fn unary(&mut self) -> PResult {
        if self.eat(&Tok::Op('-')) {
            return self.nested(|p| Ok(Expr::Neg(bx(p.unary()?))));
        }
        if self.eat(&Tok::Op('+')) {
            return self.nested(Self::unary);
        }
        self.power()
    }

    fn power(&mut self) -> PResult {
        let base = self.postfix()?;
        if !self.eat(&Tok::Op('^')) {
            return Ok(base);
        }
        let exp = self.nested(Self::exponent)?;
        let mut out = Expr::Pow(bx(base), bx(exp));
        while self.eat(&Tok::Op('!')) {
            out = Expr::Factorial(bx(out));
        }
        Ok(out)
    }

    fn exponent(&mut self) -> PResult {
        if self.eat(&Tok::Op('-')) {
            return Ok(Expr::Neg(bx(self.nested(Self::exponent)?)));
        }
        self.power()
    }

    fn postfix(&mut self) -> PResult {
        let mut e = self.nested(Self::atom)?;
        while self.eat(&Tok::Op('!')) {
            e = Expr::Factorial(bx(e));
        }
        Ok(e)
    }

    fn atom(&mut self) -> PResult {
        match self.next()? {
            Tok::Num(text) if self.peek() == Some(&Tok::Op('_')) => {
                self.pos += 1;
                let base = self.nested(Self::argument)?;
                based_numeral(&text, &base)
            }
            Tok::Num(text) => literal(&text),
            Tok::Letter(c) => self.variable(c.to_string()),
            Tok::Cmd(name) => self.command_atom(&name),
            Tok::Open(open) => self.group(open),
            Tok::Bar => {
                let inner = self.sum()?;
                if !self.eat(&Tok::Bar) {
                    return Err(self.unexpected());
                }
                Ok(Expr::Func(Func::Abs, bx(inner)))
            }
            other => Err(ParseError::Unexpected(format!("{other:?}"))),
        }
    }

    /// A variable, with an optional subscript and primes folded into its name.
    fn variable(&mut self, mut name: String) -> PResult {
        if self.eat(&Tok::Op('_')) {
            let sub = self.nested(Self::argument)?;
            name = format!("{name}_{sub}");
        }
        let mut primed = false;
        while self.eat(&Tok::Op('\'')) {
            name.push('\'');
            primed = true;
        }
        if primed || name.contains('_') {
            return Ok(Expr::Var(name));
        }
        if name == "e" {
            return Ok(Expr::Const(Constant::E));
        }
        Ok(Expr::Var(name))
    }

    fn command_atom(&mut self, name: &str) -> PResult {
        match name {
            "pi" => Ok(Expr::Const(Constant::Pi)),
            "infty" => Ok(Expr::Const(Constant::Infinity)),
            "emptyset" | "varnothing" => Ok(Expr::Set(Vec::new())),
            "frac" => {
                let num = self.nested(Self::argument)?;
                let den = self.nested(Self::argument)?;
                Ok(Expr::Div(bx(num), bx(den)))
            }
            "binom" => {
                let n = self.nested(Self::argument)?;
                let k = self.nested(Self::argument)?;
                Ok(Expr::Binom(bx(n), bx(k)))
            }
            "sqrt" => self.root(),
            "begmat" => self.matrix(),
            "endmat" | "cr" => Err(ParseError::Unexpected(format!("\\{name}"))),
            _ => match function(name) {
                Some(FuncName::Plain(f)) => self.function(f, false),
                Some(FuncName::Log) => self.function(Func::Ln, true),
                None if GREEK.contains(&name) => self.variable(format!("\\{name}")),
                None => self.symbol_command(name),
            },
        }
    }

    /// Any other command is a named symbol (`\angle`, `\vec{v}`), with its
    /// braced argument folded into the name, so that equal spellings compare
    /// equal and different ones do not.
    fn symbol_command(&mut self, name: &str) -> PResult {
        if self.peek() == Some(&Tok::Open('{')) {
            let arg = self.nested(Self::argument)?;
            return self.variable(format!("\\{name}{{{arg}}}"));
        }
        self.variable(format!("\\{name}"))
    }

    /// The rows of a matrix up to `\endmat` (see the normaliser), cells
    /// separated by `&` and rows by `\cr`.
    fn matrix(&mut self) -> PResult {
        let mut rows: Vec<Vec<Expr>> = Vec::new();
        let mut row = Vec::new();
        loop {
            self.deadline.check()?;
            match self.peek() {
                Some(Tok::Cmd(name)) if name == "endmat" => {
                    self.pos += 1;
                    rows.push(row);
                    break;
                }
                Some(Tok::Cmd(name)) if name == "cr" => {
                    self.pos += 1;
                    rows.push(std::mem::take(&mut row));
                }
                Some(Tok::Amp) => self.pos += 1,
                None => return Err(ParseError::Unexpected("unclosed matrix".into())),
                _ => row.push(self.nested(Self::union)?),
            }
        }
        rows.retain(|r| !r.is_empty());
        let width = rows.first().map_or(0, Vec::len);
        if width == 0 || rows.iter().any(|r| r.len() != width) {
            return Err(ParseError::Unexpected("ragged matrix".into()));
        }
        Ok(Expr::Matrix(rows))
    }

    fn root(&mut self) -> PResult {
        let index = if self.eat(&Tok::Open('[')) {
            let index = self.nested(Self::sum)?;
            if !self.eat(&Tok::Close(']')) {
                return Err(self.unexpected());
            }
            index
        } else {
            Expr::Num {
                value: BigRational::from_integer(BigInt::from(2)),
                places: 0,
            }
        };
        let radicand = self.nested(Self::argument)?;
        Ok(Expr::Root(bx(index), bx(radicand)))
    }

    /// `\sin^2 x`, `\log_2 8`, `\ln(x)`: optional power and base, then the
    /// argument at power precedence.
    fn function(&mut self, f: Func, is_log: bool) -> PResult {
        let mut power = None;
        let mut base = None;
        loop {
            if self.eat(&Tok::Op('^')) {
                power = Some(self.nested(Self::exponent)?);
            } else if is_log && self.eat(&Tok::Op('_')) {
                base = Some(self.nested(Self::argument)?);
            } else {
                break;
            }
        }
        let arg = self.nested(Self::power)?;
        let mut out = Expr::Func(f, bx(arg));
        if is_log {
            let base = base.unwrap_or_else(|| integer(10));
            out = Expr::Div(bx(out), bx(Expr::Func(Func::Ln, bx(base))));
        }
        if let Some(p) = power {
            out = Expr::Pow(bx(out), bx(p));
        }
        Ok(out)
    }

    /// A command argument: a braced group, a single digit (`\frac12`), a
    /// letter, or a command atom (`\frac\pi2`).
    fn argument(&mut self) -> PResult {
        match self.peek().cloned() {
            Some(Tok::Open('{')) => {
                self.pos += 1;
                self.group('{')
            }
            Some(Tok::Num(text)) => {
                let mut chars = text.chars();
                let first = chars.next().filter(char::is_ascii_digit);
                let Some(first) = first else {
                    return Err(self.unexpected());
                };
                let rest: String = chars.collect();
                if rest.is_empty() {
                    self.pos += 1;
                } else {
                    self.tokens[self.pos] = Tok::Num(rest);
                }
                literal(&first.to_string())
            }
            Some(Tok::Letter(c)) => {
                self.pos += 1;
                if c == 'e' {
                    return Ok(Expr::Const(Constant::E));
                }
                Ok(Expr::Var(c.to_string()))
            }
            Some(Tok::Cmd(_)) => self.atom(),
            _ => Err(self.unexpected()),
        }
    }

    /// The inside of a bracket opened by `open` (`s` for `\{`), through its
    /// closing bracket; decides between grouping, tuple, set and interval.
    fn group(&mut self, open: char) -> PResult {
        if open == 's' && self.eat(&Tok::Close('s')) {
            return Ok(Expr::Set(Vec::new()));
        }
        let mut items = vec![self.union()?];
        while self.eat(&Tok::Op(',')) || self.eat(&Tok::Semi) {
            items.push(self.union()?);
        }
        let Tok::Close(close) = self.next()? else {
            return Err(ParseError::Unexpected("unclosed bracket".into()));
        };
        collection(open, close, items)
    }
}

/// A name standing for a quantity rather than a value: `x`, `AB`, `f(x)`,
/// `|AB|`, `\frac{NO}{BO}`, `V_1 : V_2`, `(p, q)`. `x = 5` against `5`
/// compares the value when the other side is such a label.
pub(crate) fn is_label(e: &Expr) -> bool {
    match e {
        Expr::Var(_) => true,
        Expr::Mul(a, b) | Expr::Div(a, b) => is_label(a) && is_label(b),
        Expr::Func(_, a) => is_label(a),
        // `f^{-1}(x)`, an inverse function.
        Expr::Pow(a, b) => {
            is_label(a) && matches!(&**b, Expr::Neg(n) if matches!(**n, Expr::Num { .. }))
        }
        Expr::Tuple(items) => items.iter().all(is_label),
        _ => false,
    }
}

/// A chain of two or more relations. Equalities state their last value for
/// the last label in the chain (or the first term); two inequalities in the
/// same direction around a label state an interval (a union of two for an
/// absolute value with a non-negative lower bound).
fn chain(mut items: Vec<Expr>, ops: &[RelOp]) -> PResult {
    let chained = || ParseError::Unexpected("chained relation".into());
    if ops.iter().all(|op| *op == RelOp::Eq) {
        let last = items.pop().ok_or(ParseError::Empty)?;
        let at = items.iter().rposition(is_label).unwrap_or(0);
        let lhs = items.swap_remove(at);
        return Ok(Expr::Relation(bx(lhs), RelOp::Eq, bx(last)));
    }
    let [op1, op2] = ops else {
        return Err(chained());
    };
    let up = |op: &RelOp| matches!(op, RelOp::Lt | RelOp::Le);
    let down = |op: &RelOp| matches!(op, RelOp::Gt | RelOp::Ge);
    let closed = |op: &RelOp| matches!(op, RelOp::Le | RelOp::Ge);
    let (hi, mid, lo) = (
        items.pop().ok_or(ParseError::Empty)?,
        items.pop().ok_or(ParseError::Empty)?,
        items.pop().ok_or(ParseError::Empty)?,
    );
    let (lo, lo_closed, hi, hi_closed) = if up(op1) && up(op2) {
        (lo, closed(op1), hi, closed(op2))
    } else if down(op1) && down(op2) {
        (hi, closed(op2), lo, closed(op1))
    } else {
        return Err(chained());
    };
    let interval = |left_closed, lo, hi, right_closed| Expr::Interval {
        left_closed,
        lo: bx(lo),
        hi: bx(hi),
        right_closed,
    };
    match mid {
        Expr::Func(Func::Abs, inner) if is_label(&inner) => {
            let Expr::Num { value, .. } = &lo else {
                return Err(chained());
            };
            if value.is_zero() && lo_closed {
                return Ok(interval(
                    hi_closed,
                    Expr::Neg(bx(hi.clone())),
                    hi,
                    hi_closed,
                ));
            }
            if value < &BigRational::zero() {
                return Err(chained());
            }
            let neg = |e: &Expr| Expr::Neg(bx(e.clone()));
            Ok(Expr::Union(vec![
                interval(hi_closed, neg(&hi), neg(&lo), lo_closed),
                interval(lo_closed, lo, hi, hi_closed),
            ]))
        }
        mid if is_label(&mid) => Ok(interval(lo_closed, lo, hi, hi_closed)),
        _ => Err(chained()),
    }
}

fn collection(open: char, close: char, mut items: Vec<Expr>) -> PResult {
    let n = items.len();
    match (open, close) {
        ('s', 's') => Ok(Expr::Set(items)),
        ('(', ')') | ('{', '}') | ('[', ']') if n == 1 => Ok(items.remove(0)),
        // Plain braces only group in LaTeX: `{1, 3}` is the list `1, 3`.
        ('{', '}') => Ok(Expr::List(items)),
        ('(', ')') => Ok(Expr::Tuple(items)),
        ('[', ']') if n > 2 => Ok(Expr::Tuple(items)),
        ('[' | '(', ']' | ')') if n == 2 => {
            let hi = items.pop().ok_or(ParseError::Empty)?;
            let lo = items.pop().ok_or(ParseError::Empty)?;
            Ok(Expr::Interval {
                left_closed: open == '[',
                lo: bx(lo),
                hi: bx(hi),
                right_closed: close == ']',
            })
        }
        _ => Err(ParseError::Unexpected(format!("mismatched {open}{close}"))),
    }
}

enum FuncName {
    Plain(Func),
    Log,
}

fn function(name: &str) -> Option<FuncName> {
    let f = match name {
        "sin" => Func::Sin,
        "cos" => Func::Cos,
        "tan" => Func::Tan,
        "cot" => Func::Cot,
        "sec" => Func::Sec,
        "csc" => Func::Csc,
        "arcsin" => Func::Asin,
        "arccos" => Func::Acos,
        "arctan" => Func::Atan,
        "ln" => Func::Ln,
        "exp" => Func::Exp,
        "log" | "lg" => return Some(FuncName::Log),
        _ => return None,
    };
    Some(FuncName::Plain(f))
}

fn is_atom_command(name: &str) -> bool {
    matches!(name, "pi" | "infty" | "frac" | "sqrt" | "binom" | "begmat")
        || function(name).is_some()
        || GREEK.contains(&name)
}

/// Greek letters read as variables.
const GREEK: [&str; 24] = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "rho",
    "sigma",
    "tau",
    "phi",
    "varphi",
    "chi",
    "psi",
    "omega",
];

fn integer(n: i64) -> Expr {
    Expr::Num {
        value: BigRational::from_integer(BigInt::from(n)),
        places: 0,
    }
}

/// A numeral in another base, `204_5` (= 54): the digits must be valid in the
/// base, an integer from 2 to 10.
fn based_numeral(digits: &str, base: &Expr) -> PResult {
    let bad = || ParseError::Unexpected(format!("{digits}_{base}"));
    let Expr::Num { value, places: 0 } = base else {
        return Err(bad());
    };
    let base = num_traits::ToPrimitive::to_u32(value.numer())
        .filter(|b| value.is_integer() && (2..=10).contains(b))
        .ok_or_else(bad)?;
    let mut acc = BigInt::zero();
    for c in digits.chars() {
        let d = c.to_digit(base).ok_or_else(bad)?;
        acc = acc * base + d;
    }
    Ok(Expr::Num {
        value: BigRational::from_integer(acc),
        places: 0,
    })
}

/// Parses `12`, `0.75`, `.5`, `1.5e3` exactly.
fn literal(text: &str) -> PResult {
    let bad = || ParseError::Unexpected(text.to_string());
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i64>().map_err(|_| bad())?),
        None => (text, 0),
    };
    if exponent.abs() > MAX_LITERAL_EXPONENT {
        return Err(ParseError::TooComplex);
    }
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int_part}{frac_part}");
    let numer: BigInt = digits.parse().map_err(|_| bad())?;
    let frac_len = i64::try_from(frac_part.len()).map_err(|_| bad())?;
    let scale = exponent - frac_len;
    let ten = BigInt::from(10);
    let magnitude = Pow::pow(&ten, scale.unsigned_abs());
    let value = if scale >= 0 {
        BigRational::from_integer(numer * magnitude)
    } else {
        BigRational::new(numer, magnitude)
    };
    let places = u32::try_from((-scale).max(0)).map_err(|_| bad())?;
    Ok(Expr::Num { value, places })
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Num { value, .. } => write_rational(f, value),
            Expr::Const(Constant::Pi) => write!(f, "pi"),
            Expr::Const(Constant::E) => write!(f, "e"),
            Expr::Const(Constant::Infinity) => write!(f, "inf"),
            Expr::Var(name) => write!(f, "{name}"),
            Expr::Neg(a) => write!(f, "-({a})"),
            Expr::Add(a, b) => write!(f, "({a} + {b})"),
            Expr::Sub(a, b) => write!(f, "({a} - {b})"),
            Expr::Mul(a, b) => write!(f, "({a} * {b})"),
            Expr::Div(a, b) => write!(f, "({a} / {b})"),
            Expr::Pow(a, b) => write!(f, "({a} ^ {b})"),
            Expr::Root(n, a) => write!(f, "root({n}, {a})"),
            Expr::Factorial(a) => write!(f, "({a})!"),
            Expr::Binom(n, k) => write!(f, "binom({n}, {k})"),
            Expr::Func(func, a) => write!(f, "{}({a})", format!("{func:?}").to_lowercase()),
            Expr::Tuple(items) => write_items(f, "(", items, ")"),
            Expr::Set(items) => write_items(f, "{", items, "}"),
            Expr::List(items) => write_items(f, "", items, ""),
            Expr::Interval {
                left_closed,
                lo,
                hi,
                right_closed,
            } => {
                let l = if *left_closed { "[" } else { "(" };
                let r = if *right_closed { "]" } else { ")" };
                write!(f, "{l}{lo}, {hi}{r}")
            }
            Expr::Union(parts) => {
                let parts: Vec<String> = parts.iter().map(ToString::to_string).collect();
                write!(f, "{}", parts.join(" U "))
            }
            Expr::Relation(a, op, b) => write!(f, "{a} {} {b}", rel_symbol(*op)),
            Expr::Matrix(rows) => {
                write!(f, "[")?;
                for (i, row) in rows.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write_items(f, &format!("{sep}["), row, "]")?;
                }
                write!(f, "]")
            }
            Expr::Choice(c) => write!(f, "({c})"),
            Expr::Text(t) => write!(f, "\"{t}\""),
        }
    }
}

fn write_rational(f: &mut fmt::Formatter<'_>, r: &BigRational) -> fmt::Result {
    if r.denom().is_one() || r.numer().is_zero() {
        write!(f, "{}", r.numer())
    } else {
        write!(f, "{}/{}", r.numer(), r.denom())
    }
}

fn write_items(f: &mut fmt::Formatter<'_>, open: &str, items: &[Expr], close: &str) -> fmt::Result {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    write!(f, "{open}{}{close}", items.join(", "))
}

/// The ASCII spelling of a relation.
pub(crate) fn rel_symbol(op: RelOp) -> &'static str {
    match op {
        RelOp::Eq => "=",
        RelOp::Ne => "!=",
        RelOp::Lt => "<",
        RelOp::Le => "<=",
        RelOp::Gt => ">",
        RelOp::Ge => ">=",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn p(s: &str) -> String {
        match parse(s, Instant::now() + Duration::from_secs(5)) {
            Ok(e) => e.to_string(),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn arithmetic_and_precedence() {
        assert_eq!(p("1+2*3"), "(1 + (2 * 3))");
        assert_eq!(p("-2^2"), "-((2 ^ 2))");
        assert_eq!(p("2^-1"), "(2 ^ -(1))");
        assert_eq!(p("2^3^2"), "(2 ^ (3 ^ 2))");
        assert_eq!(p("1.5e3"), "1500");
        assert_eq!(p("0.75"), "3/4");
        assert_eq!(p("5!"), "(5)!");
        assert_eq!(p("2**3"), "(2 ^ 3)");
    }

    #[test]
    fn latex_constructs() {
        assert_eq!(p("\\frac12"), "(1 / 2)");
        assert_eq!(p("\\frac{\\pi}{2}"), "(pi / 2)");
        assert_eq!(p("3\\sqrt{2}"), "(3 * root(2, 2))");
        assert_eq!(p("\\sqrt[3]{8}"), "root(3, 8)");
        assert_eq!(p("2\\pi r"), "((2 * pi) * r)");
        assert_eq!(p("\\binom{5}{2}"), "binom(5, 2)");
        assert_eq!(p("\\log_2 8"), "(ln(8) / ln(2))");
        assert_eq!(p("|-3|"), "abs(-(3))");
        assert_eq!(p("x_1"), "x_1");
    }

    #[test]
    fn collections() {
        assert_eq!(p("\\{1,2\\}"), "{1, 2}");
        assert_eq!(p("(1,2)"), "(1, 2)");
        assert_eq!(p("[1,2)"), "[1, 2)");
        assert_eq!(p("(-\\infty, 3]"), "(-(inf), 3]");
        assert_eq!(p("1, 2"), "1, 2");
        assert_eq!(p("(0,1) \\cup (2,3)"), "(0, 1) U (2, 3)");
        assert_eq!(p("\\emptyset"), "{}");
    }

    #[test]
    fn relations_choices_text() {
        assert_eq!(p("x = 3"), "x = 3");
        assert_eq!(p("x \\ge 3"), "x >= 3");
        assert_eq!(p("(B)"), "(B)");
        assert_eq!(p("b"), "b");
        assert_eq!(p("Monday"), "\"monday\"");
        assert_eq!(p("1 < x \\le 3"), "(1, 3]");
        assert_eq!(p("3 > x > 1"), "(1, 3)");
        assert_eq!(p("1 \\le |z| < 2"), "(-(2), -(1)] U [1, 2)");
        assert_eq!(p("x = 1 + 1 = 2"), "x = 2");
        assert_eq!(p("x = \\frac13 \\approx 0.33"), "x = (1 / 3)");
        assert!(p("1 < x > 3").starts_with("error"));
        assert!(p("2 3").starts_with("error"));
        assert!(p("(((").starts_with("error"));
    }

    #[test]
    fn limits_are_enforced() {
        let deep = format!("{}1{}", "(".repeat(200), ")".repeat(200));
        assert_eq!(p(&deep), "error: answer too long or too deeply nested");
        let long = vec!["1"; 2_000].join("+");
        assert_eq!(p(&long), "error: answer too long or too deeply nested");
        assert_eq!(p("1e999999"), "error: answer too long or too deeply nested");
    }
}
