//! Row-major f32 GEMM with BLAS semantics on raw slices, over the `gemm` crate (the kernels
//! candle itself uses, here with their AVX-512 variants compiled in).
//!
//! The training ops call this directly instead of going through `Tensor::matmul`: no copy of
//! the operands into tensors and back, `alpha`/`beta` fold a scale and an accumulation into
//! the product, and leading dimensions let attention address one head inside a
//! `(batch, seq, heads, head_dim)` buffer without transposing it first.
//!
//! `C (m x n) = alpha * op(A) op(B) + beta * C`, everything row-major:
//! `op(A)` is `m x k` (`A` stored `m x k`, or `k x m` when `trans_a`), `op(B)` is `k x n`
//! (`B` stored `k x n`, or `n x k` when `trans_b`). With `beta == 0` `C` is not read.

/// One operand: its data, row stride and whether it is stored transposed.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    /// Elements, starting at the operand's first element.
    pub data: &'a [f32],
    /// Row stride of the stored matrix.
    pub ld: usize,
    /// Whether the stored matrix is the transpose of the operand.
    pub trans: bool,
}

impl<'a> Mat<'a> {
    /// A densely stored `rows x cols` matrix (row stride `cols`).
    pub fn new(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            ld: cols,
            trans: false,
        }
    }

    /// The same storage used as its transpose.
    pub fn t(self) -> Self {
        Self {
            trans: !self.trans,
            ..self
        }
    }
}

fn needed(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    }
}

/// Panics unless `a` and `b` hold an `m x k` and a `k x n` operand with their strides.
fn check_operands(m: usize, n: usize, k: usize, a: &Mat<'_>, b: &Mat<'_>) {
    let (ar, ac) = if a.trans { (k, m) } else { (m, k) };
    let (br, bc) = if b.trans { (n, k) } else { (k, n) };
    assert!(
        a.ld >= ac.max(1) && b.ld >= bc.max(1),
        "sgemm: leading dimension too small"
    );
    assert!(a.data.len() >= needed(ar, ac, a.ld), "sgemm: A too short");
    assert!(b.data.len() >= needed(br, bc, b.ld), "sgemm: B too short");
}

/// `c = alpha * op(a) op(b) + beta * c` for an `m x n` result with row stride `ldc`, on
/// `threads` threads of the rayon pool (1: the calling thread only).
///
/// # Panics
/// When a slice is too short for its shape and stride (a bug in the caller, never input).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat<'_>,
    b: Mat<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
    threads: usize,
) {
    check_operands(m, n, k, &a, &b);
    assert!(
        ldc >= n.max(1) && c.len() >= needed(m, n, ldc),
        "sgemm: C too short"
    );
    // SAFETY: the bounds were checked above; `c` is borrowed mutably and so cannot alias.
    unsafe {
        sgemm_raw(
            m,
            n,
            k,
            alpha,
            (a.data.as_ptr(), a.ld, a.trans),
            (b.data.as_ptr(), b.ld, b.trans),
            beta,
            c.as_mut_ptr(),
            ldc,
            threads,
        )
    }
}

/// `op(a) op(b) * alpha` as a new `m x n` buffer, written by the GEMM without zeroing it first
/// (a fresh output buffer per call would otherwise be cleared once by `calloc` and again by
/// the product).
///
/// # Panics
/// When a slice is too short for its shape and stride (a bug in the caller, never input).
pub fn sgemm_new(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat<'_>,
    b: Mat<'_>,
    threads: usize,
) -> Vec<f32> {
    check_operands(m, n, k, &a, &b);
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: with beta 0 every element of the m x n output is written and none is read; the
    // operand bounds were checked above; `set_len` follows the complete write.
    unsafe {
        sgemm_raw(
            m,
            n,
            k,
            alpha,
            (a.data.as_ptr(), a.ld, a.trans),
            (b.data.as_ptr(), b.ld, b.trans),
            0.0,
            c.as_mut_ptr(),
            n.max(1),
            threads,
        );
        c.set_len(m * n);
    }
    c
}

/// A buffer of `n` values each written exactly once by `fill`, which gets disjoint chunks of
/// `chunk` values (the last may be shorter) with their index, on the rayon pool; no zeroing
/// pass first.
///
/// Crate-private: a `fill` that skips an element leaves it uninitialised, so every caller is
/// one of this crate's kernels, each writing its whole chunk.
pub(crate) fn par_filled(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut v: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(n) };
    v.par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `fill` wrote every element (its contract); MaybeUninit<f32> has f32's layout.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// [`sgemm`] on raw pointers, for parallel tasks that each write a disjoint block of one
