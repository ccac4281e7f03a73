//! Equivalence of parsed answers. See the module documentation of
//! [`super`] for the numeric rules; this file applies them recursively
//! through collections and relations.

use std::collections::BTreeSet;

use num_bigint::BigInt;
use num_integer::Integer;
use num_rational::BigRational;
use num_traits::{Signed, Zero};

use super::eval::{Evaluator, Limits, Value};
use super::parse::{choice_letter, is_label, Constant, Expr, Func, RelOp};
use super::{Deadline, MathOptions, Rule, TimedOut};

/// Sample values for free variables: irregular, of both signs, away from
/// small integers so that distinct polynomials rarely agree by accident.
const SAMPLES: [f64; 10] = [
    0.537_7, 1.833_9, -2.258_8, 0.862_2, 0.318_8, -1.307_7, -0.433_6, 0.342_6, 3.578_4, 2.769_4,
];
/// Sample points evaluated per comparison.
const SAMPLE_POINTS: usize = 8;
/// Values this close to zero are compared absolutely.
const ZERO_EPS: f64 = 1e-12;
/// Largest matrix (rows or columns) that matrix arithmetic is applied to.
const MAX_MATRIX: usize = 8;
/// Most matrices in one expression that matrix arithmetic is applied to (products
/// grow their entries multiplicatively).
const MAX_MATRIX_OPERANDS: usize = 4;

/// What an equivalence decision returns: equal or not, and the rule used.
pub(crate) type Decision = Result<(bool, Rule), TimedOut>;

/// Shared state of one comparison.
pub(crate) struct Ctx<'a> {
    deadline: &'a Deadline,
    limits: Limits,
    rel_tol: f64,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(deadline: &'a Deadline, opts: &MathOptions) -> Self {
        Self {
            deadline,
            limits: Limits {
                max_bits: opts.max_exact_bits,
                max_factorial: opts.max_factorial,
            },
            rel_tol: opts.rel_tol,
        }
    }

    fn evaluator<'b>(&'b self, env: &'b [(String, f64)]) -> Evaluator<'b> {
        Evaluator {
            deadline: self.deadline,
            limits: self.limits,
            env,
        }
    }
}

/// Compares two answers; when exactly one carried a percent sign and they
/// differ, retries with that side divided by 100.
pub(crate) fn with_percent(
    gold: &Expr,
    gold_percent: bool,
    pred: &Expr,
    pred_percent: bool,
    cx: &Ctx,
) -> Decision {
    let first = equivalent(gold, pred, cx)?;
    if first.0 || gold_percent == pred_percent {
        return Ok(first);
    }
    let hundred = Expr::Num {
        value: BigRational::from_integer(BigInt::from(100)),
        places: 0,
    };
    let scaled = |e: &Expr| Expr::Div(Box::new(e.clone()), Box::new(hundred.clone()));
    let retry = if gold_percent {
        equivalent(&scaled(gold), pred, cx)?
    } else {
        equivalent(gold, &scaled(pred), cx)?
    };
    Ok(if retry.0 {
        (true, Rule::PercentScaled)
    } else {
        first
    })
}

/// Whether `a` and `b` denote the same answer.
pub(crate) fn equivalent(a: &Expr, b: &Expr, cx: &Ctx) -> Decision {
    cx.deadline.check()?;
    match (a, b) {
        (Expr::Choice(x), Expr::Choice(y)) => Ok((x == y, Rule::ChoiceEqual)),
        (Expr::Choice(x), other) | (other, Expr::Choice(x)) => Ok((
            leading_choice(other).is_some_and(|y| y == *x),
            Rule::ChoiceEqual,
        )),
        (Expr::Text(x), Expr::Text(y)) => Ok((squash(x) == squash(y), Rule::TextEqual)),
        (Expr::Text(_), _) | (_, Expr::Text(_)) => Ok((false, Rule::KindMismatch)),
        _ if has_matrix(a) || has_matrix(b) => matrix_pair(a, b, cx),
        (Expr::Relation(..), _) | (_, Expr::Relation(..)) => relation_pair(a, b, cx),
        _ => collection_pair(a, b, cx),
    }
}

