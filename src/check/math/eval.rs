//! Evaluation of scalar expressions: exact rational arithmetic while every
//! operation stays rational and under the size caps, double precision after
//! that, and "undefined" for anything else (free variables without a value,
//! division by zero, overflow, collections).

use num_bigint::BigInt;
use num_integer::Integer;
use num_rational::BigRational;
use num_traits::{One, Signed, ToPrimitive, Zero};

use super::parse::{Constant, Expr, Func};
use super::{Deadline, TimedOut};

/// Largest root index evaluated exactly (`\sqrt[n]{x}`, `x^{p/q}`).
const MAX_EXACT_ROOT: u32 = 64;

/// A scalar value: exact while possible, approximate afterwards.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// An exact rational.
    Exact(BigRational),
    /// A finite double-precision approximation.
    Approx(f64),
}

impl Value {
    /// The value as a finite `f64`; `None` when an exact value is outside the
    /// range of `f64` (so that, e.g., `1/2004!` and `1/2006!` are never both
    /// rounded to zero and called equal).
    pub(crate) fn to_f64(&self) -> Option<f64> {
        match self {
            Value::Approx(x) => Some(*x),
            Value::Exact(r) => rational_to_f64(r),
        }
    }
}

fn rational_to_f64(r: &BigRational) -> Option<f64> {
    let x = r.to_f64()?;
    let underflow = x == 0.0 && !r.is_zero();
    (x.is_finite() && !underflow).then_some(x)
}

/// Size caps for exact arithmetic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_bits: u64,
    pub(crate) max_factorial: u64,
}

/// Evaluates expressions under a deadline, with optional values for free
/// variables (used by the sample-point comparison).
pub(crate) struct Evaluator<'a> {
    pub(crate) deadline: &'a Deadline,
    pub(crate) limits: Limits,
    pub(crate) env: &'a [(String, f64)],
}

type EResult = Result<Option<Value>, TimedOut>;

