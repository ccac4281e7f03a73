//! Products against weight matrices packed once, at load, into the layout the micro-kernel
//! reads: the inference engine's projections.
//!
//! The `gemm` crate repacks its weight operand on every call (16% of a 32-sequence decode step
//! went to that copy) and takes f32 only, so each step streams 4 bytes per weight from memory.
//! Packed here once, a matrix is a run of panels of [`NR`] output rows interleaved along `k`:
//! the kernel reads each panel front to back, and the weights may be stored as f16 (half the
//! memory traffic, converted to f32 in registers by F16C) or as f32.
//!
//! **Arithmetic.** Every output is one fused multiply-add chain over `k` in order, starting
//! from zero: `acc = fma(w[k], x[k], acc)`. It depends on that row of `x` and that row of `W`
//! alone, never on how many rows are multiplied together or where a row falls in a tile, so a
//! product is batch-invariant by construction; the portable path computes the same chain with
//! `f32::mul_add` and gives the same bits.

use half::f16;
use rayon::prelude::*;

/// Output rows per panel: two 8-wide vectors.
pub const NR: usize = 16;
/// Activation rows per micro-tile (12 accumulators, two weight vectors and a broadcast fill
/// the 16 AVX registers).
const MR: usize = 6;
/// Activation rows per cache block: the block stays in L2 while every panel passes over it.
const MC: usize = 48;
/// The most activation rows a micro-tile of any packed format takes.
const MAX_MR: usize = 6;

/// One `k` step of a panel: the [`NR`] weights of its rows at that `k`, aligned so that the
/// kernel loads them as whole vectors.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct PanelRow<T>(pub [T; NR]);

/// An element type a panel may hold.
pub trait PanelElem: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// Rounds an f32 weight to this type.
    fn from_f32(v: f32) -> Self;
    /// The weight as f32 (exact).
    fn to_f32(self) -> f32;
    /// The row's two vectors of 8, as f32.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load(row: &PanelRow<Self>) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256);
}

impl PanelElem for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(row: &PanelRow<Self>) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        // By-value transmutes of an aligned row: plain vector loads, no copies.
        use std::arch::x86_64::__m256;
        use std::mem::transmute;
        let [a, b] = transmute::<[f32; NR], [[f32; 8]; 2]>(row.0);
        (
            transmute::<[f32; 8], __m256>(a),
            transmute::<[f32; 8], __m256>(b),
        )
    }
}

impl PanelElem for f16 {
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(row: &PanelRow<Self>) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        use std::arch::x86_64::*;
        let [a, b] = std::mem::transmute::<[f16; NR], [[f16; 8]; 2]>(row.0);
        (
            _mm256_cvtph_ps(std::mem::transmute::<[f16; 8], __m128i>(a)),
            _mm256_cvtph_ps(std::mem::transmute::<[f16; 8], __m128i>(b)),
        )
    }
}

/// An `(n, k)` row-major weight matrix packed into panels of [`NR`] rows: panel `p` is
/// `rows[p * k .. (p + 1) * k]`, its row `kk` holding the weights `(p * NR + i, kk)` for `i` in
/// `0..NR`. Rows past `n` in the last panel are zeros.
#[derive(Debug, Clone)]
pub struct Panels<T> {
    n: usize,
    k: usize,
    rows: Vec<PanelRow<T>>,
}

impl<T: PanelElem> Panels<T> {
    /// Packs `w`, `(n, k)` row-major, rounding each weight to `T`.
    pub fn pack(w: &[f32], k: usize) -> Self {
        assert!(
            k > 0 && w.len().is_multiple_of(k),
            "pack: {} is not rows of {k}",
            w.len()
        );
        let n = w.len() / k;
        let panels = n.div_ceil(NR);
        let mut rows = vec![PanelRow([T::from_f32(0.0); NR]); panels * k];
        rows.par_chunks_mut(k).enumerate().for_each(|(p, panel)| {
            for i in 0..NR.min(n - p * NR) {
                let src = &w[(p * NR + i) * k..(p * NR + i + 1) * k];
                for (row, &v) in panel.iter_mut().zip(src) {
                    row.0[i] = T::from_f32(v);
                }
            }
        });
        Self { n, k, rows }
    }