fn collection_pair(a: &Expr, b: &Expr, cx: &Ctx) -> Decision {
    // One value written several ways (`\frac{1}{2} \text{ or } 0.5`) states that value.
    if let (false, Expr::List(items)) = (is_collection(a), b) {
        if let Some(first) = items.first() {
            let mut same = items.len() > 1;
            for other in &items[1..] {
                same = same && !is_collection(other) && equivalent(first, other, cx)?.0;
            }
            if same {
                return equivalent(a, first, cx);
            }
        }
    }
    match (a, b) {
        (Expr::Set(x), Expr::Set(y) | Expr::List(y))
        | (Expr::List(x), Expr::Set(y) | Expr::List(y)) => unordered(x, y, cx),
        (Expr::Tuple(x), Expr::Tuple(y) | Expr::List(y)) | (Expr::List(x), Expr::Tuple(y)) => {
            ordered(x, y, cx)
        }
        (Expr::Union(x), Expr::Union(y) | Expr::List(y)) | (Expr::List(x), Expr::Union(y)) => {
            unordered(x, y, cx)
        }
        (Expr::Union(x), other) | (other, Expr::Union(x)) if x.len() == 1 => {
            equivalent(&x[0], other, cx)
        }
        // A one-element solution set states the same answer as its element.
        (Expr::Set(x), other) | (other, Expr::Set(x)) if x.len() == 1 && !is_collection(other) => {
            equivalent(&x[0], other, cx)
        }
        _ => match (as_interval(a), as_interval(b)) {
            (Some(x), Some(y)) if is_interval(a) || is_interval(b) => interval_pair(&x, &y, cx),
            _ if is_collection(a) || is_collection(b) => Ok((false, Rule::KindMismatch)),
            _ => scalar_pair(a, b, cx),
        },
    }
}

fn is_collection(e: &Expr) -> bool {
    matches!(
        e,
        Expr::Set(_) | Expr::Tuple(_) | Expr::List(_) | Expr::Interval { .. } | Expr::Union(_)
    )
}

fn is_interval(e: &Expr) -> bool {
    matches!(e, Expr::Interval { .. })
}

/// The choice letter leading an answer such as `B` or `(B) 12`, which
/// parses as a product whose leftmost factor is the letter.
fn leading_choice(e: &Expr) -> Option<char> {
    match e {
        Expr::Var(name) => choice_letter(name),
        Expr::Mul(first, _) => leading_choice(first),
        _ => None,
    }
}

fn squash(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

/// Collections compared as sets: every element of each side equals some
/// element of the other, in any order (a repeated solution counts once).
fn unordered(x: &[Expr], y: &[Expr], cx: &Ctx) -> Decision {
    if x.is_empty() != y.is_empty() {
        return Ok((false, Rule::SetEqual));
    }
    let mut matched_y = vec![false; y.len()];
    for item in x {
        let mut found = false;
        for (j, other) in y.iter().enumerate() {
            if equivalent(item, other, cx)?.0 {
                matched_y[j] = true;
                found = true;
                if x.len() == y.len() {
                    break;
                }
            }
        }
        if !found {
            return Ok((false, Rule::SetEqual));
        }
    }
    for (j, other) in y.iter().enumerate() {
        if matched_y[j] {
            continue;
        }
        let mut found = false;
        for item in x {
            if equivalent(item, other, cx)?.0 {
                found = true;
                break;
            }
        }
        if !found {
            return Ok((false, Rule::SetEqual));
        }
    }
    Ok((true, Rule::SetEqual))
}

/// Whether a matrix occurs in `e`, directly or in matrix arithmetic.
fn has_matrix(e: &Expr) -> bool {
    matrix_count(e) > 0
}

/// Matrices in `e`, directly or in matrix arithmetic.
fn matrix_count(e: &Expr) -> usize {
    match e {
        Expr::Matrix(_) => 1,
        Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) => matrix_count(a) + matrix_count(b),
        Expr::Neg(a) => matrix_count(a),
        _ => 0,
    }
}