impl Evaluator<'_> {
    /// Evaluates `e`; `Ok(None)` means undefined or not a scalar.
    pub(crate) fn eval(&self, e: &Expr) -> EResult {
        self.deadline.check()?;
        match e {
            Expr::Num { value, .. } => Ok(Some(Value::Exact(value.clone()))),
            Expr::Const(Constant::Pi) => Ok(Some(Value::Approx(std::f64::consts::PI))),
            Expr::Const(Constant::E) => Ok(Some(Value::Approx(std::f64::consts::E))),
            Expr::Var(name) => Ok(self.lookup(name)),
            Expr::Neg(a) => Ok(self.eval(a)?.map(negate)),
            Expr::Add(a, b) => self.binary(a, b, |x, y| Some(x + y), |x, y| x + y, true),
            Expr::Sub(a, b) => self.binary(a, b, |x, y| Some(x - y), |x, y| x - y, true),
            Expr::Mul(a, b) => self.binary(a, b, |x, y| Some(x * y), |x, y| x * y, false),
            Expr::Div(a, b) => self.binary(a, b, exact_div, |x, y| x / y, false),
            Expr::Pow(a, b) => self.power(a, b),
            Expr::Root(n, a) => self.root(n, a),
            Expr::Factorial(a) => self.factorial(a),
            Expr::Binom(n, k) => self.binom(n, k),
            Expr::Func(f, a) => self.function(*f, a),
            _ => Ok(None),
        }
    }

    fn lookup(&self, name: &str) -> Option<Value> {
        self.env
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| Value::Approx(*v))
    }

    fn exact_fits(&self, r: &BigRational) -> bool {
        r.numer().bits() + r.denom().bits() <= self.limits.max_bits
    }

    /// Wraps an exact result, degrading to an approximation over the cap.
    fn exact(&self, r: BigRational) -> Option<Value> {
        if self.exact_fits(&r) {
            Some(Value::Exact(r))
        } else {
            rational_to_f64(&r).map(Value::Approx)
        }
    }

    /// A binary operation; `may_cancel` marks `+`/`-`, whose zero results
    /// are genuine rather than underflow.
    fn binary(
        &self,
        a: &Expr,
        b: &Expr,
        exact: impl Fn(BigRational, BigRational) -> Option<BigRational>,
        approx: impl Fn(f64, f64) -> f64,
        may_cancel: bool,
    ) -> EResult {
        let (Some(x), Some(y)) = (self.eval(a)?, self.eval(b)?) else {
            return Ok(None);
        };
        if let (Value::Exact(p), Value::Exact(q)) = (&x, &y) {
            if self.exact_fits(p) && self.exact_fits(q) {
                return Ok(exact(p.clone(), q.clone()).and_then(|r| self.exact(r)));
            }
        }
        let (Some(fx), Some(fy)) = (x.to_f64(), y.to_f64()) else {
            return Ok(None);
        };
        let out = approx(fx, fy);
        let underflow = !may_cancel && out == 0.0 && fx != 0.0 && fy != 0.0;
        Ok((out.is_finite() && !underflow).then_some(Value::Approx(out)))
    }

    fn power(&self, a: &Expr, b: &Expr) -> EResult {
        let (Some(base), Some(exp)) = (self.eval(a)?, self.eval(b)?) else {
            return Ok(None);
        };
        if let (Value::Exact(x), Value::Exact(y)) = (&base, &exp) {
            if let Some(r) = self.exact_power(x, y) {
                return Ok(self.exact(r));
            }
        }
        let (Some(x), Some(y)) = (base.to_f64(), exp.to_f64()) else {
            return Ok(None);
        };
        let out = if x < 0.0 && y.fract() != 0.0 {
            odd_root_power(x, &exp)
        } else {
            Some(x.powf(y))
        };
        Ok(out
            .filter(|v| v.is_finite() && (*v != 0.0 || x == 0.0))
            .map(Value::Approx))
    }

    /// `x^y` exactly when `y = p/q` with a small `q` whose root of `x` is
    /// rational and the result fits the bit cap.
    fn exact_power(&self, x: &BigRational, y: &BigRational) -> Option<BigRational> {
        if x.is_zero() {
            return (!y.is_negative()).then(|| {
                if y.is_zero() {
                    BigRational::one()
                } else {
                    x.clone()
                }
            });
        }
        let q = y.denom().to_u32().filter(|q| *q <= MAX_EXACT_ROOT)?;
        let base = if q == 1 { x.clone() } else { exact_root(x, q)? };
        let p = y.numer();
        if base.abs().is_one() {
            let odd = p.is_odd();
            return Some(if base.is_negative() && odd {
                -BigRational::one()
            } else {
                BigRational::one()
            });
        }
        let base_bits = base.numer().bits() + base.denom().bits();
        let p_abs = p.abs().to_u64()?;
        if base_bits.checked_mul(p_abs)? > self.limits.max_bits.saturating_mul(2) {
            return None;
        }
        let p_i32 = p.to_i32()?;
        Some(num_traits::Pow::pow(&base, p_i32))
    }

    fn root(&self, n: &Expr, a: &Expr) -> EResult {
        let (Some(index), Some(x)) = (self.eval(n)?, self.eval(a)?) else {
            return Ok(None);
        };
        let index_int = match &index {
            Value::Exact(r) if r.is_integer() => r.numer().to_u32().filter(|k| *k >= 1),
            _ => None,
        };
        if let (Some(k), Value::Exact(r)) = (index_int, &x) {
            if k <= MAX_EXACT_ROOT {
                if let Some(root) = exact_root(r, k) {
                    return Ok(self.exact(root));
                }
            }
        }
        let (Some(k), Some(v)) = (index.to_f64(), x.to_f64()) else {
            return Ok(None);
        };
        let odd_int = index_int.is_some_and(|k| k % 2 == 1);
        let out = if v < 0.0 && odd_int {
            -(-v).powf(1.0 / k)
        } else {
            v.powf(1.0 / k)
        };
        Ok(out.is_finite().then_some(Value::Approx(out)))
    }

    fn small_natural(&self, e: &Expr) -> Result<Option<u64>, TimedOut> {
        Ok(match self.eval(e)? {
            Some(Value::Exact(r)) if r.is_integer() && !r.is_negative() => r.numer().to_u64(),
            _ => None,
        })
    }

    fn factorial(&self, a: &Expr) -> EResult {
        let Some(n) = self.small_natural(a)? else {
            return Ok(None);
        };
        if n > self.limits.max_factorial || factorial_bits(n) > self.limits.max_bits {
            return Ok(None);
        }
        let mut acc = BigInt::one();
        for i in 2..=n {
            if i % 64 == 0 {
                self.deadline.check()?;
            }
            acc *= i;
        }
        Ok(Some(Value::Exact(BigRational::from_integer(acc))))
    }

    fn binom(&self, n: &Expr, k: &Expr) -> EResult {
        let (Some(n), Some(k)) = (self.small_natural(n)?, self.small_natural(k)?) else {
            return Ok(None);
        };
        if k > n {
            return Ok(Some(Value::Exact(BigRational::zero())));
        }
        if n > self.limits.max_factorial {
            return Ok(None);
        }
        let k = k.min(n - k);
        let mut acc = BigInt::one();
        for i in 0..k {
            if i % 64 == 0 {
                self.deadline.check()?;
            }
            acc = acc * (n - i) / (i + 1);
        }
        Ok(Some(Value::Exact(BigRational::from_integer(acc))))
    }

    fn function(&self, f: Func, a: &Expr) -> EResult {
        let Some(x) = self.eval(a)? else {
            return Ok(None);
        };
        if let Value::Exact(r) = &x {
            match f {
                Func::Abs => return Ok(Some(Value::Exact(r.abs()))),
                Func::Ln if r.is_one() => return Ok(Some(Value::Exact(BigRational::zero()))),
                _ => {}
            }
        }
        let Some(v) = x.to_f64() else {
            return Ok(None);
        };
        let out = match f {
            Func::Sin => v.sin(),
            Func::Cos => v.cos(),
            Func::Tan => v.tan(),
            Func::Cot => 1.0 / v.tan(),
            Func::Sec => 1.0 / v.cos(),
            Func::Csc => 1.0 / v.sin(),
            Func::Asin => v.asin(),
            Func::Acos => v.acos(),
            Func::Atan => v.atan(),
            Func::Ln => v.ln(),
            Func::Exp => v.exp(),
            Func::Abs => v.abs(),
        };
        Ok(out.is_finite().then_some(Value::Approx(out)))
    }
}