/// output buffer (attention heads) without holding overlapping `&mut` slices.
///
/// # Safety
/// Every element addressed through the pointers, shapes and strides must be valid, and no
/// other thread may access the addressed elements of `c` during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_raw(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: (*const f32, usize, bool),
    b: (*const f32, usize, bool),
    beta: f32,
    c: *mut f32,
    ldc: usize,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let p = c.add(i * ldc + j);
                *p = if beta == 0.0 { 0.0 } else { *p * beta };
            }
        }
        return;
    }
    let (a_ptr, lda, ta) = a;
    let (b_ptr, ldb, tb) = b;
    let (a_rs, a_cs) = if ta {
        (1, lda as isize)
    } else {
        (lda as isize, 1)
    };
    let (b_rs, b_cs) = if tb {
        (1, ldb as isize)
    } else {
        (ldb as isize, 1)
    };
    let read_dst = beta != 0.0;
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // gemm computes `dst = alpha * dst + beta * lhs * rhs`: its alpha is BLAS's beta.
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        read_dst,
        a_ptr,
        a_cs,
        a_rs,
        b_ptr,
        b_cs,
        b_rs,
        if read_dst { beta } else { 0.0 },
        alpha,
        false,
        false,
        false,
        parallelism,
    )
}

/// Threads for one large product: the whole rayon pool.
pub fn pool_threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Mat<'_>,
        b: Mat<'_>,
        beta: f32,
        c: &mut [f32],
        ldc: usize,
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if a.trans {
                        a.data[p * a.ld + i]
                    } else {
                        a.data[i * a.ld + p]
                    };
                    let bv = if b.trans {
                        b.data[j * b.ld + p]
                    } else {
                        b.data[p * b.ld + j]
                    };
                    s += f64::from(av) * f64::from(bv);
                }
                let old = if beta == 0.0 {
                    0.0
                } else {
                    beta * c[i * ldc + j]
                };
                c[i * ldc + j] = alpha * s as f32 + old;
            }
        }
    }

    fn rnd(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Every transpose combination, padded strides, alpha/beta, odd and empty sizes, one and
    /// two threads: equal to a float64 reference, padding untouched, `C` unread at beta 0.
    #[test]
    fn matches_reference() {
        let mut seed = 1;
        let shapes = [
            (37, 19, 23),
            (64, 16, 96),
            (16, 96, 64),
            (128, 96, 16),
            (1, 7, 5),
            (5, 1, 9),
            (33, 65, 0),
        ];
        for &(m, n, k) in &shapes {
            for ta in [false, true] {
                for tb in [false, true] {
                    for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, 1.0), (2.0, -0.5)] {
                        let (ar, ac) = if ta { (k, m) } else { (m, k) };
                        let (br, bc) = if tb { (n, k) } else { (k, n) };
                        let (lda, ldb, ldc) = (ac + 3, bc + 1, n + 2);
                        let av = rnd(ar.max(1) * lda, &mut seed);
                        let bv = rnd(br.max(1) * ldb, &mut seed);
                        let c0 = rnd(m * ldc, &mut seed);
                        let a = Mat {
                            data: &av,
                            ld: lda,
                            trans: ta,
                        };
                        let b = Mat {
                            data: &bv,
                            ld: ldb,
                            trans: tb,
                        };
                        let mut want = c0.clone();
                        reference(m, n, k, alpha, a, b, beta, &mut want, ldc);
                        for threads in [1, 2] {
                            let mut got = c0.clone();
                            if beta == 0.0 {
                                for i in 0..m {
                                    got[i * ldc..i * ldc + n].fill(f32::NAN);
                                }
                            }
                            sgemm(m, n, k, alpha, a, b, beta, &mut got, ldc, threads);
                            for i in 0..m {
                                for j in 0..ldc {
                                    let (g, w) = (got[i * ldc + j], want[i * ldc + j]);
                                    if j >= n {
                                        assert_eq!(g.to_bits(), c0[i * ldc + j].to_bits());
                                    } else {
                                        assert!(
                                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                            "{m}x{n}x{k} ta={ta} tb={tb}: {g} vs {w}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