    /// Output rows.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<PanelRow<T>>() * self.rows.len()
    }

    /// The matrix back as `(n, k)` row-major (exact: the packed values widened to f32).
    pub fn unpack(&self) -> Vec<f32> {
        let k = self.k;
        let mut out = vec![0f32; self.n * k];
        out.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
            let panel = &self.rows[(r / NR) * k..(r / NR + 1) * k];
            for (v, pr) in row.iter_mut().zip(panel) {
                *v = pr.0[r % NR].to_f32();
            }
        });
        out
    }

    /// The weight at `(row, kk)`, as the kernel sees it.
    pub fn get(&self, row: usize, kk: usize) -> f32 {
        self.rows[(row / NR) * self.k + kk].0[row % NR].to_f32()
    }

    /// `y (m x n) = x (m x k) W^T`, plus `y` when `accumulate`, plus `bias`; `m` is
    /// `x.len() / k`. Each output is `(y +) dot + bias`, the dot computed as the module docs say.
    pub fn matmul(&self, x: &[f32], bias: Option<&[f32]>, y: &mut [f32], accumulate: bool) {
        let tile = tile_fn::<T>();
        drive(
            &self.rows,
            (self.n, self.k),
            MR,
            Operands {
                x,
                bias,
                y,
                accumulate,
            },
            |x, out| pack_rows(x, self.k, out),
            |w, x, rows, buf| tile(w, x, rows, buf.try_into().expect("a tile")),
        );
    }
}

/// The operands of a product against packed weights: `y (m x n) = x (m x k) W^T`, plus `y`
/// when `accumulate`, plus `bias`.
pub(crate) struct Operands<'a> {
    pub x: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub y: &'a mut [f32],
    pub accumulate: bool,
}

/// The loop every packed format shares. `w` holds the `(n, k)` matrix as panels of [`NR`]
/// rows, each the same number of items; `layout` lays out one cache block of [`MC`] activation
/// rows as tiles of `mr` rows, a tile holding as many items as a panel; then on the rayon pool
/// every panel runs against every tile through `tile(panel, tile, rows, out)`, which fills
/// `rows x NR` dots into `out`, and writes its own columns of `y`.
pub(crate) fn drive<W: Sync, X: Send + Sync>(
    w: &[W],
    (n, k): (usize, usize),
    mr: usize,
    ops: Operands<'_>,
    layout: impl Fn(&[f32], &mut Vec<X>),
    tile: impl Fn(&[W], &[X], usize, &mut [f32]) + Sync,
) {
    let Operands {
        x,
        bias,
        y,
        accumulate,
    } = ops;
    assert!(x.len().is_multiple_of(k), "matmul: x is not rows of {k}");
    let m = x.len() / k;
    assert_eq!(y.len(), m * n, "matmul: y is not {m} x {n}");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "matmul: bias is not {n} wide");
    }
    assert!(mr <= MAX_MR, "drive: tiles of {mr} rows");
    if m == 0 || n == 0 {
        return;
    }
    let per_panel = w.len() / n.div_ceil(NR);
    let out = OutPtr(y.as_mut_ptr());
    let mut xt = Vec::new();
    for m0 in (0..m).step_by(MC) {
        let mb = MC.min(m - m0);
        layout(&x[m0 * k..(m0 + mb) * k], &mut xt);
        let xt = &xt;
        w.par_chunks(per_panel).enumerate().for_each(|(p, w)| {
            let cols = NR.min(n - p * NR);
            let bias = bias.map(|b| &b[p * NR..p * NR + cols]);
            let mut buf = [0f32; MAX_MR * NR];
            let buf = &mut buf[..mr * NR];
            for (t, xtile) in xt.chunks(per_panel).enumerate() {
                let t0 = m0 + t * mr;
                let rows = mr.min(m0 + mb - t0);
                tile(w, xtile, rows, buf);
                for i in 0..rows {
                    // SAFETY: row `t0 + i < m` and columns `p * NR .. p * NR + cols` lie
                    // within `y`, and this panel is their only writer.
                    unsafe {
                        out.write(
                            (t0 + i) * n + p * NR,
                            &buf[i * NR..i * NR + cols],
                            bias,
                            accumulate,
                        )
                    };
                }
            }
        });
    }
}

/// Lays rows of `x` (width `k`) out as tiles of [`MR`] rows interleaved along `k`, the rows
/// past the end zeros: tile `t` is `out[t * k .. (t + 1) * k]`.
fn pack_rows(x: &[f32], k: usize, out: &mut Vec<[f32; MR]>) {
    let m = x.len() / k;
    out.clear();
    out.resize(m.div_ceil(MR) * k, [0.0; MR]);
    for (t, tile) in out.chunks_mut(k).enumerate() {
        for i in 0..MR.min(m - t * MR) {
            let src = &x[(t * MR + i) * k..(t * MR + i + 1) * k];
            for (dst, &v) in tile.iter_mut().zip(src) {
                dst[i] = v;
            }
        }
    }
}