fn negate(v: Value) -> Value {
    match v {
        Value::Exact(r) => Value::Exact(-r),
        Value::Approx(x) => Value::Approx(-x),
    }
}

fn exact_div(x: BigRational, y: BigRational) -> Option<BigRational> {
    (!y.is_zero()).then(|| x / y)
}

/// Upper bound on the bits of `n!` (Stirling: `n log2 n`).
fn factorial_bits(n: u64) -> u64 {
    let n_f = n as f64;
    (n_f * n_f.max(2.0).log2()).ceil() as u64 + 1
}

/// The exact `k`-th root of `r`, if rational.
fn exact_root(r: &BigRational, k: u32) -> Option<BigRational> {
    if k == 1 {
        return Some(r.clone());
    }
    if r.is_negative() {
        return (k % 2 == 1)
            .then(|| exact_root(&-r, k).map(|x| -x))
            .flatten();
    }
    let num = int_root(r.numer(), k)?;
    let den = int_root(r.denom(), k)?;
    Some(BigRational::new(num, den))
}

fn int_root(n: &BigInt, k: u32) -> Option<BigInt> {
    let root = n.nth_root(k);
    (num_traits::Pow::pow(&root, k) == *n).then_some(root)
}

/// `x^y` for negative `x` when `y` is a rational with odd denominator.
fn odd_root_power(x: f64, exp: &Value) -> Option<f64> {
    let Value::Exact(y) = exp else {
        return None;
    };
    if y.denom().is_even() {
        return None;
    }
    let magnitude = (-x).powf(y.to_f64()?);
    Some(if y.numer().is_odd() {
        -magnitude
    } else {
        magnitude
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::math::parse::parse_with as parse;
    use std::time::{Duration, Instant};

    fn eval(s: &str) -> Option<Value> {
        let deadline = Deadline::new(Instant::now() + Duration::from_secs(5));
        let e = parse(s, &deadline).ok()?;
        let ev = Evaluator {
            deadline: &deadline,
            limits: Limits {
                max_bits: 200_000,
                max_factorial: 10_000,
            },
            env: &[],
        };
        ev.eval(&e).ok().flatten()
    }

    fn rat(n: i64, d: i64) -> Option<Value> {
        Some(Value::Exact(BigRational::new(n.into(), d.into())))
    }

    #[test]
    fn exact_arithmetic() {
        assert_eq!(eval("1/2+1/3"), rat(5, 6));
        assert_eq!(eval("\\sqrt{8}/\\sqrt{2}"), Some(Value::Approx(2.0)));
        assert_eq!(eval("\\sqrt{16/9}"), rat(4, 3));
        assert_eq!(eval("8^{2/3}"), rat(4, 1));
        assert_eq!(eval("(-8)^{1/3}"), rat(-2, 1));
        assert_eq!(eval("2^{-2}"), rat(1, 4));
        assert_eq!(eval("5!"), rat(120, 1));
        assert_eq!(eval("\\binom{5}{2}"), rat(10, 1));
        assert_eq!(eval("\\sqrt[3]{-27}"), rat(-3, 1));
    }

    #[test]
    fn undefined_values() {
        assert_eq!(eval("1/0"), None);
        assert_eq!(eval("x+1"), None);
        assert_eq!(eval("(-1)^{1/2}"), None);
        assert_eq!(eval("(1/2)!"), None);
    }

    #[test]
    fn caps_prevent_blowup() {
        let start = Instant::now();
        assert_eq!(eval("2^{10^{9}}"), None);
        assert_eq!(eval("(10^{9})!"), None);
        assert!(eval("1^{10^{9}}").is_some());
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn huge_exact_values_do_not_underflow_to_equal_floats() {
        let Some(Value::Exact(r)) = eval("1/2004!") else {
            panic!("1/2004! should be exact");
        };
        assert_eq!(Value::Exact(r).to_f64(), None);
    }
}