type Rows = Vec<Vec<Expr>>;

/// The entries of a matrix expression: a matrix, or sums, differences,
/// products and scalar multiples of matrices, entry by entry as expressions.
fn matrix_of(e: &Expr) -> Option<Rows> {
    match e {
        Expr::Matrix(rows) => Some(rows.clone()),
        _ if matrix_count(e) <= MAX_MATRIX_OPERANDS => matrix_arithmetic(e),
        _ => None,
    }
}

fn matrix_arithmetic(e: &Expr) -> Option<Rows> {
    let bx = |e: Expr| Box::new(e);
    let zip = |a: Rows, b: Rows, f: &dyn Fn(Expr, Expr) -> Expr| -> Option<Rows> {
        let same = a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.len() == y.len());
        same.then(|| {
            a.into_iter()
                .zip(b)
                .map(|(x, y)| x.into_iter().zip(y).map(|(p, q)| f(p, q)).collect())
                .collect()
        })
    };
    let map = |m: Rows, f: &dyn Fn(Expr) -> Expr| -> Rows {
        m.into_iter()
            .map(|row| row.into_iter().map(f).collect())
            .collect()
    };
    match e {
        Expr::Matrix(rows) if rows.len() <= MAX_MATRIX && rows[0].len() <= MAX_MATRIX => {
            Some(rows.clone())
        }
        Expr::Neg(a) => Some(map(matrix_arithmetic(a)?, &|x| Expr::Neg(bx(x)))),
        Expr::Add(a, b) => zip(matrix_arithmetic(a)?, matrix_arithmetic(b)?, &|x, y| {
            Expr::Add(bx(x), bx(y))
        }),
        Expr::Sub(a, b) => zip(matrix_arithmetic(a)?, matrix_arithmetic(b)?, &|x, y| {
            Expr::Sub(bx(x), bx(y))
        }),
        Expr::Mul(a, b) => match (has_matrix(a), has_matrix(b)) {
            (true, true) => {
                let (p, q) = (matrix_arithmetic(a)?, matrix_arithmetic(b)?);
                let inner = q.len();
                if p[0].len() != inner {
                    return None;
                }
                let cols = q[0].len();
                Some(
                    p.iter()
                        .map(|row| {
                            (0..cols)
                                .map(|j| {
                                    (0..inner)
                                        .map(|k| Expr::Mul(bx(row[k].clone()), bx(q[k][j].clone())))
                                        .reduce(|acc, t| Expr::Add(bx(acc), bx(t)))
                                        .unwrap_or_else(|| Expr::Tuple(Vec::new()))
                                })
                                .collect()
                        })
                        .collect(),
                )
            }
            (true, false) if !is_collection(b) => Some(map(matrix_arithmetic(a)?, &|x| {
                Expr::Mul(bx(x), bx((**b).clone()))
            })),
            (false, true) if !is_collection(a) => Some(map(matrix_arithmetic(b)?, &|x| {
                Expr::Mul(bx((**a).clone()), bx(x))
            })),
            _ => None,
        },
        _ => None,
    }
}

/// Matrices are equal when they have the same shape and equal entries; a
/// single row or column also equals a tuple of its entries (a vector).
fn matrix_pair(a: &Expr, b: &Expr, cx: &Ctx) -> Decision {
    let vector = |m: &Rows| -> Option<Vec<Expr>> {
        if m.len() == 1 {
            Some(m[0].clone())
        } else if m.iter().all(|r| r.len() == 1) {
            Some(m.iter().map(|r| r[0].clone()).collect())
        } else {
            None
        }
    };
    match (matrix_of(a), matrix_of(b)) {
        (Some(x), Some(y)) => {
            let same = x.len() == y.len() && x.iter().zip(&y).all(|(p, q)| p.len() == q.len());
            if !same {
                return Ok((false, Rule::KindMismatch));
            }
            for (p, q) in x.iter().flatten().zip(y.iter().flatten()) {
                if !equivalent(p, q, cx)?.0 {
                    return Ok((false, Rule::TupleEqual));
                }
            }
            Ok((true, Rule::TupleEqual))
        }
        (Some(m), None) | (None, Some(m)) => {
            let other = if matrix_of(a).is_some() { b } else { a };
            match (other, vector(&m)) {
                (Expr::Tuple(items), Some(v)) => ordered(items, &v, cx),
                _ => Ok((false, Rule::KindMismatch)),
            }
        }
        (None, None) => Ok((false, Rule::KindMismatch)),
    }
}