/// The output buffer shared by the panel tasks, each writing its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint columns of the buffer (see `Panels::matmul`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// Stores `dots` at `start..start + dots.len()`: `(y +) dot + bias`, as [`Panels::matmul`]
    /// documents.
    ///
    /// # Safety
    /// The range lies within the buffer and no other thread touches it meanwhile.
    unsafe fn write(self, start: usize, dots: &[f32], bias: Option<&[f32]>, accumulate: bool) {
        // SAFETY: the caller's contract.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.0.add(start), dots.len()) };
        match (accumulate, bias) {
            (false, None) => dst.copy_from_slice(dots),
            (false, Some(b)) => {
                for ((d, v), b) in dst.iter_mut().zip(dots).zip(b) {
                    *d = v + b;
                }
            }
            (true, None) => {
                for (d, v) in dst.iter_mut().zip(dots) {
                    *d += v;
                }
            }
            (true, Some(b)) => {
                for ((d, v), b) in dst.iter_mut().zip(dots).zip(b) {
                    *d = (*d + v) + b;
                }
            }
        }
    }
}

/// A micro-tile: the first `rows <= MR` rows of a packed tile against one panel, into `out`
/// (`rows x NR`).
type TileFn<T> = fn(&[PanelRow<T>], &[[f32; MR]], usize, &mut [f32; MR * NR]);

/// The fastest tile this CPU runs, chosen once per call (the check is a cached load).
fn tile_fn<T: PanelElem>() -> TileFn<T> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        return tile_avx2::<T>;
    }
    tile_portable::<T>
}

