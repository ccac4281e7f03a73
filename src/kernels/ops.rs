//! CPU kernels on raw f32 buffers for the fused decoder layer (`layer_op`), and RMSNorm as
//! a graph node of its own.
//!
//! candle's autograd keeps every intermediate tensor of the forward pass alive until the
//! backward pass and, for a matrix product, always computes the gradient of both operands.
//! For LoRA training most of that is wasted: base weights are frozen, so their gradients are
//! never needed, and attention/normalisation can be recomputed cheaply from their inputs. The
//! kernels here work on the raw buffers: products are [`sgemm`] calls (no copy of operands
//! into tensors, scales and sums folded into `alpha`/`beta`), element-wise loops run on the
//! rayon pool with a vectorised `exp`, and attention runs one kv head and block of queries
//! per task on the `(batch, seq, heads, head_dim)` layout (or q/k/v side by side in one
//! row), skipping keys the mask hides and never materialising the `(batch, heads, seq,
//! seq)` scores. The tests check each kernel against candle's autograd.
//!
//! RMSNorm is a [`candle_core::CustomOp1`] whose node keeps only its input and whose backward
//! pass is written out; its weight is captured in the op, so autograd never sees it. Other
//! dtypes and devices use plain candle operations.

use super::gemm::{par_filled, sgemm, sgemm_new, sgemm_raw, Mat};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;
use std::sync::Arc;

/// The f32 elements of a contiguous CPU storage region.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => bail!("fused op: non-contiguous input"),
        _ => bail!("fused op: f32 input required"),
    }
}

/// Runs `f` on the contiguous f32 CPU data of `t` (copied only when `t` is a strided view).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok(f(f32_slice(s, layout)?)),
        _ => bail!("fused op: CPU tensor required"),
    }
}

pub(crate) fn f32_storage(v: Vec<f32>, shape: impl Into<Shape>) -> (CpuStorage, Shape) {
    (CpuStorage::F32(v), shape.into())
}

/// Whether the fused f32 CPU path applies to all of `ts`.
pub(crate) fn fused_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Element-wise loops run on the rayon pool in chunks of this many values.
pub(crate) const CHUNK: usize = 1 << 14;

/// `e^x` in straight-line f32 arithmetic that the compiler vectorizes (libm's `expf` is a
/// call per element, a tenth of a training step in attention, SwiGLU and the loss).
/// Cephes' range reduction and polynomial: within 2 ulp of `expf` for `x` in
/// `[ln(f32::MIN_POSITIVE), 88]`; exactly 0 below (so masked `-inf` scores give 0 and no
/// subnormal ever reaches a GEMM) and `+inf` above 88 (`e^88` is within a factor 1.3 of
/// `f32::MAX`; no caller gets near it).
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.0;
    let c = x.clamp(LO, HI);
    let n = (c * LOG2E + 0.5).floor();
    let r = c - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n through the exponent bits: n is an integer in [-126, 127] after the clamp. Adding
    // 1.5 * 2^23 puts n in the low mantissa bits of `t` exactly (no float-to-int conversion,
    // whose saturating semantics would not vectorize); the shift keeps the low 9 bits of
    // `bits(t) + 127`, which are n + 127, as the biased exponent.
    const MAGIC: f32 = 12_582_912.0;
    let t = n + MAGIC;
    let two_n = f32::from_bits(t.to_bits().wrapping_add(127).wrapping_shl(23));
    let y = e * two_n;
    let y = if x < LO { 0.0 } else { y };
    if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// Lanes of the manual reductions below (one AVX-512 register of f32).
const LANES: usize = 16;

/// `sum_i a_i b_i`, accumulated in `LANES` independent partial sums so that the compiler
/// vectorizes it (a plain iterator sum is one sequential chain of scalar adds).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    tail + acc.iter().sum::<f32>()
}

/// Maximum of `xs` (NaN-free input), in a form the compiler vectorizes.
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = if *v > *a { *v } else { *a };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// `row = exp(row - shift)` in place (probabilities from a saved log-sum-exp).
fn exp_shifted(row: &mut [f32], shift: f32) {
    for v in row.iter_mut() {
        *v = fast_exp(*v - shift);
    }
}

/// `row = softmax(row)` in place; returns `(max, sum of exp(row - max))`.
pub(crate) fn softmax_in_place(row: &mut [f32]) -> (f32, f32) {
    softmax_scaled(row, 1.0)
}