fn ordered(x: &[Expr], y: &[Expr], cx: &Ctx) -> Decision {
    if x.len() != y.len() {
        return Ok((false, Rule::TupleEqual));
    }
    for (p, q) in x.iter().zip(y) {
        if !equivalent(p, q, cx)?.0 {
            return Ok((false, Rule::TupleEqual));
        }
    }
    Ok((true, Rule::TupleEqual))
}

/// An interval view: real intervals, and two-element tuples read as open
/// intervals (`(1, 2)` is ambiguous between the two).
struct IntervalView<'e> {
    left_closed: bool,
    lo: &'e Expr,
    hi: &'e Expr,
    right_closed: bool,
}

fn as_interval(e: &Expr) -> Option<IntervalView<'_>> {
    match e {
        Expr::Interval {
            left_closed,
            lo,
            hi,
            right_closed,
        } => Some(IntervalView {
            left_closed: *left_closed,
            lo,
            hi,
            right_closed: *right_closed,
        }),
        Expr::Tuple(items) if items.len() == 2 => Some(IntervalView {
            left_closed: false,
            lo: &items[0],
            hi: &items[1],
            right_closed: false,
        }),
        _ => None,
    }
}

fn interval_pair(x: &IntervalView, y: &IntervalView, cx: &Ctx) -> Decision {
    let ends_match = x.left_closed == y.left_closed && x.right_closed == y.right_closed;
    let equal = ends_match && equivalent(x.lo, y.lo, cx)?.0 && equivalent(x.hi, y.hi, cx)?.0;
    Ok((equal, Rule::IntervalEqual))
}

/// Relations: `x = 3` against a bare `3` compares the right-hand side;
/// `x > 3` against an interval compares `(3, \infty)`; two relations are
/// compared after rewriting `<`/`\le` as `>`/`\ge` with sides swapped.
fn relation_pair(a: &Expr, b: &Expr, cx: &Ctx) -> Decision {
    match (a, b) {
        (Expr::Relation(l1, op1, r1), Expr::Relation(l2, op2, r2)) => {
            let (l1, op1, r1) = canonical(l1, *op1, r1);
            let (l2, op2, r2) = canonical(l2, *op2, r2);
            if op1 != op2 {
                return Ok((false, Rule::RelationEqual));
            }
            if equivalent(l1, l2, cx)?.0 && equivalent(r1, r2, cx)?.0 {
                return Ok((true, Rule::RelationEqual));
            }
            // `W(n) = 1` and `W(x) = 1` name the same function at a dummy argument.
            let same_function =
                function_head(l1).is_some() && function_head(l1) == function_head(l2);
            if op1 == RelOp::Eq && same_function && equivalent(r1, r2, cx)?.0 {
                return Ok((true, Rule::RelationEqual));
            }
            let symmetric = matches!(op1, RelOp::Eq | RelOp::Ne);
            if symmetric && equivalent(l1, r2, cx)?.0 && equivalent(r1, l2, cx)?.0 {
                return Ok((true, Rule::RelationEqual));
            }
            Ok((proportional(l1, op1, r1, l2, r2, cx)?, Rule::RelationEqual))
        }
        (Expr::Relation(l, op, r), other) => relation_vs_value(l, *op, r, other, false, cx),
        (other, Expr::Relation(l, op, r)) => relation_vs_value(l, *op, r, other, true, cx),
        _ => Ok((false, Rule::KindMismatch)),
    }
}