/// The portable tile: the same fused chains as the vector one, so the same bits.
pub(crate) fn tile_portable<T: PanelElem>(
    w: &[PanelRow<T>],
    x: &[[f32; MR]],
    rows: usize,
    out: &mut [f32; MR * NR],
) {
    for i in 0..rows {
        let acc = &mut out[i * NR..(i + 1) * NR];
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (wr, xr) in w.iter().zip(x) {
            for (a, wv) in acc.iter_mut().zip(&wr.0) {
                *a = wv.to_f32().mul_add(xr[i], *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn tile_avx2<T: PanelElem>(
    w: &[PanelRow<T>],
    x: &[[f32; MR]],
    rows: usize,
    out: &mut [f32; MR * NR],
) {
    assert_eq!(w.len(), x.len());
    // SAFETY: `tile_fn` picked this path only where the CPU has AVX2, FMA and F16C.
    unsafe {
        match rows {
            1 => tile_rows::<T, 1>(w, x, out),
            2 => tile_rows::<T, 2>(w, x, out),
            3 => tile_rows::<T, 3>(w, x, out),
            4 => tile_rows::<T, 4>(w, x, out),
            5 => tile_rows::<T, 5>(w, x, out),
            _ => tile_rows::<T, MR>(w, x, out),
        }
    }
}

/// `R` rows against one panel: per `k` step, two weight vectors and `R` broadcasts feed
/// `2 R` fused multiply-adds.
///
/// # Safety
/// AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_rows<T: PanelElem, const R: usize>(
    w: &[PanelRow<T>],
    x: &[[f32; MR]],
    out: &mut [f32; MR * NR],
) {
    use std::arch::x86_64::*;
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    for (wr, xr) in w.iter().zip(x) {
        let (w0, w1) = T::load(wr);
        for r in 0..R {
            let xv = _mm256_set1_ps(xr[r]);
            lo[r] = _mm256_fmadd_ps(w0, xv, lo[r]);
            hi[r] = _mm256_fmadd_ps(w1, xv, hi[r]);
        }
    }
    for r in 0..R {
        let (a, b) = (
            std::mem::transmute::<__m256, [f32; 8]>(lo[r]),
            std::mem::transmute::<__m256, [f32; 8]>(hi[r]),
        );
        out[r * NR..r * NR + 8].copy_from_slice(&a);
        out[r * NR + 8..r * NR + NR].copy_from_slice(&b);
    }
}

/// `len` values uniform in `[-1, 1)`, the same for the same `seed`: operands for kernel tests.
#[cfg(test)]
pub(crate) fn uniform(len: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Checks a product of `(n, k)` weights against `reference` for batches of each size in `ms`
/// (operands seeded from `seed`), and that each row alone gives the bits it gets in a batch.
#[cfg(test)]
pub(crate) fn check_rows(
    (n, k): (usize, usize),
    ms: &[usize],
    seed: u64,
    matmul: impl Fn(&[f32], &mut [f32]),
    reference: impl Fn(&[f32]) -> Vec<f32>,
) {
    for &m in ms {
        let x = uniform(m * k, m as u64 + seed);
        let mut y = vec![0f32; m * n];
        matmul(&x, &mut y);
        assert_eq!(y, reference(&x), "m = {m}");
        for i in [0, m / 2, m - 1] {
            let mut one = vec![0f32; n];
            matmul(&x[i * k..(i + 1) * k], &mut one);
            assert_eq!(one, y[i * n..(i + 1) * n], "row {i} of {m}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each output as one fused chain over the packed weights, row by row.
    fn reference<T: PanelElem>(p: &Panels<T>, x: &[f32]) -> Vec<f32> {
        let (n, k) = (p.n(), p.k());
        let m = x.len() / k;
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f32;
                for kk in 0..k {
                    acc = p.get(j, kk).mul_add(x[i * k + kk], acc);
                }
                y[i * n + j] = acc;
            }
        }
        y
    }

    fn check<T: PanelElem>() {
        // n not a multiple of NR, m spanning several tiles and a cache block.
        let (n, k) = (37, 29);
        let w = uniform(n * k, 1);
        let p = Panels::<T>::pack(&w, k);
        check_rows(
            (n, k),
            &[1, 5, 6, 7, 50, 97],
            7,
            |x, y| p.matmul(x, None, y, false),
            |x| reference(&p, x),
        );
    }

    #[test]
    fn panels_match_a_fused_chain_per_output_and_are_batch_invariant() {
        check::<f32>();
        check::<f16>();
    }

    #[test]
    fn empty_products_write_nothing() {
        let x = uniform(2 * 32, 12);
        Panels::<f16>::pack(&[], 32).matmul(&x, None, &mut [], false);
        crate::kernels::qpanel::QPanels::quantize(&[], 32).matmul(&x, None, &mut [], false);
        let mut y = vec![0f32; 0];
        Panels::<f32>::pack(&uniform(3 * 32, 13), 32).matmul(&[], None, &mut y, false);
        assert!(y.is_empty());
    }

    #[test]
    fn accumulate_and_bias_add_after_the_dot() {
        let (n, k, m) = (20, 8, 3);
        let w = uniform(n * k, 3);
        let x = uniform(m * k, 4);
        let bias = uniform(n, 5);
        let p = Panels::<f32>::pack(&w, k);
        let dots = reference(&p, &x);
        let prior = uniform(m * n, 6);
        let mut y = prior.clone();
        p.matmul(&x, Some(&bias), &mut y, true);
        for i in 0..m * n {
            assert_eq!(y[i], prior[i] + dots[i] + bias[i % n]);
        }
    }

    #[test]
    fn f32_panels_agree_with_a_plain_product_and_f16_rounds_the_weights() {
        let (n, k, m) = (33, 64, 4);
        let w = uniform(n * k, 8);
        let x = uniform(m * k, 9);
        let mut y32 = vec![0f32; m * n];
        let mut y16 = vec![0f32; m * n];
        Panels::<f32>::pack(&w, k).matmul(&x, None, &mut y32, false);
        Panels::<f16>::pack(&w, k).matmul(&x, None, &mut y16, false);
        for i in 0..m {
            for j in 0..n {
                let plain: f64 = (0..k)
                    .map(|kk| w[j * k + kk] as f64 * x[i * k + kk] as f64)
                    .sum();
                assert!((y32[i * n + j] as f64 - plain).abs() < 1e-5);
                // f16 keeps 11 significant bits: |error| <= sum |w x| * 2^-11.
                let bound: f64 = (0..k)
                    .map(|kk| (w[j * k + kk] as f64 * x[i * k + kk] as f64).abs())
                    .sum::<f64>()
                    * 2f64.powi(-11)
                    + 1e-5;
                assert!((y16[i * n + j] as f64 - plain).abs() <= bound);
            }
        }
    }

    #[test]
    fn the_vector_tile_gives_the_portable_tiles_bits() {
        let k = 45;
        let w = uniform(NR * k, 10);
        let p = Panels::<f16>::pack(&w, k);
        let mut x = Vec::new();
        pack_rows(&uniform(MR * k, 11), k, &mut x);
        for rows in 1..=MR {
            let mut a = [0f32; MR * NR];
            let mut b = [0f32; MR * NR];
            tile_portable(&p.rows, &x, rows, &mut a);
            tile_fn::<f16>()(&p.rows, &x, rows, &mut b);
            assert_eq!(a[..rows * NR], b[..rows * NR], "rows = {rows}");
        }
    }
}