/// `row = k * softmax(row)` in place (a scale folded into the normalisation pass); returns
/// `(max, sum of exp(row - max))`.
pub(crate) fn softmax_scaled(row: &mut [f32], k: f32) -> (f32, f32) {
    let max = max_of(row);
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = fast_exp(*v - max);
            *a += *v;
        }
    }
    let mut z: f32 = 0.0;
    for v in chunks.into_remainder() {
        *v = fast_exp(*v - max);
        z += *v;
    }
    let z = z + acc.iter().sum::<f32>();
    let iz = k / z;
    row.iter_mut().for_each(|v| *v *= iz);
    (max, z)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm.
// ---------------------------------------------------------------------------------------------

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension, f32 only, `w` frozen.
struct RmsNormOp {
    w: Arc<Vec<f32>>,
    eps: f32,
}

/// `1 / sqrt(mean(row^2) + eps)`.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = dot(row, row) / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// One row of RMSNorm, `y = x / rms(x) * w`, written through `out(i, y_i)`.
#[inline]
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, mut out: impl FnMut(usize, f32)) {
    let r = inv_rms(x, eps);
    for (i, (v, w)) in x.iter().zip(w).enumerate() {
        out(i, v * r * w);
    }
}

/// One row of the RMSNorm backward pass for the output gradient `g`, `dx_i` passed to
/// `out(i, dx_i)` (to be stored or added).
#[inline]
fn rms_norm_grad_row(x: &[f32], g: &[f32], w: &[f32], eps: f32, mut out: impl FnMut(usize, f32)) {
    let r = inv_rms(x, eps);
    // sum_i x_i g_i w_i in lanes, as in `dot`.
    let mut acc = [0f32; LANES];
    let (cx, cg, cw) = (
        x.chunks_exact(LANES),
        g.chunks_exact(LANES),
        w.chunks_exact(LANES),
    );
    let tail: f32 = (cx
        .remainder()
        .iter()
        .zip(cg.remainder())
        .zip(cw.remainder()))
    .map(|((x, g), w)| x * g * w)
    .sum();
    for ((x, g), w) in cx.zip(cg).zip(cw) {
        for (((s, x), g), w) in acc.iter_mut().zip(x).zip(g).zip(w) {
            *s += x * g * w;
        }
    }
    let xgw = tail + acc.iter().sum::<f32>();
    let c = r * r * r * xgw / x.len() as f32;
    for (i, ((x, g), w)) in x.iter().zip(g).zip(w).enumerate() {
        out(i, r * g * w - c * x);
    }
}

/// RMSNorm of every row of `x` (row length `w.len()`), on the rayon pool.
pub(crate) fn norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let step = n * (CHUNK / n).max(1);
    par_filled(x.len(), step, |i, yc| {
        let xc = &x[i * step..i * step + yc.len()];
        for (yr, xr) in yc.chunks_mut(n).zip(xc.chunks(n)) {
            rms_norm_row(xr, w, eps, |j, v| {
                yr[j].write(v);
            });
        }
    })
}