/// Two relations with the same (canonical) operator whose sides are
/// expressions in free variables: equal when `l1 - r1` is a constant multiple
/// of `l2 - r2` at every sample point, positive for inequalities and nonzero
/// for equations. So `2x+4y-3=0` equals `y=-\frac{1}{2}x+\frac{3}{4}` and
/// `-x > -1` (canonically `1 > x`) equals `x < 1`.
fn proportional(
    l1: &Expr,
    op: RelOp,
    r1: &Expr,
    l2: &Expr,
    r2: &Expr,
    cx: &Ctx,
) -> Result<bool, TimedOut> {
    let mut names = BTreeSet::new();
    for e in [l1, r1, l2, r2] {
        collect_vars(e, &mut names);
    }
    if names.is_empty() {
        return Ok(false);
    }
    let d1 = Expr::Sub(Box::new(l1.clone()), Box::new(r1.clone()));
    let d2 = Expr::Sub(Box::new(l2.clone()), Box::new(r2.clone()));
    let mut ratio: Option<f64> = None;
    let mut agreed = 0;
    for point in 0..SAMPLE_POINTS {
        let env = sample_env(&names, point);
        let ev = cx.evaluator(&env);
        let (Some(x), Some(y)) = (ev.eval(&d1)?, ev.eval(&d2)?) else {
            continue;
        };
        let (Some(x), Some(y)) = (x.to_f64(), y.to_f64()) else {
            continue;
        };
        if y.abs() < ZERO_EPS || x.abs() < ZERO_EPS {
            if (x.abs() < ZERO_EPS) != (y.abs() < ZERO_EPS) {
                return Ok(false);
            }
            continue;
        }
        let q = x / y;
        match ratio {
            None => ratio = Some(q),
            Some(r) if close(r, q, 1e-9) => {}
            Some(_) => return Ok(false),
        }
        agreed += 1;
    }
    let sign_ok = match (op, ratio) {
        (_, None) => false,
        (RelOp::Eq | RelOp::Ne, Some(r)) => r != 0.0,
        (_, Some(r)) => r > 0.0,
    };
    Ok(sign_ok && agreed >= 3)
}

/// The name of a function applied to an argument list (`f(x)`, `W(n)`).
fn function_head(e: &Expr) -> Option<&str> {
    match e {
        Expr::Mul(f, arg) => match (&**f, &**arg) {
            (Expr::Var(name), Expr::Var(_) | Expr::Tuple(_)) => Some(name),
            _ => None,
        },
        _ => None,
    }
}

fn sample_env(names: &BTreeSet<String>, point: usize) -> Vec<(String, f64)> {
    names
        .iter()
        .enumerate()
        .map(|(j, name)| (name.clone(), SAMPLES[(point + 3 * j) % SAMPLES.len()]))
        .collect()
}

/// A relation against a plain answer. An equation whose one side is a label
/// (`x`, `f(x)`, `|AB|`, `(p, q)`) states its other side, and a computation
/// without unknowns (`5 \times 6 \times 4 = 120`) its result; an equation in
/// unknowns (`2x + z = 1`, `7 = 11a + c`) is not a value. The reading is
/// guided by the gold, as in math-verify: a predicted equation ends in its
/// value (`2x + z = 1` answers `1`), a gold equation in unknowns does not
/// accept a bare value. An inequality in one label states an interval.
fn relation_vs_value(
    l: &Expr,
    op: RelOp,
    r: &Expr,
    other: &Expr,
    relation_is_pred: bool,
    cx: &Ctx,
) -> Decision {
    let value_side = if is_label(l) {
        r
    } else if is_label(r) {
        l
    } else if op == RelOp::Eq && (relation_is_pred || !has_vars(l) && !has_vars(r)) {
        r
    } else {
        return Ok((false, Rule::KindMismatch));
    };
    if op == RelOp::Eq {
        return equivalent(value_side, other, cx);
    }
    let Some(interval) = relation_interval(l, op, r) else {
        return Ok((false, Rule::KindMismatch));
    };
    equivalent(&interval, other, cx)
}

/// `x > a` as `(a, \infty)`, `a \ge x` as `(-\infty, a]`, and so on.
fn relation_interval(l: &Expr, op: RelOp, r: &Expr) -> Option<Expr> {
    let (op, bound) = if is_label(l) {
        (op, r)
    } else if is_label(r) {
        (flip(op), l)
    } else {
        return None;
    };
    let inf = || Box::new(Expr::Const(Constant::Infinity));
    let neg_inf = || Box::new(Expr::Neg(inf()));
    let label = if is_label(l) { l } else { r };
    if matches!(label, Expr::Func(Func::Abs, _)) {
        return Some(abs_interval(op, bound));
    }
    let bound = Box::new(bound.clone());
    let (left_closed, lo, hi, right_closed) = match op {
        RelOp::Gt => (false, bound, inf(), false),
        RelOp::Ge => (true, bound, inf(), false),
        RelOp::Lt => (false, neg_inf(), bound, false),
        RelOp::Le => (false, neg_inf(), bound, true),
        RelOp::Eq | RelOp::Ne => return None,
    };
    Some(Expr::Interval {
        left_closed,
        lo,
        hi,
        right_closed,
    })
}

/// `|x| < b` as `(-b, b)`, `|x| \ge b` as `(-\infty, -b] \cup [b, \infty)`.
fn abs_interval(op: RelOp, bound: &Expr) -> Expr {
    let inf = || Box::new(Expr::Const(Constant::Infinity));
    let neg = |e: Box<Expr>| Box::new(Expr::Neg(e));
    let b = || Box::new(bound.clone());
    let closed = matches!(op, RelOp::Le | RelOp::Ge);
    let interval = |left_closed, lo, hi, right_closed| Expr::Interval {
        left_closed,
        lo,
        hi,
        right_closed,
    };
    match op {
        RelOp::Lt | RelOp::Le => interval(closed, neg(b()), b(), closed),
        _ => Expr::Union(vec![
            interval(false, neg(inf()), neg(b()), closed),
            interval(closed, b(), inf(), false),
        ]),
    }
}

fn flip(op: RelOp) -> RelOp {
    match op {
        RelOp::Lt => RelOp::Gt,
        RelOp::Le => RelOp::Ge,
        RelOp::Gt => RelOp::Lt,
        RelOp::Ge => RelOp::Le,
        other => other,
    }
}

fn canonical<'e>(l: &'e Expr, op: RelOp, r: &'e Expr) -> (&'e Expr, RelOp, &'e Expr) {
    match op {
        RelOp::Lt | RelOp::Le => (r, flip(op), l),
        _ => (l, op, r),
    }
}

/// Scalars: infinities, then exact values, then approximate values, then
/// sample points for free variables, then printed structure.
fn scalar_pair(a: &Expr, b: &Expr, cx: &Ctx) -> Decision {
    match (infinity_sign(a), infinity_sign(b)) {
        (None, None) => {}
        (x, y) => return Ok((x == y, Rule::StructuralEqual)),
    }
    let ev = cx.evaluator(&[]);
    let (va, vb) = (ev.eval(a)?, ev.eval(b)?);
    if let (Some(va), Some(vb)) = (&va, &vb) {
        if let Some(decision) = compare_values(a, va, b, vb, cx) {
            return Ok(decision);
        }
    }
    if let Some(decision) = sample_compare(a, b, cx)? {
        return Ok(decision);
    }
    Ok((a.to_string() == b.to_string(), Rule::StructuralEqual))
}

fn infinity_sign(e: &Expr) -> Option<i8> {
    match e {
        Expr::Const(Constant::Infinity) => Some(1),
        Expr::Neg(inner) => infinity_sign(inner).map(|s| -s),
        _ => None,
    }
}

/// Compares two evaluated scalars; `None` when neither exact nor
/// floating-point comparison applies (values out of `f64` range).
fn compare_values(a: &Expr, va: &Value, b: &Expr, vb: &Value, cx: &Ctx) -> Option<(bool, Rule)> {
    if let (Value::Exact(x), Value::Exact(y)) = (va, vb) {
        if x == y {
            return Some((true, Rule::RationalEqual));
        }
        if rounds_to(a, y) || rounds_to(b, x) {
            return Some((true, Rule::DecimalRounding));
        }
        return Some((false, Rule::RationalEqual));
    }
    let (x, y) = (va.to_f64()?, vb.to_f64()?);
    if close(x, y, cx.rel_tol) {
        return Some((true, Rule::NumericTolerance));
    }
    if rounds_to_approx(a, y) || rounds_to_approx(b, x) {
        return Some((true, Rule::DecimalRounding));
    }
    Some((false, Rule::NumericTolerance))
}