/// `dx += d norm(x) / dx * g` for every row.
pub(crate) fn norm_grad_add(x: &[f32], g: &[f32], w: &[f32], eps: f32, dx: &mut [f32]) {
    let n = w.len();
    let step = n * (CHUNK / n).max(1);
    dx.par_chunks_mut(step)
        .zip(x.par_chunks(step))
        .zip(g.par_chunks(step))
        .for_each(|((dc, xc), gc)| {
            for ((dr, xr), gr) in dc.chunks_mut(n).zip(xc.chunks(n)).zip(gc.chunks(n)) {
                rms_norm_grad_row(xr, gr, w, eps, |j, v| dr[j] += v);
            }
        });
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = norm_rows(f32_slice(s, l)?, &self.w, self.eps);
        Ok(f32_storage(y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(x, |xv| {
            with_f32(g, |gv| {
                let mut dx = vec![0f32; xv.len()];
                norm_grad_add(xv, gv, &self.w, self.eps, &mut dx);
                dx
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Fused RMSNorm for f32 CPU tensors; `None` when not applicable.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !fused_f32(&[x, w]) {
        return Ok(None);
    }
    let op = RmsNormOp {
        w: Arc::new(w.flatten_all()?.to_vec1::<f32>()?),
        eps: eps as f32,
    };
    if x.dim(D::Minus1)? != op.w.len() {
        bail!(
            "rms_norm: weight of {} for input {:?}",
            op.w.len(),
            x.dims()
        );
    }
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding.
// ---------------------------------------------------------------------------------------------

/// Rotates the first `heads` heads of every row of `x` (row stride `ld`, one row per
/// position, the last row possibly cut after its heads) in place with per-position
/// `(rows, half)` tables; `inverse` applies the transpose (the backward pass).
pub(crate) fn rope_rows(
    x: &mut [f32],
    ld: usize,
    heads: usize,
    half: usize,
    (cos, sin): (&[f32], &[f32]),
    inverse: bool,
) {
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(ld).enumerate().for_each(|(pos, chunk)| {
        let c = &cos[pos * half..(pos + 1) * half];
        let s = &sin[pos * half..(pos + 1) * half];
        for head in chunk[..heads * 2 * half].chunks_mut(2 * half) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                let si = sign * s[i];
                x1[i] = a * c[i] - b * si;
                x2[i] = b * c[i] + a * si;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Attention.
// ---------------------------------------------------------------------------------------------

/// Query rows per attention task.
const QUERY_BLOCK: usize = 32;

/// `softmax(q k^T * scale) v` over each query row's allowed keys, with grouped-query heads on
/// `(batch, seq, heads, head_dim)` inputs (`k`/`v` with `heads / n_rep` heads); output in the
/// same layout. The probabilities are recomputed in the backward pass instead of being kept.
///
/// Which keys a row sees is one contiguous run per row (causal attention within its packed
/// sample, see [`crate::model::Packing`]): `b * t` pairs, never a `(b, t, t)` mask.
///
/// The query and key/value buffers may have wider rows than their heads (`Dims::ldq`,
/// `Dims::ldkv`), so that a fused q/k/v projection output is read in place.
#[derive(Clone)]
pub(crate) struct AttentionOp {
    /// Per (batch, query block): no row of the block sees a key at or past this column.
    key_end: Arc<Vec<usize>>,
    /// Per (batch, query row): the keys `lo..hi` the row attends to. The softmax skips the
    /// others instead of adding `-inf` to them.
    spans: Arc<Vec<(u32, u32)>>,
    scale: f32,
    /// Sizes, fixed when the op is built (the inputs may be 3-D or 4-D views of them).
    dims: Dims,
}

/// Sizes of one attention call.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub nkv: usize,
    pub d: usize,
    /// Row stride of the query buffer (and of dQ): `nh * d` when it holds the queries alone.
    pub ldq: usize,
    /// Row stride of the key and value buffers (and of dK, dV).
    pub ldkv: usize,
}

impl Dims {
    /// Dense buffers: queries `(b, t, nh * d)`, keys and values `(b, t, nkv * d)`.
    pub fn dense(b: usize, t: usize, nh: usize, nkv: usize, d: usize) -> Self {
        Self {
            b,
            t,
            nh,
            nkv,
            d,
            ldq: nh * d,
            ldkv: nkv * d,
        }
    }

    /// Row stride of the output and of its gradient (always dense).
    fn ldo(&self) -> usize {
        self.nh * self.d
    }

    fn blocks(&self) -> usize {
        self.t.div_ceil(QUERY_BLOCK)
    }

    /// Query rows `r0..r1` of block `blk`.
    fn rows(&self, blk: usize) -> (usize, usize) {
        (blk * QUERY_BLOCK, ((blk + 1) * QUERY_BLOCK).min(self.t))
    }

    /// Offset of (batch `bi`, row `r`, query head `h`) in a buffer of row stride `ld`.
    fn head_at(&self, ld: usize, bi: usize, r: usize, h: usize) -> usize {
        (bi * self.t + r) * ld + h * self.d
    }

    /// Offset of (batch `bi`, row 0, kv head `kh`) in a key/value buffer.
    fn kv_at(&self, bi: usize, kh: usize) -> usize {
        bi * self.t * self.ldkv + kh * self.d
    }
}

/// A buffer written by several rayon tasks, each to its own disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub *mut f32);
// SAFETY: only used to hand disjoint output regions to parallel tasks (see the callers).
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    /// The buffer's start. A method rather than the field, so that closures capture the
    /// whole `Send` wrapper and not the raw pointer inside it.
    pub fn ptr(&self) -> *mut f32 {
        self.0
    }
}

impl AttentionOp {
    /// Copies rows `r0..r1` of the `rep` query heads sharing kv head `kh` (batch `bi`) from a
    /// query-layout buffer of row stride `ld` into `dst` as one `(rep * rows, d)` matrix,
    /// head-major, so the heads of a group share each product with their keys and values.
    #[allow(clippy::too_many_arguments)]
    fn gather(
        &self,
        dm: &Dims,
        src: &[f32],
        ld: usize,
        bi: usize,
        kh: usize,
        (r0, r1): (usize, usize),
        dst: &mut [f32],
    ) {
        let (rep, d, rows) = (dm.nh / dm.nkv, dm.d, r1 - r0);
        for j in 0..rep {
            for i in 0..rows {
                let from = dm.head_at(ld, bi, r0 + i, kh * rep + j);
                dst[(j * rows + i) * d..(j * rows + i + 1) * d]
                    .copy_from_slice(&src[from..from + d]);
            }
        }
    }

    /// Writes a gathered `(rep * rows, d)` matrix back to its rows of a query-layout buffer
    /// of row stride `ld`.
    ///
    /// # Safety
    /// `dst` must point to a query-layout buffer of `dm`'s size and stride `ld`, whose rows
    /// `r0..r1` of the heads of group `kh` no other thread accesses during the call.
    #[allow(clippy::too_many_arguments)]
    unsafe fn scatter(
        &self,
        dm: &Dims,
        src: &[f32],
        ld: usize,
        bi: usize,
        kh: usize,
        (r0, r1): (usize, usize),
        dst: Shared,
    ) {
        let (rep, d, rows) = (dm.nh / dm.nkv, dm.d, r1 - r0);
        for j in 0..rep {
            for i in 0..rows {
                let to = dm.head_at(ld, bi, r0 + i, kh * rep + j);
                let row = &src[(j * rows + i) * d..(j * rows + i + 1) * d];
                std::ptr::copy_nonoverlapping(row.as_ptr(), dst.ptr().add(to), d);
            }
        }
    }

    /// Probabilities of the gathered queries `qs` (`(rep * rows, d)`, see [`Self::gather`])
    /// of batch `bi` and kv head `kh` over keys `0..ke`, written to `p` (row stride `ke`).
    ///
    /// Without `lse` the rows are normalised here and each row's log-sum-exp is passed to
    /// `keep(idx, lse)` (row `idx` of the gathered matrix); with the forward pass's `lse`
    /// (indexed like [`Self::lse_at`]) each probability is one `exp(s - lse)`.
    #[allow(clippy::too_many_arguments)]
    fn probs(
        &self,
        dm: &Dims,
        qs: &[f32],
        k: &[f32],
        (bi, kh): (usize, usize),
        (r0, r1): (usize, usize),
        ke: usize,
        p: &mut [f32],
        lse: Option<&[f32]>,
        mut keep: impl FnMut(usize, f32),
    ) {
        let (t, d, rows, rep) = (dm.t, dm.d, r1 - r0, dm.nh / dm.nkv);
        let n = rep * rows;
        let km = Mat {
            data: &k[dm.kv_at(bi, kh)..],
            ld: dm.ldkv,
            trans: true,
        };
        sgemm(n, ke, d, self.scale, Mat::new(qs, d), km, 0.0, p, ke, 1);
        for (idx, row) in p[..n * ke].chunks_mut(ke).enumerate() {
            let r = r0 + idx % rows;
            let at = self.lse_at(dm, bi, kh * rep + idx / rows, r);
            let (lo, hi) = self.spans[bi * t + r];
            let (lo, hi) = ((lo as usize).min(ke), (hi as usize).min(ke));
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            let live = &mut row[lo..hi];
            match lse {
                Some(l) => exp_shifted(live, l[at]),
                None => {
                    let (max, z) = softmax_in_place(live);
                    keep(idx, max + z.ln());
                }
            }
        }
    }

    /// Index of (batch `bi`, query head `h`, row `r`) in a log-sum-exp buffer
    /// `(b, nh, t)`.
    fn lse_at(&self, dm: &Dims, bi: usize, h: usize, r: usize) -> usize {
        (bi * dm.nh + h) * dm.t + r
    }

    /// The attention output `(b, t, nh * d)` for queries, keys and values laid out as `dm`
    /// says (`k` and `v` start at their first head, and may be slices of one buffer), and
    /// the log-sum-exp of every score row `(b, nh, t)`, which spares the backward pass the
    /// max and normalisation passes of its softmax.
    pub fn forward(&self, dm: &Dims, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (nkv, d) = (dm.nkv, dm.d);
        let rep = dm.nh / nkv;
        let nb = dm.blocks();
        // Every (batch, head, query row) is written once, by the task of its block: the
        // buffers need no zeroing.
        let len = dm.b * dm.t * dm.nh * d;
        let mut o: Vec<f32> = Vec::with_capacity(len);
        let out = Shared(o.as_mut_ptr());
        let lse_len = dm.b * dm.nh * dm.t;
        let mut lse: Vec<f32> = Vec::with_capacity(lse_len);
        let lse_out = Shared(lse.as_mut_ptr());
        (0..dm.b * nkv * nb).into_par_iter().for_each(|task| {
            let (bi, kh, blk) = (task / (nkv * nb), (task / nb) % nkv, task % nb);
            let rows = dm.rows(blk);
            let n = rep * (rows.1 - rows.0);
            let ke = self.key_end[bi * nb + blk];
            let mut qs = vec![0f32; n * d];
            self.gather(dm, q, dm.ldq, bi, kh, rows, &mut qs);
            let mut p = vec![0f32; n * ke];
            let nr = rows.1 - rows.0;
            let keep = |idx: usize, l: f32| {
                let at = self.lse_at(dm, bi, kh * rep + idx / nr, rows.0 + idx % nr);
                // SAFETY: rows `rows` of the heads of group kh belong to this task alone, and
                // `at` is inside the (b, nh, t) buffer.
                unsafe { *lse_out.ptr().add(at) = l };
            };
            self.probs(dm, &qs, k, (bi, kh), rows, ke, &mut p, None, keep);
            let vm = Mat {
                data: &v[dm.kv_at(bi, kh)..],
                ld: dm.ldkv,
                trans: false,
            };
            let os = sgemm_new(n, d, ke, 1.0, Mat::new(&p, ke), vm, 1);
            // SAFETY: rows `rows` of the heads of group kh belong to this task alone.
            unsafe { self.scatter(dm, &os, dm.ldo(), bi, kh, rows, out) };
        });
        // SAFETY: the loop above wrote all `len` and `lse_len` elements (see the comment at
        // the top).
        unsafe {
            o.set_len(len);
            lse.set_len(lse_len);
        }
        (o, lse)
    }

    /// Gradients of [`Self::forward`] for the output gradient `g` `(b, t, nh * d)`: dQ is
    /// written to `dq` (every element of the query heads, row stride `dm.ldq`); dK and dV are
    /// added to `dk` and `dv` (row stride `dm.ldkv`), which the caller zeroes first. `lse` is
    /// the forward pass's log-sum-exp, or `None` to recompute the softmax in full.
    ///
    /// # Safety
    /// `dq`, `dk` and `dv` must point to buffers laid out as `dm` says, which nothing else
    /// accesses during the call (they may be parts of one buffer: the heads never overlap).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward_into(
        &self,
        dm: &Dims,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        g: &[f32],
        lse: Option<&[f32]>,
        dq: Shared,
        dk: Shared,
        dv: Shared,
    ) {
        let (nkv, d) = (dm.nkv, dm.d);
        let rep = dm.nh / nkv;
        let nb = dm.blocks();
        let (sq, sk, sv) = (dq, dk, dv);
        // One task per (batch, kv head): it owns dK/dV of that head and the dQ rows of its
        // query heads, so tasks never write the same element.
        (0..dm.b * nkv).into_par_iter().for_each(|task| {
            let (bi, kh) = (task / nkv, task % nkv);
            let kv = dm.kv_at(bi, kh);
            let most = rep * QUERY_BLOCK;
            let (mut qs, mut gs) = (vec![0f32; most * d], vec![0f32; most * d]);
            let (mut p, mut dp) = (vec![0f32; most * dm.t], vec![0f32; most * dm.t]);
            for blk in 0..nb {
                let rows = dm.rows(blk);
                let n = rep * (rows.1 - rows.0);
                let ke = self.key_end[bi * nb + blk];
                let (qs, gs) = (&mut qs[..n * d], &mut gs[..n * d]);
                let (p, dp) = (&mut p[..n * ke], &mut dp[..n * ke]);
                self.gather(dm, q, dm.ldq, bi, kh, rows, qs);
                self.gather(dm, g, dm.ldo(), bi, kh, rows, gs);
                self.probs(dm, qs, k, (bi, kh), rows, ke, p, lse, |_, _| {});
                // dP = dO V^T.
                let vm = Mat {
                    data: &v[kv..],
                    ld: dm.ldkv,
                    trans: true,
                };
                sgemm(n, ke, d, 1.0, Mat::new(gs, d), vm, 0.0, dp, ke, 1);
                // SAFETY (dV, dK): the kv head of this task is written by this task alone; the
                // operands are in bounds of their buffers (the caller's contract).
                unsafe {
                    // dV[0..ke] += P^T dO.
                    sgemm_raw(
                        ke,
                        d,
                        n,
                        1.0,
                        (p.as_ptr(), ke, true),
                        (gs.as_ptr(), d, false),
                        1.0,
                        sv.ptr().add(kv),
                        dm.ldkv,
                        1,
                    );
                }
                // dS = P * (dP - rowsum(dP * P)), in place in dp.
                for (pr, dr) in p.chunks(ke).zip(dp.chunks_mut(ke)) {
                    let delta = dot(pr, dr);
                    for (x, pv) in dr.iter_mut().zip(pr) {
                        *x = pv * (*x - delta);
                    }
                }
                // dQ = scale dS K, back to the query layout.
                let km = Mat {
                    data: &k[kv..],
                    ld: dm.ldkv,
                    trans: false,
                };
                let dqs = sgemm_new(n, d, ke, self.scale, Mat::new(dp, ke), km, 1);
                // SAFETY: rows `rows` of the heads of group kh belong to this task alone.
                unsafe { self.scatter(dm, &dqs, dm.ldq, bi, kh, rows, sq) };
                unsafe {
                    // dK[0..ke] += scale dS^T Q.
                    sgemm_raw(
                        ke,
                        d,
                        n,
                        self.scale,
                        (dp.as_ptr(), ke, true),
                        (qs.as_ptr(), d, false),
                        1.0,
                        sk.ptr().add(kv),
                        dm.ldkv,
                        1,
                    );
                }
            }
        });
    }
}

impl AttentionOp {
    /// The op for `dm` where query row `r` of batch `bi` attends to keys `spans[bi * t + r]`
    /// (`lo..hi`, `lo < hi <= t`); for each block of query rows, the last key any of them sees.
    pub fn new(dm: Dims, spans: Arc<Vec<(u32, u32)>>) -> Result<Self> {
        let (b, t) = (dm.b, dm.t);
        if spans.len() != b * t {
            bail!(
                "attention: {} key spans for batch {b} and seq {t}",
                spans.len()
            );
        }
        if let Some((i, (lo, hi))) = spans
            .iter()
            .enumerate()
            .find(|(_, (lo, hi))| lo >= hi || *hi as usize > t)
        {
            bail!("attention: row {i} attends to keys {lo}..{hi} of {t}");
        }
        let nb = dm.blocks();
        let mut key_end = vec![1usize; b * nb];
        for bi in 0..b {
            for blk in 0..nb {
                let (r0, r1) = dm.rows(blk);
                for r in r0..r1 {
                    let end = spans[bi * t + r].1 as usize;
                    key_end[bi * nb + blk] = key_end[bi * nb + blk].max(end);
                }
            }
        }
        Ok(Self {
            key_end: Arc::new(key_end),
            spans,
            scale: 1.0 / (dm.d as f32).sqrt(),
            dims: dm,
        })
    }

    /// The same key spans for other heads or another layout of the same batch and length.
    pub fn with_dims(&self, dims: Dims) -> Self {
        Self {
            key_end: self.key_end.clone(),
            spans: self.spans.clone(),
            scale: 1.0 / (dims.d as f32).sqrt(),
            dims,
        }
    }

    /// The sizes this op was built for.
    pub fn dims(&self) -> Dims {
        self.dims
    }
}

/// The logistic function, with the vectorised `exp`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Packing;
    use candle_core::{CustomOp3, Device, Var};

    // The attention kernel as a graph node of its own, so that candle's autograd can check it.
    impl AttentionOp {
        /// [`Self::backward_into`] for dense buffers, returning `(dq, dk, dv)`.
        fn backward(
            &self,
            dm: &Dims,
            q: &[f32],
            k: &[f32],
            v: &[f32],
            g: &[f32],
        ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
            let mut dq: Vec<f32> = Vec::with_capacity(q.len());
            let mut dk = vec![0f32; k.len()];
            let mut dv = vec![0f32; v.len()];
            // SAFETY: three separate buffers of the dense layout; dk/dv start zeroed and dq is
            // written in full by `backward_into` before `set_len`.
            unsafe {
                self.backward_into(
                    dm,
                    q,
                    k,
                    v,
                    g,
                    None,
                    Shared(dq.as_mut_ptr()),
                    Shared(dk.as_mut_ptr()),
                    Shared(dv.as_mut_ptr()),
                );
                dq.set_len(q.len());
            }
            (dq, dk, dv)
        }
    }

    impl CustomOp3 for AttentionOp {
        fn name(&self) -> &'static str {
            "attention"
        }

        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let dm = self.dims;
            let (o, _) = self.forward(
                &dm,
                f32_slice(s1, l1)?,
                f32_slice(s2, l2)?,
                f32_slice(s3, l3)?,
            );
            Ok(f32_storage(o, l1.shape().clone()))
        }

        fn bwd(
            &self,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            _res: &Tensor,
            g: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let dm = self.dims;
            let (dq, dk, dv) = with_f32(q, |q| {
                with_f32(k, |k| {
                    with_f32(v, |v| with_f32(g, |g| self.backward(&dm, q, k, v, g)))
                })
            })????;
            let dev = q.device();
            Ok((
                Some(Tensor::from_vec(dq, q.shape(), dev)?),
                Some(Tensor::from_vec(dk, k.shape(), dev)?),
                Some(Tensor::from_vec(dv, v.shape(), dev)?),
            ))
        }
    }

    /// Fused attention for f32 CPU tensors in `(batch, seq, heads, head_dim)` layout (`k`/`v` may
    /// have fewer heads, grouped-query style) with the key spans of `packing`; output
    /// `(batch, seq, heads, head_dim)`. `None` when not applicable.
    pub fn attention_bthd(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        packing: &Packing,
    ) -> Result<Option<Tensor>> {
        attention_heads(q, k, v, q.dims4()?.2, k.dims4()?.2, packing)
    }

    /// [`attention_bthd`] on `q` laid out as `(batch, seq, nh * head_dim)` and `k`/`v` as
    /// `(batch, seq, nkv * head_dim)` (or any shapes with those memory layouts); the output has
    /// the shape of `q`, ready for the output projection without a reshape node.
    pub fn attention_heads(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        nh: usize,
        nkv: usize,
        packing: &Packing,
    ) -> Result<Option<Tensor>> {
        if !fused_f32(&[q, k, v]) {
            return Ok(None);
        }
        let qd = q.dims();
        let (b, t) = match qd {
            [b, t, ..] if qd.len() >= 3 => (*b, *t),
            _ => bail!("attention: q {qd:?} is not (batch, seq, ...)"),
        };
        let bad = nh == 0 || nkv == 0 || !nh.is_multiple_of(nkv) || b * t == 0;
        let d = if bad {
            0
        } else {
            q.elem_count() / (b * t * nh)
        };
        if bad
            || d == 0
            || q.elem_count() != b * t * nh * d
            || k.elem_count() != b * t * nkv * d
            || v.elem_count() != k.elem_count()
            || k.dims()[..2] != [b, t]
            || v.dims()[..2] != [b, t]
        {
            bail!(
                "attention: q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        let op = AttentionOp::new(Dims::dense(b, t, nh, nkv, d), packing.spans().clone())?;
        Ok(Some(q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            op,
        )?))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .unwrap_or(f32::INFINITY)
    }

    /// Forward values and input gradients of `fused` and `reference` agree, for a random
    /// upstream gradient.
    fn check(
        inputs: &[Var],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let yf = fused(&ts)?;
        let yr = reference(&ts)?;
        assert!(max_diff(&yf, &yr) < 1e-4, "forward differs");
        let up = Tensor::randn(0f32, 1.0, yr.shape(), &Device::Cpu)?;
        let gf = (&yf * &up)?.sum_all()?.backward()?;
        let gr = (&yr * &up)?.sum_all()?.backward()?;
        for (i, v) in inputs.iter().enumerate() {
            let (Some(a), Some(b)) = (gf.get(v.as_tensor()), gr.get(v.as_tensor())) else {
                panic!("missing gradient for input {i}");
            };
            let d = max_diff(a, b);
            assert!(d < 1e-3, "gradient of input {i} differs by {d}");
        }
        Ok(())
    }

    fn randn(shape: &[usize]) -> Result<Var> {
        Var::randn(0f32, 1.0, shape, &Device::Cpu)
    }

    #[test]
    fn rms_norm_matches_autograd() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, 8, &Device::Cpu)?;
        check(
            &[randn(&[2, 3, 8])?],
            |t| Ok(rms_norm(&t[0], &w, 1e-5)?.expect("f32")),
            |t| {
                let var = t[0].sqr()?.mean_keepdim(D::Minus1)?;
                t[0].broadcast_div(&(var + 1e-5)?.sqrt()?)?
                    .broadcast_mul(&w)
            },
        )
    }

    /// Attention through the unfused model code, `(batch, seq, heads, head_dim)` in and out.
    fn reference_attention(x: &[Tensor], n_rep: usize, mask: &Tensor) -> Result<Tensor> {
        let h = |x: &Tensor| x.transpose(1, 2)?.contiguous();
        let err = |e: crate::model::ModelError| candle_core::Error::Msg(e.to_string());
        let k = crate::model::repeat_kv(h(&x[1])?, n_rep).map_err(err)?;
        let v = crate::model::repeat_kv(h(&x[2])?, n_rep).map_err(err)?;
        crate::model::attention(&h(&x[0])?, &k, &v, mask)
            .map_err(err)?
            .transpose(1, 2)
    }

    #[test]
    fn rope_and_attention_match_autograd() -> Result<()> {
        let (b, t, nh, nkv, d) = (2, 5, 4, 2, 6);
        let theta = Tensor::randn(0f32, 2.0, (b, 1, t, d / 2), &Device::Cpu)?;
        let (cos, sin) = (theta.cos()?, theta.sin()?);
        // RoPE on rows of heads, in place, against the model's tensor version; then its
        // transpose (the backward pass), which undoes a rotation.
        let x = Tensor::randn(0f32, 1.0, (b, t, nh, d), &Device::Cpu)?;
        let want = crate::model::apply_rope(&x.transpose(1, 2)?, &cos, &sin)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .transpose(1, 2)?;
        let (c, sn) = (cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?);
        let mut rows = x.flatten_all()?.to_vec1::<f32>()?;
        rope_rows(&mut rows, nh * d, nh, d / 2, (&c, &sn), false);
        let got = Tensor::from_vec(rows.clone(), (b, t, nh, d), &Device::Cpu)?;
        assert!(max_diff(&got, &want) < 1e-5, "rope differs");
        rope_rows(&mut rows, nh * d, nh, d / 2, (&c, &sn), true);
        let back = Tensor::from_vec(rows, (b, t, nh, d), &Device::Cpu)?;
        assert!(
            max_diff(&back, &x) < 1e-5,
            "inverse rope is not the inverse"
        );
        let packing = crate::model::Packing::from_segments(
            &[vec![0, 0, 0, 1, 1], vec![0, 0, 0, 0, 0]],
            None,
            &Device::Cpu,
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mask = packing
            .mask()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        check(
            &[
                randn(&[b, t, nh, d])?,
                randn(&[b, t, nkv, d])?,
                randn(&[b, t, nkv, d])?,
            ],
            |x| Ok(attention_bthd(&x[0], &x[1], &x[2], &packing)?.expect("f32")),
            |x| reference_attention(x, nh / nkv, &mask),
        )
    }

    #[test]
    fn fast_exp_is_close_to_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (fast_exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-100.0), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(f32::INFINITY), f32::INFINITY);
        let mut row = vec![1.0f32, 2.0, 3.0, f32::NEG_INFINITY, 0.5];
        row.extend((0..40).map(|i| i as f32 * 0.1));
        let want: Vec<f32> = {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = row.iter().map(|v| (v - m).exp()).sum();
            row.iter().map(|v| (v - m).exp() / z).collect()
        };
        softmax_in_place(&mut row);
        for (a, b) in row.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(row[3], 0.0);
    }

    /// Sequences longer than a query block, packed segments and grouped heads: the blocks
    /// skipped because the mask hides them change nothing.
    #[test]
    fn blocked_attention_matches_autograd() -> Result<()> {
        let (b, t, nh, nkv, d) = (2, 150, 4, 2, 8);
        let seg = |cut: usize| (0..t).map(|i| u32::from(i >= cut)).collect::<Vec<u32>>();
        let packing = crate::model::Packing::from_segments(&[seg(70), seg(t)], None, &Device::Cpu)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mask = packing
            .mask()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        check(
            &[
                randn(&[b, t, nh, d])?,
                randn(&[b, t, nkv, d])?,
                randn(&[b, t, nkv, d])?,
            ],
            |x| Ok(attention_bthd(&x[0], &x[1], &x[2], &packing)?.expect("f32")),
            |x| reference_attention(x, nh / nkv, &mask),
        )
    }
}