fn close(x: f64, y: f64, rel_tol: f64) -> bool {
    if x.abs() < ZERO_EPS || y.abs() < ZERO_EPS {
        return (x - y).abs() < ZERO_EPS;
    }
    (x - y).abs() <= rel_tol * x.abs().max(y.abs())
}

/// A decimal literal with at least two digits after the point, with sign.
fn decimal_literal(e: &Expr) -> Option<(BigRational, u32)> {
    match e {
        Expr::Num { value, places } if *places >= 2 => Some((value.clone(), *places)),
        Expr::Neg(inner) => decimal_literal(inner).map(|(v, p)| (-v, p)),
        _ => None,
    }
}

/// Whether the decimal literal `lit` is `value` rounded to the literal's
/// number of digits, for a `value` that is not a terminating decimal.
fn rounds_to(lit: &Expr, value: &BigRational) -> bool {
    let Some((d, places)) = decimal_literal(lit) else {
        return false;
    };
    if terminates(value) {
        return false;
    }
    let scale = num_traits::Pow::pow(BigInt::from(10), places);
    let twice_error = (value - d).abs() * BigRational::from_integer(scale * 2);
    twice_error <= BigRational::from_integer(BigInt::from(1))
}

fn rounds_to_approx(lit: &Expr, value: f64) -> bool {
    let Some((d, places)) = decimal_literal(lit) else {
        return false;
    };
    let Some(d) = num_traits::ToPrimitive::to_f64(&d) else {
        return false;
    };
    let half_unit = 0.5 * 10f64.powi(-i32::try_from(places).unwrap_or(i32::MAX));
    (value - d).abs() <= half_unit * (1.0 + 1e-9)
}

/// True when the rational has a finite decimal expansion (denominator of
/// the form `2^a 5^b`).
fn terminates(r: &BigRational) -> bool {
    let mut d = r.denom().clone();
    for p in [2u32, 5] {
        let p = BigInt::from(p);
        while !d.is_zero() && d.is_multiple_of(&p) {
            d /= &p;
        }
    }
    d == BigInt::from(1)
}

/// Evaluates both sides at fixed points for their free variables. `None`
/// when there are no variables or no point where both sides are defined.
fn sample_compare(a: &Expr, b: &Expr, cx: &Ctx) -> Result<Option<(bool, Rule)>, TimedOut> {
    let mut names = BTreeSet::new();
    collect_vars(a, &mut names);
    collect_vars(b, &mut names);
    if names.is_empty() {
        return Ok(None);
    }
    let mut agreed = 0;
    for point in 0..SAMPLE_POINTS {
        let env = sample_env(&names, point);
        let ev = cx.evaluator(&env);
        let (Some(x), Some(y)) = (ev.eval(a)?, ev.eval(b)?) else {
            continue;
        };
        let (Some(x), Some(y)) = (x.to_f64(), y.to_f64()) else {
            continue;
        };
        if !close(x, y, cx.rel_tol.max(1e-9)) {
            return Ok(Some((false, Rule::SymbolicSample)));
        }
        agreed += 1;
    }
    Ok((agreed > 0).then_some((true, Rule::SymbolicSample)))
}

fn has_vars(e: &Expr) -> bool {
    let mut names = BTreeSet::new();
    collect_vars(e, &mut names);
    !names.is_empty()
}

fn collect_vars(e: &Expr, names: &mut BTreeSet<String>) {
    match e {
        Expr::Var(name) => {
            names.insert(name.clone());
        }
        Expr::Neg(a) | Expr::Factorial(a) | Expr::Func(_, a) => collect_vars(a, names),
        Expr::Add(a, b)
        | Expr::Sub(a, b)
        | Expr::Mul(a, b)
        | Expr::Div(a, b)
        | Expr::Pow(a, b)
        | Expr::Root(a, b)
        | Expr::Binom(a, b)
        | Expr::Relation(a, _, b) => {
            collect_vars(a, names);
            collect_vars(b, names);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::math::parse::parse_with as parse;
    use std::time::{Duration, Instant};

    fn eq(a: &str, b: &str) -> (bool, Rule) {
        let deadline = Deadline::new(Instant::now() + Duration::from_secs(5));
        let opts = MathOptions::default();
        let cx = Ctx::new(&deadline, &opts);
        let (Ok(x), Ok(y)) = (parse(a, &deadline), parse(b, &deadline)) else {
            panic!("parse failed: {a} / {b}");
        };
        equivalent(&x, &y, &cx).unwrap_or((false, Rule::Deadline))
    }

    #[test]
    fn rules_are_reported() {
        assert_eq!(eq("0.75", "\\frac{3}{4}"), (true, Rule::RationalEqual));
        assert_eq!(eq("0.33", "1/3"), (true, Rule::DecimalRounding));
        assert_eq!(eq("0.3", "1/3"), (false, Rule::RationalEqual));
        assert_eq!(eq("3.14", "\\pi"), (true, Rule::DecimalRounding));
        assert_eq!(
            eq("\\sqrt{8}", "2\\sqrt{2}"),
            (true, Rule::NumericTolerance)
        );
        assert_eq!(eq("(x+1)^2", "x^2+2x+1"), (true, Rule::SymbolicSample));
        assert_eq!(eq("(x+1)^2", "x^2+1"), (false, Rule::SymbolicSample));
        assert_eq!(eq("\\{1,2\\}", "\\{2,1\\}"), (true, Rule::SetEqual));
        assert_eq!(eq("(1,2)", "(2,1)"), (false, Rule::TupleEqual));
        assert_eq!(eq("[1,2)", "[1,2]"), (false, Rule::IntervalEqual));
        assert_eq!(eq("x > 3", "3 < x"), (true, Rule::RelationEqual));
        assert_eq!(eq("x > 3", "(3, \\infty)"), (true, Rule::IntervalEqual));
        assert_eq!(eq("x = 5", "5"), (true, Rule::RationalEqual));
        assert_eq!(eq("\\{1\\}", "1"), (true, Rule::RationalEqual));
        assert_eq!(eq("\\{1, 2\\}", "1"), (false, Rule::KindMismatch));
    }

    #[test]
    fn relations_matrices_and_labels() {
        assert_eq!(eq("-x > -1", "x < 1"), (true, Rule::RelationEqual));
        assert_eq!(eq("-x < -1", "x < 1"), (false, Rule::RelationEqual));
        assert_eq!(eq("2x+4y-3=0", "y=-x/2+3/4"), (true, Rule::RelationEqual));
        assert_eq!(eq("0 < x < 1", "(0, 1)"), (true, Rule::IntervalEqual));
        assert_eq!(eq("|x| < 3", "(-3, 3)"), (true, Rule::IntervalEqual));
        assert_eq!(eq("(p,q) = (3,2)", "(3,2)"), (true, Rule::TupleEqual));
        assert_eq!(eq("2x + z = 1", "1"), (false, Rule::KindMismatch));
        assert_eq!(eq("1", "2x + z = 1"), (true, Rule::RationalEqual));
        let m = "\\begmat 1 & 2 \\cr 3 & 4 \\endmat";
        assert_eq!(eq(m, m), (true, Rule::TupleEqual));
        assert_eq!(
            eq(m, "\\begmat 1 & 3 \\cr 2 & 4 \\endmat"),
            (false, Rule::TupleEqual)
        );
        assert_eq!(eq("1, 1, 2", "2, 1"), (true, Rule::SetEqual));
    }

    #[test]
    fn terminating_decimals() {
        let r = |n: i64, d: i64| BigRational::new(n.into(), d.into());
        assert!(terminates(&r(3, 40)));
        assert!(!terminates(&r(1, 3)));
    }
}
