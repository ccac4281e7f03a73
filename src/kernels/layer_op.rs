//! A whole decoder layer as one autograd node, for LoRA training on f32 CPU tensors.
//!
//! candle's autograd pays for every edge of the graph: a zeroed gradient buffer and a
//! single-threaded add per input, and every node keeps its inputs alive until the backward
//! pass. A Llama-style layer built from candle's operations has dozens of such edges on
//! `(tokens, hidden)`-sized tensors. Here the layer is one [`CustomOp3`] over the layer input
//! and the layer's seven adapters packed into two flat vectors (A and B), and its backward
//! pass is the chain rule written out below, step by step in the reverse order of the forward
//! pass, on the kernels of [`super::ops`].
//!
//! Being one node also lets products share work: q, k and v are one product against their
//! stacked merged weights `[Wq'; Wk'; Wv']`, and their rank-r updates one product of rank 3r;
//! gate and up likewise. Attention reads q, k and v in place from that product's output.
//!
//! Kept for the backward pass: the normalised inputs of both blocks, the rotated q/k/v, the
//! attention output and its log-sum-exp, the mid-layer residual and the gate/up
//! pre-activations (the attention probabilities and the SwiGLU output are recomputed). That
//! is a fraction of what a graph of candle's operations keeps alive.
//!
//! Adapter dropout keeps the merged-weight products: the adapter of a projection should see
//! `x * mask` where the merged weight saw `x`, so each adapted projection adds the rank-r
//! term `scale ((x * (mask - 1)) A^T) B^T`, and the backward pass the matching terms. The
//! masks are a hash of (call key, element), regenerated in the backward pass rather than kept.

use super::gemm::{par_filled, pool_threads, sgemm, sgemm_new, Mat};
use super::ops::{
    f32_slice, f32_storage, fused_f32, norm_grad_add, norm_rows, rope_rows, sigmoid, with_f32,
    AttentionOp, Dims, Shared, CHUNK,
};
use crate::model::lora::{next_dropout_key, DropoutMask, LoraAdapter, LoraLinear};
use crate::model::{Packing, RmsNorm};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex, RwLockReadGuard};

/// Tables every layer of one forward pass shares: the keys each token attends to (with
/// their per-block ranges) and the rotary cos/sin of each position, as flat f32.
pub(crate) struct LayerContext {
    attn: AttentionOp,
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    b: usize,
    t: usize,
}

impl LayerContext {
    /// Builds the tables from the batch's packing and the `(batch, 1, seq, head_dim / 2)`
    /// rotary tables of one forward pass.
    pub fn new(packing: &Packing, cos: &Tensor, sin: &Tensor) -> Result<Self> {
        let (b, t) = packing.dims();
        let table = |x: &Tensor| -> Result<Arc<Vec<f32>>> {
            Ok(Arc::new(
                x.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            ))
        };
        Ok(Self {
            attn: AttentionOp::new(Dims::dense(b, t, 1, 1, 1), packing.spans().clone())?,
            cos: table(cos)?,
            sin: table(sin)?,
            b,
            t,
        })
    }
}

/// The parts of one decoder layer the fused node needs, borrowed from the model.
pub(crate) struct LayerRefs<'a> {
    pub input_norm: &'a RmsNorm,
    pub post_attention_norm: &'a RmsNorm,
    /// `q, k, v, o, gate, up, down`, in that order.
    pub proj: [&'a LoraLinear; 7],
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Projection indices in [`LayerRefs::proj`].
const Q: usize = 0;
const O: usize = 3;
const GATE: usize = 4;
const DOWN: usize = 6;

/// Sizes of one layer and where each adapter sits in the packed A and B vectors.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    hidden: usize,
    nh: usize,
    nkv: usize,
    d: usize,
    inter: usize,
    /// The adapters' rank (all adapters of a layer share one config).
    r: usize,
    /// Which of the seven projections carry an adapter (PEFT `target_modules`).
    adapted: [bool; 7],
}

impl Sizes {
    fn q(&self) -> usize {
        self.nh * self.d
    }
    fn kv(&self) -> usize {
        self.nkv * self.d
    }
    /// Width of the stacked q/k/v projection.
    fn qkv(&self) -> usize {
        self.q() + 2 * self.kv()
    }
    /// `(in, out)` of projection `i`.
    fn io(&self, i: usize) -> (usize, usize) {
        let (h, q, kv, it) = (self.hidden, self.q(), self.kv(), self.inter);
        [(h, q), (h, kv), (h, kv), (q, h), (h, it), (h, it), (it, h)][i]
    }
    /// Rank of projection `i`'s adapter, 0 without one.
    fn rank(&self, i: usize) -> usize {
        if self.adapted[i] {
            self.r
        } else {
            0
        }
    }
    /// Offset of projection `i`'s A `(r, in)` in the packed A vector.
    fn a_at(&self, i: usize) -> usize {
        (0..i).map(|j| self.rank(j) * self.io(j).0).sum()
    }
    /// Offset of projection `i`'s B `(out, r)` in the packed B vector.
    fn b_at(&self, i: usize) -> usize {
        (0..i).map(|j| self.io(j).1 * self.rank(j)).sum()
    }
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// `norm1(x)`, `(rows, hidden)`.
    h1: Vec<f32>,
    /// The q/k/v projection after the rotation of q and k, `(rows, qkv)`.
    qkv: Vec<f32>,
    /// The attention output, `(rows, nh * d)`.
    y: Vec<f32>,
    /// The log-sum-exp of every attention score row, `(b, nh, t)`.
    lse: Vec<f32>,
    /// The residual stream after attention, `(rows, hidden)`.
    x2: Vec<f32>,
    /// `norm2(x2)`, `(rows, hidden)`.
    h2: Vec<f32>,
    /// Gate and up pre-activations side by side, `(rows, 2 * inter)`.
    gu: Vec<f32>,
    /// Per projection under adapter dropout: `u' = (x * (mask - 1)) A^T`, `(rows, r)`.
    u_drop: [Vec<f32>; 7],
}

/// Merged weights `W + scale B A` of one call: q/k/v stacked `(qkv, hidden)`, o
/// `(hidden, nh * d)`, gate/up stacked `(2 inter, hidden)`, down `(hidden, inter)`.
struct Merged {
    qkv: Vec<f32>,
    o: Vec<f32>,
    gu: Vec<f32>,
    down: Vec<f32>,
}

/// The layer node. Frozen tensors are captured, so autograd never sees them.
struct LayerOp {
    ln: [Tensor; 2],
    eps: [f32; 2],
    w: [Tensor; 7],
    bias: [Option<Tensor>; 7],
    sizes: Sizes,
    scale: f32,
    /// Per projection, the dropout mask of this call (training with adapter dropout only).
    masks: [Option<DropoutMask>; 7],
    attn: AttentionOp,
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    /// Whether to keep [`Saved`] for a backward pass (training) or drop it (evaluation).
    save: bool,
    saved: Mutex<Option<Saved>>,
}

/// A read guard on a contiguous f32 CPU tensor, from which its elements can be borrowed.
struct View<'a>(RwLockReadGuard<'a, Storage>, &'a Layout);

impl<'a> View<'a> {
    fn of(t: &'a Tensor) -> Self {
        let (g, l) = t.storage_and_layout();
        Self(g, l)
    }

    fn get(&self) -> Result<&[f32]> {
        match &*self.0 {
            Storage::Cpu(s) => f32_slice(s, self.1),
            _ => bail!("fused layer: CPU tensor required"),
        }
    }
}

/// Adds `bias` to every row of `y`.
fn add_bias(y: &mut [f32], bias: &[f32]) {
    y.par_chunks_mut(bias.len()).for_each(|row| {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    });
}

/// `silu(gate) * up` for rows holding `[gate | up]` (`2 * inter` wide).
fn swiglu_rows(gu: &[f32], inter: usize) -> Vec<f32> {
    let rows_per = (CHUNK / inter).max(1);
    par_filled(gu.len() / 2, rows_per * inter, |i, out| {
        let src = &gu[i * rows_per * 2 * inter..];
        for (orow, row) in out.chunks_mut(inter).zip(src.chunks(2 * inter)) {
            let (g, u) = row.split_at(inter);
            for ((o, g), u) in orow.iter_mut().zip(g).zip(u) {
                o.write(g * sigmoid(*g) * u);
            }
        }
    })
}

/// Gradients of the gate and up pre-activations (`[dgate | dup]` rows) for the output
/// gradient `g` `(rows, inter)` of [`swiglu_rows`].
fn swiglu_grad_rows(gu: &[f32], g: &[f32], inter: usize) -> Vec<f32> {
    let rows_per = (CHUNK / inter).max(1);
    par_filled(gu.len(), rows_per * 2 * inter, |i, out| {
        let start = i * rows_per;
        let src = &gu[start * 2 * inter..];
        let gs = &g[start * inter..];
        for ((orow, row), grow) in out
            .chunks_mut(2 * inter)
            .zip(src.chunks(2 * inter))
            .zip(gs.chunks(inter))
        {
            let (ga, up) = row.split_at(inter);
            let (dg, du) = orow.split_at_mut(inter);
            for j in 0..inter {
                let s = sigmoid(ga[j]);
                du[j].write(grow[j] * ga[j] * s);
                dg[j].write(grow[j] * up[j] * s * (1.0 + ga[j] * (1.0 - s)));
            }
        }
    })
}

/// One adapted projection of a group sharing an input: its output columns `col..col + width`
/// of the output gradient and, under dropout, its mask and the forward pass's `u'`.
struct Part<'a> {
    col: usize,
    width: usize,
    drop: Option<(DropoutMask, &'a [f32])>,
}

/// `x * (mask - 1)` for a dense input: the difference between the dropped-out input the
/// adapter sees and the input the merged weight sees.
fn dropout_delta(x: &[f32], mask: DropoutMask) -> Vec<f32> {
    par_filled(x.len(), CHUNK, |c, out| {
        let mut m = [0f32; MASK_BLOCK];
        for (k, (o, v)) in out
            .chunks_mut(MASK_BLOCK)
            .zip(x[c * CHUNK..].chunks(MASK_BLOCK))
            .enumerate()
        {
            let m = &mut m[..o.len()];
            mask.fill(c * CHUNK + k * MASK_BLOCK, m);
            for ((o, v), m) in o.iter_mut().zip(v).zip(m.iter()) {
                o.write(v * (m - 1.0));
            }
        }
    })
}

/// Mask values computed per block on the stack before they are applied.
const MASK_BLOCK: usize = 256;

/// `dx += (mask - 1) * t`, element-wise.
fn add_dropout_delta(dx: &mut [f32], t: &[f32], mask: DropoutMask) {
    dx.par_chunks_mut(CHUNK)
        .zip(t.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (d, t))| {
            let mut m = [0f32; MASK_BLOCK];
            for (k, (d, t)) in d
                .chunks_mut(MASK_BLOCK)
                .zip(t.chunks(MASK_BLOCK))
                .enumerate()
            {
                let m = &mut m[..d.len()];
                mask.fill(c * CHUNK + k * MASK_BLOCK, m);
                for ((d, t), m) in d.iter_mut().zip(t).zip(m.iter()) {
                    *d += (m - 1.0) * t;
                }
            }
        });
}

/// LoRA gradients of adapters sharing the dense input `x` (`(rows, din)`): adapter `j` has
/// `A_j` at rows `j r..(j+1) r` of `a` (stacked `(k r, din)`), and its output gradient is
/// columns `parts[j]` of `g` (row stride `ldg`), with `B_j` `(width, r)` next in `b`. Writes
/// `dA` (stacked like `a`) and `dB` (stacked like `b`):
/// `u = x A^T`, `gu_j = scale g_j B_j`, `dA = gu^T x`, `dB_j = scale g_j^T u_j`.
///
/// Under dropout the adapter saw `x + x'_j` (`x'_j = x * (mask_j - 1)`), not `x`: then
/// `u_j` gains the forward pass's `u'_j = x'_j A_j^T`, `dA_j` gains `gu_j^T x'_j`, and the
/// input gradient `dx` (already holding `g W'`) gains `(mask_j - 1) * (gu_j A_j)`.
///
/// These products are skinny (one side is the rank), and the GEMM gains little from a second
/// thread on them, so they run single-threaded two at a time. `dB_j` is computed as its
/// transpose `scale u_j^T g_j`, a shape the kernels handle twice as fast, and transposed back.
#[allow(clippy::too_many_arguments)]
fn adapter_grads(
    x: &[f32],
    (rows, din, r, scale): (usize, usize, usize, f32),
    (g, ldg): (&[f32], usize),
    parts: &[Part<'_>],
    (a, b): (&[f32], &[f32]),
    da: &mut [f32],
    db: &mut [f32],
    dx: &mut [f32],
) {
    let kr = parts.len() * r;
    let xm = Mat::new(x, din);
    let g_at = |col: usize| Mat {
        data: &g[col..],
        ld: ldg,
        trans: false,
    };
    let (mut u, gu) = rayon::join(
        || sgemm_new(rows, kr, din, 1.0, xm, Mat::new(a, din).t(), 1),
        || {
            let mut gu = vec![0f32; rows * kr];
            let mut boff = 0;
            for (j, p) in parts.iter().enumerate() {
                let bj = Mat::new(&b[boff * r..], r);
                sgemm(
                    rows,
                    r,
                    p.width,
                    scale,
                    g_at(p.col),
                    bj,
                    0.0,
                    &mut gu[j * r..],
                    kr,
                    1,
                );
                boff += p.width;
            }
            gu
        },
    );
    for (j, p) in parts.iter().enumerate() {
        if let Some((_, u_extra)) = p.drop {
            for (row, extra) in u.chunks_mut(kr).zip(u_extra.chunks(r)) {
                for (v, e) in row[j * r..(j + 1) * r].iter_mut().zip(extra) {
                    *v += e;
                }
            }
        }
    }
    rayon::join(
        || {
            let gum = Mat {
                data: &gu,
                ld: kr,
                trans: true,
            };
            sgemm(kr, din, rows, 1.0, gum, xm, 0.0, da, din, 1);
        },
        || {
            let mut boff = 0;
            for (j, p) in parts.iter().enumerate() {
                let uj = Mat {
                    data: &u[j * r..],
                    ld: kr,
                    trans: true,
                };
                let dbt = sgemm_new(r, p.width, rows, scale, uj, g_at(p.col), 1);
                for (i, row) in db[boff * r..(boff + p.width) * r].chunks_mut(r).enumerate() {
                    for (k, v) in row.iter_mut().enumerate() {
                        *v = dbt[k * p.width + i];
                    }
                }
                boff += p.width;
            }
        },
    );
    let th = pool_threads();
    for (j, p) in parts.iter().enumerate() {
        let Some((mask, _)) = p.drop else { continue };
        let guj = Mat {
            data: &gu[j * r..],
            ld: kr,
            trans: false,
        };
        let delta = dropout_delta(x, mask);
        sgemm(
            r,
            din,
            rows,
            1.0,
            guj.t(),
            Mat::new(&delta, din),
            1.0,
            &mut da[j * r * din..],
            din,
            th,
        );
        drop(delta);
        let back = sgemm_new(rows, din, r, 1.0, guj, Mat::new(&a[j * r * din..], din), th);
        add_dropout_delta(dx, &back, mask);
    }
}

impl LayerOp {
    /// Copies `W_i` of the projections `ids` into one stacked buffer and folds each
    /// adapter in: rows of projection `i` become `W_i + scale B_i A_i`.
    fn fold(&self, ids: &[usize], w: &[&[f32]], a: &[f32], b: &[f32]) -> Vec<f32> {
        let (sz, th) = (self.sizes, pool_threads());
        let din = sz.io(ids[0]).0;
        let total: usize = ids.iter().map(|&i| sz.io(i).1).sum();
        let mut m = Vec::with_capacity(total * din);
        for &i in ids {
            m.extend_from_slice(w[i]);
        }
        let mut row = 0;
        for &i in ids {
            let dout = sz.io(i).1;
            if !sz.adapted[i] {
                row += dout;
                continue;
            }
            let bm = Mat::new(&b[sz.b_at(i)..], sz.r);
            let am = Mat::new(&a[sz.a_at(i)..], din);
            sgemm(
                dout,
                din,
                sz.r,
                self.scale,
                bm,
                am,
                1.0,
                &mut m[row * din..],
                din,
                th,
            );
            row += dout;
        }
        m
    }

    fn merged(&self, w: &[&[f32]], a: &[f32], b: &[f32]) -> Merged {
        Merged {
            qkv: self.fold(&[0, 1, 2], w, a, b),
            o: self.fold(&[O], w, a, b),
            gu: self.fold(&[GATE, GATE + 1], w, a, b),
            down: self.fold(&[DOWN], w, a, b),
        }
    }

    /// The attention op for the stacked q/k/v layout.
    fn attention(&self) -> (AttentionOp, Dims) {
        let sz = self.sizes;
        let dm = Dims {
            ldq: sz.qkv(),
            ldkv: sz.qkv(),
            ..Dims::dense(self.attn.dims().b, self.attn.dims().t, sz.nh, sz.nkv, sz.d)
        };
        (self.attn.with_dims(dm), dm)
    }

    /// Runs `f` on the frozen tensors' elements, borrowed in place: the two norm weights and
    /// the seven projection weights.
    fn with_frozen<R>(&self, f: impl FnOnce(&[&[f32]; 2], &[&[f32]]) -> R) -> Result<R> {
        let ln: Vec<View> = self.ln.iter().map(View::of).collect();
        let w: Vec<View> = self.w.iter().map(View::of).collect();
        let ln = [ln[0].get()?, ln[1].get()?];
        let w = w.iter().map(View::get).collect::<Result<Vec<_>>>()?;
        Ok(f(&ln, &w))
    }

    /// The forward pass on raw buffers: the layer output and what the backward pass needs.
    fn run(&self, x: &[f32], a: &[f32], b: &[f32]) -> Result<(Vec<f32>, Saved)> {
        let sz = self.sizes;
        let (nq, nkv, n, inter) = (sz.q(), sz.kv(), sz.qkv(), sz.inter);
        let bias = Biases::new(&self.bias, &self.sizes)?;
        self.with_frozen(|ln, w| {
            let m = self.merged(w, a, b);
            let mut u_drop: [Vec<f32>; 7] = Default::default();
            let mut project = |ids: &[usize], x: &[f32], merged: &[f32], bias, residual| {
                self.project(ids, x, merged, (a, b), bias, residual, &mut u_drop)
            };
            // Attention block: x2 = x + o(attention(rope(qkv(norm1(x))))).
            let h1 = norm_rows(x, ln[0], self.eps[0]);
            let mut qkv = project(&[Q, Q + 1, Q + 2], &h1, &m.qkv, bias.qkv.as_deref(), None);
            let (half, heads) = (sz.d / 2, sz.nh + sz.nkv);
            rope_rows(&mut qkv, n, heads, half, (&self.cos, &self.sin), false);
            let (attn, dm) = self.attention();
            let (y, lse) = attn.forward(&dm, &qkv, &qkv[nq..], &qkv[nq + nkv..]);
            let x2 = project(&[O], &y, &m.o, bias.o.as_deref(), Some(x));
            // MLP block: out = x2 + down(silu(gate(h2)) * up(h2)), h2 = norm2(x2).
            let h2 = norm_rows(&x2, ln[1], self.eps[1]);
            let gu = project(&[GATE, GATE + 1], &h2, &m.gu, bias.gu.as_deref(), None);
            let act = swiglu_rows(&gu, inter);
            let out = project(&[DOWN], &act, &m.down, bias.down.as_deref(), Some(&x2));
            let saved = Saved {
                h1,
                qkv,
                y,
                lse,
                x2,
                h2,
                gu,
                u_drop,
            };
            (out, saved)
        })
    }

    /// One group of projections sharing the input `x`: `residual + x M^T + bias` for the
    /// stacked merged weights `M`, then the dropout corrections of its adapters.
    #[allow(clippy::too_many_arguments)]
    fn project(
        &self,
        ids: &[usize],
        x: &[f32],
        merged: &[f32],
        ab: (&[f32], &[f32]),
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        u_drop: &mut [Vec<f32>; 7],
    ) -> Vec<f32> {
        let sz = self.sizes;
        let din = sz.io(ids[0]).0;
        let width: usize = ids.iter().map(|&i| sz.io(i).1).sum();
        let rows = x.len() / din;
        let (xm, wm) = (Mat::new(x, din), Mat::new(merged, din).t());
        let mut y = match residual {
            Some(res) => {
                let mut y = res.to_vec();
                sgemm(
                    rows,
                    width,
                    din,
                    1.0,
                    xm,
                    wm,
                    1.0,
                    &mut y,
                    width,
                    pool_threads(),
                );
                y
            }
            None => sgemm_new(rows, width, din, 1.0, xm, wm, pool_threads()),
        };
        if let Some(bias) = bias {
            add_bias(&mut y, bias);
        }
        self.dropout_forward(ids, x, ab, (&mut y, width), u_drop);
        y
    }

    /// Adapter dropout in the forward pass, for the projections `ids` of a group with input
    /// `x` whose outputs sit side by side in `y` (row stride `ldy`). The merged weight
    /// already applied `scale B A` to `x`; the adapter should have seen the dropped-out
    /// input `x + x'` (`x' = x * (mask - 1)`), so each output gains `scale (x' A^T) B^T`.
    /// `u' = x' A^T` is kept for the backward pass.
    fn dropout_forward(
        &self,
        ids: &[usize],
        x: &[f32],
        (a, b): (&[f32], &[f32]),
        (y, ldy): (&mut [f32], usize),
        u_drop: &mut [Vec<f32>; 7],
    ) {
        let (sz, th) = (self.sizes, pool_threads());
        let mut col = 0;
        for &i in ids {
            let (din, dout) = sz.io(i);
            col += dout;
            let Some(mask) = self.masks[i] else { continue };
            let col = col - dout;
            let rows = x.len() / din;
            let delta = dropout_delta(x, mask);
            let am = Mat::new(&a[sz.a_at(i)..], din).t();
            let u = sgemm_new(rows, sz.r, din, 1.0, Mat::new(&delta, din), am, th);
            let bm = Mat::new(&b[sz.b_at(i)..], sz.r).t();
            sgemm(
                rows,
                dout,
                sz.r,
                self.scale,
                Mat::new(&u, sz.r),
                bm,
                1.0,
                &mut y[col..],
                ldy,
                th,
            );
            u_drop[i] = u;
        }
    }

    /// The backward pass: `(dx, dA, dB)` for the output gradient `g`.
    fn backward(
        &self,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        g: &[f32],
        saved: Saved,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let sz = self.sizes;
        let (hd, nq, nkv, n, inter, r) = (sz.hidden, sz.q(), sz.kv(), sz.qkv(), sz.inter, sz.r);
        let rows = x.len() / hd;
        let (th, s) = (pool_threads(), self.scale);
        let Saved {
            h1,
            qkv,
            y,
            lse,
            x2,
            h2,
            gu,
            u_drop,
        } = saved;
        self.with_frozen(|ln, w| {
            let m = self.merged(w, a, b);
            let (mut da, mut db) = (vec![0f32; a.len()], vec![0f32; b.len()]);
            // The adapters of projections `ids` (output columns `cols` of `g`) with input `x`.
            // The adapters of projections `ids` (output columns `cols` of `g`) with input `x`;
            // `dx` holds the input gradient through the merged weights.
            let mut grads = |x: &[f32],
                             din: usize,
                             (g, ldg): (&[f32], usize),
                             ids: &[usize],
                             cols: &[(usize, usize)],
                             dx: &mut [f32]| {
                let parts: Vec<Part> = ids
                    .iter()
                    .zip(cols)
                    .filter(|(&i, _)| sz.adapted[i])
                    .map(|(&i, &(col, width))| Part {
                        col,
                        width,
                        drop: self.masks[i].map(|m| (m, &u_drop[i][..])),
                    })
                    .collect();
                if !parts.is_empty() {
                    let (at, bt) = (sz.a_at(ids[0]), sz.b_at(ids[0]));
                    let (da, db) = (&mut da[at..], &mut db[bt..]);
                    let ab = (&a[at..], &b[bt..]);
                    adapter_grads(x, (rows, din, r, s), (g, ldg), &parts, ab, da, db, dx);
                }
            };

            // down: out = x2 + act Wd'^T, so d act = g Wd'.
            let act = swiglu_rows(&gu, inter);
            let mut dact = sgemm_new(
                rows,
                inter,
                hd,
                1.0,
                Mat::new(g, hd),
                Mat::new(&m.down, inter),
                th,
            );
            grads(&act, inter, (g, hd), &[DOWN], &[(0, hd)], &mut dact);
            drop(act);
            // SwiGLU, then gate/up: d h2 = [dgate | dup] [Wg'; Wu'].
            let dgu = swiglu_grad_rows(&gu, &dact, inter);
            drop((dact, gu));
            let mut dh2 = sgemm_new(
                rows,
                hd,
                2 * inter,
                1.0,
                Mat::new(&dgu, 2 * inter),
                Mat::new(&m.gu, hd),
                th,
            );
            let gate_up = [(0, inter), (inter, inter)];
            let gate_up_ids = [GATE, GATE + 1];
            grads(&h2, hd, (&dgu, 2 * inter), &gate_up_ids, &gate_up, &mut dh2);
            drop((dgu, h2));
            // norm2 and the residual: d x2 = g + d norm2(x2) / d x2 * d h2.
            let mut dres = g.to_vec();
            norm_grad_add(&x2, &dh2, ln[1], self.eps[1], &mut dres);
            drop((dh2, x2));
            // o: x2 = x + y Wo'^T, so d y = d x2 Wo'.
            let mut dy = sgemm_new(
                rows,
                nq,
                hd,
                1.0,
                Mat::new(&dres, hd),
                Mat::new(&m.o, nq),
                th,
            );
            grads(&y, nq, (&dres, hd), &[O], &[(0, hd)], &mut dy);
            drop(y);
            // Attention into one stacked d qkv buffer (dK and dV accumulate: zeroed first),
            // then the inverse rotation of dq and dk.
            let mut dqkv = vec![0f32; rows * n];
            let (attn, dm) = self.attention();
            let p = dqkv.as_mut_ptr();
            // SAFETY: dq, dk and dv are the disjoint column ranges [0, nq), [nq, nq + nkv)
            // and [nq + nkv, n) of the rows of `dqkv`, laid out as `dm` says; nothing else
            // touches `dqkv` during the call.
            unsafe {
                attn.backward_into(
                    &dm,
                    &qkv,
                    &qkv[nq..],
                    &qkv[nq + nkv..],
                    &dy,
                    Some(&lse),
                    Shared(p),
                    Shared(p.add(nq)),
                    Shared(p.add(nq + nkv)),
                );
            }
            drop((dy, qkv));
            rope_rows(
                &mut dqkv,
                n,
                sz.nh + sz.nkv,
                sz.d / 2,
                (&self.cos, &self.sin),
                true,
            );
            // q/k/v: d h1 = d qkv [Wq'; Wk'; Wv'].
            let mut dh1 = sgemm_new(
                rows,
                hd,
                n,
                1.0,
                Mat::new(&dqkv, n),
                Mat::new(&m.qkv, hd),
                th,
            );
            let qkv_cols = [(0, nq), (nq, nkv), (nq + nkv, nkv)];
            grads(&h1, hd, (&dqkv, n), &[Q, Q + 1, Q + 2], &qkv_cols, &mut dh1);
            // norm1 and the residual: d x = d x2 + d norm1(x) / d x * d h1.
            norm_grad_add(x, &dh1, ln[0], self.eps[0], &mut dres);
            (dres, da, db)
        })
    }
}

/// The frozen biases as flat buffers, stacked like the products they follow.
struct Biases {
    qkv: Option<Vec<f32>>,
    o: Option<Vec<f32>>,
    gu: Option<Vec<f32>>,
    down: Option<Vec<f32>>,
}

impl Biases {
    fn new(bias: &[Option<Tensor>; 7], sz: &Sizes) -> Result<Self> {
        // A missing bias in a stacked product is a run of zeros.
        let stack = |ids: &[usize]| -> Result<Option<Vec<f32>>> {
            if ids.iter().all(|&i| bias[i].is_none()) {
                return Ok(None);
            }
            let mut v = Vec::new();
            for &i in ids {
                match &bias[i] {
                    Some(t) => v.extend(t.flatten_all()?.to_vec1::<f32>()?),
                    None => v.extend(std::iter::repeat_n(0.0, sz.io(i).1)),
                }
            }
            Ok(Some(v))
        };
        Ok(Self {
            qkv: stack(&[0, 1, 2])?,
            o: stack(&[O])?,
            gu: stack(&[GATE, GATE + 1])?,
            down: stack(&[DOWN])?,
        })
    }
}

impl CustomOp3 for LayerOp {
    fn name(&self) -> &'static str {
        "decoder-layer"
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
        let (x, a, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let (out, saved) = self.run(x, a, b)?;
        if self.save {
            if let Ok(mut slot) = self.saved.lock() {
                *slot = Some(saved);
            }
        }
        Ok(f32_storage(out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, db) = with_f32(x, |xv| {
            with_f32(a, |av| {
                with_f32(b, |bv| {
                    with_f32(g, |gv| -> Result<_> {
                        let kept = self.saved.lock().ok().and_then(|mut s| s.take());
                        let saved = match kept {
                            Some(s) => s,
                            None => self.run(xv, av, bv)?.1,
                        };
                        self.backward(xv, av, bv, gv, saved)
                    })
                })
            })
        })?????;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(da, a.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

/// The decoder layer `x + attn(norm1(x))`, then `+ mlp(norm2(.))`, as one node, when it
/// applies: f32 CPU tensors and adapters (on any subset of the seven projections, or none)
/// of one rank and scale, as one LoRA config gives. `None` otherwise (the caller runs the
/// per-op path). In training with adapter dropout, each adapted projection draws its mask
/// here, in the order the per-op path draws them.
pub(crate) fn decoder_layer(
    x: &Tensor,
    layer: &LayerRefs<'_>,
    ctx: &LayerContext,
    train: bool,
) -> Result<Option<Tensor>> {
    let adapters: Vec<_> = layer.proj.iter().filter_map(|p| p.adapter()).collect();
    let rank = |a: &LoraAdapter| a.lora_a.dim(0).ok();
    let first = adapters.first();
    let uniform = adapters.iter().all(|a| {
        first.is_some_and(|f| a.scale == f.scale && rank(a) == rank(f))
            && (0.0..1.0).contains(&a.dropout)
    });
    let mut weights: Vec<&Tensor> = layer.proj.iter().map(|p| p.weight()).collect();
    weights.extend([
        layer.input_norm.weight(),
        layer.post_attention_norm.weight(),
    ]);
    weights.extend(layer.proj.iter().filter_map(|p| p.bias()));
    if !uniform || !fused_f32(&[x]) || !fused_f32(&weights) {
        return Ok(None);
    }
    let (b, t, hidden) = x.dims3()?;
    if (b, t) != (ctx.b, ctx.t) {
        bail!(
            "fused layer: input {:?} for a context of ({}, {})",
            x.dims(),
            ctx.b,
            ctx.t
        );
    }
    let sizes = Sizes {
        hidden,
        nh: layer.num_heads,
        nkv: layer.num_kv_heads,
        d: layer.head_dim,
        inter: layer.proj[GATE].weight().dim(0)?,
        r: first.and_then(|a| rank(a)).unwrap_or(0),
        adapted: std::array::from_fn(|i| layer.proj[i].adapter().is_some()),
    };
    for (i, p) in layer.proj.iter().enumerate() {
        let (din, dout) = sizes.io(i);
        if p.weight().dims() != [dout, din] {
            bail!(
                "fused layer: projection {i} weight {:?}, expected ({dout}, {din})",
                p.weight().dims()
            );
        }
    }
    let flat = |f: fn(&LoraAdapter) -> &Tensor| -> Result<Tensor> {
        if adapters.is_empty() {
            return Tensor::zeros(0, candle_core::DType::F32, x.device());
        }
        let parts = adapters
            .iter()
            .map(|a| f(a).flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    };
    let mut w = Vec::with_capacity(7);
    for p in &layer.proj {
        w.push(p.weight().contiguous()?.detach());
    }
    let w: [Tensor; 7] = w
        .try_into()
        .map_err(|_| candle_core::Error::Msg("fused layer: seven weights".into()))?;
    // Dropout keys are drawn here, in projection order, as the per-op path draws them.
    let masks = std::array::from_fn(|i| match layer.proj[i].adapter() {
        Some(ad) if train && ad.dropout > 0.0 => {
            Some(DropoutMask::new(next_dropout_key(), ad.dropout))
        }
        _ => None,
    });
    let a = flat(|a| &a.lora_a)?;
    let bm = flat(|a| &a.lora_b)?;
    let op = LayerOp {
        ln: [
            layer.input_norm.weight().contiguous()?,
            layer.post_attention_norm.weight().contiguous()?,
        ],
        eps: [
            layer.input_norm.eps() as f32,
            layer.post_attention_norm.eps() as f32,
        ],
        w,
        bias: std::array::from_fn(|i| layer.proj[i].bias().map(Tensor::detach)),
        sizes,
        scale: first.map_or(1.0, |a| a.scale as f32),
        masks,
        attn: ctx.attn.clone(),
        cos: ctx.cos.clone(),
        sin: ctx.sin.clone(),
        save: train,
        saved: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op3(&a, &bm, op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decoder::{DecoderLayer, LayerInputs};
    use crate::model::lora::{LoraConfig, LoraVarBuilder, ALL_TARGET_MODULES};
    use crate::model::{Config, Packing, RotaryEmbedding};
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};
    use std::collections::HashMap;

    const HIDDEN: usize = 16;
    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const FFN: usize = 24;

    fn config(model_type: &str) -> Config {
        serde_json::from_value(serde_json::json!({
            "model_type": model_type, "hidden_size": HIDDEN, "intermediate_size": FFN,
            "num_hidden_layers": 1, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 128, "vocab_size": 8,
        }))
        .expect("config")
    }

    /// A layer with random weights (and biases where asked) and random adapters, B included,
    /// so every adapter contributes to the output.
    fn layer(
        cfg: &Config,
        qkv_bias: bool,
        o_bias: bool,
        targets: &[&str],
        dropout: f32,
    ) -> Result<(DecoderLayer, VarMap)> {
        let dev = Device::Cpu;
        let d = cfg.head_dim();
        let (q, kv) = (HEADS * d, KV_HEADS * d);
        let mut w = HashMap::new();
        let mut put = |name: &str, shape: &[usize], std: f32, mean: f32| -> Result<()> {
            w.insert(
                name.to_string(),
                (Tensor::randn(0f32, std, shape, &dev)? + f64::from(mean))?,
            );
            Ok(())
        };
        for (name, out, inp) in [
            ("self_attn.q_proj", q, HIDDEN),
            ("self_attn.k_proj", kv, HIDDEN),
            ("self_attn.v_proj", kv, HIDDEN),
            ("self_attn.o_proj", HIDDEN, q),
            ("mlp.gate_proj", FFN, HIDDEN),
            ("mlp.up_proj", FFN, HIDDEN),
            ("mlp.down_proj", HIDDEN, FFN),
        ] {
            put(&format!("{name}.weight"), &[out, inp], 0.3, 0.0)?;
            let biased = if name.ends_with("o_proj") {
                o_bias
            } else {
                qkv_bias
            };
            if biased && name.starts_with("self_attn") {
                put(&format!("{name}.bias"), &[out], 0.5, 0.0)?;
            }
        }
        put("input_layernorm.weight", &[HIDDEN], 0.1, 1.0)?;
        put("post_attention_layernorm.weight", &[HIDDEN], 0.1, 1.0)?;
        let varmap = VarMap::new();
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout,
            use_rslora: false,
            target_modules: targets.iter().map(|s| s.to_string()).collect(),
            base_model_name_or_path: "test".into(),
        };
        let vb = VarBuilder::from_tensors(w, DType::F32, &dev);
        let vb = LoraVarBuilder::with_lora(vb, &varmap, lora).expect("lora builder");
        let layer = DecoderLayer::with_biases(vb, cfg, qkv_bias, o_bias).expect("layer");
        for (name, var) in varmap.data().lock().expect("varmap").iter() {
            if name.contains("lora_B") {
                var.set(&Tensor::randn(0f32, 0.3, var.shape(), &dev)?)?;
            }
        }
        Ok((layer, varmap))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The fused node agrees with the same layer run op by op through candle and its autograd
    /// on the output and on the gradients of the input and of every adapter tensor:
    /// two packed rows of several query blocks, grouped-query heads, with and without biases.
    fn fused_matches_per_op(
        model_type: &str,
        qkv_bias: bool,
        o_bias: bool,
        targets: &[&str],
    ) -> Result<()> {
        fused_matches_per_op_dropout(model_type, qkv_bias, o_bias, targets, 0.0)
    }

    /// As above with the adapters' `dropout`, both paths drawing their masks from the same
    /// seeded stream.
    fn fused_matches_per_op_dropout(
        model_type: &str,
        qkv_bias: bool,
        o_bias: bool,
        targets: &[&str],
        dropout: f32,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let cfg = config(model_type);
        let (layer, varmap) = layer(&cfg, qkv_bias, o_bias, targets, dropout)?;
        let t = 70;
        let segments: Vec<Vec<u32>> = vec![
            (0..t).map(|i| u32::from(i >= 45)).collect(),
            (0..t).map(|i| (i / 20) as u32).collect(),
        ];
        let packing = Packing::from_segments(&segments, None, &dev).expect("packing");
        let rotary = RotaryEmbedding::new(&cfg, &dev).expect("rotary");
        let (cos, sin) = rotary
            .tables(&packing.position_ids, DType::F32)
            .expect("tables");
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, t, HIDDEN), &dev)?)?;
        let upstream = Tensor::randn(0f32, 1.0, (2, t, HIDDEN), &dev)?;
        let run = |fused: bool| -> Result<(Tensor, candle_core::backprop::GradStore)> {
            crate::model::lora::seed_dropout(Some(99));
            let inputs = LayerInputs {
                cos: &cos,
                sin: &sin,
                packing: &packing,
                mask: std::cell::OnceCell::new(),
                fused: if fused {
                    Some(LayerContext::new(&packing, &cos, &sin)?)
                } else {
                    None
                },
                train: true,
            };
            let y = if fused {
                let ctx = inputs.fused.as_ref().expect("context");
                decoder_layer(x.as_tensor(), &layer.refs(), ctx, true)?
                    .expect("the fused node applies")
            } else {
                layer
                    .forward(x.as_tensor(), &inputs)
                    .expect("per-op forward")
            };
            let grads = (&y * &upstream)?.sum_all()?.backward()?;
            Ok((y, grads))
        };
        let (yf, gf) = run(true)?;
        let (yr, gr) = run(false)?;
        assert!(max_diff(&yf, &yr)? < 1e-4, "outputs differ");
        let grad = |g: &candle_core::backprop::GradStore, t: &Tensor| {
            g.get(t).cloned().expect("gradient present")
        };
        let dx = max_diff(&grad(&gf, x.as_tensor()), &grad(&gr, x.as_tensor()))?;
        assert!(dx < 1e-3, "input gradients differ by {dx}");
        let vars = varmap.data().lock().expect("varmap").clone();
        assert_eq!(vars.len(), 2 * targets.len());
        for (name, var) in &vars {
            let (a, b) = (grad(&gf, var.as_tensor()), grad(&gr, var.as_tensor()));
            let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
            let diff = max_diff(&a, &b)?;
            assert!(diff < 1e-3 * scale, "{name}: gradients differ by {diff}");
        }
        Ok(())
    }

    #[test]
    fn fused_layer_matches_per_op_llama() -> Result<()> {
        fused_matches_per_op("llama", false, false, &ALL_TARGET_MODULES)
    }

    #[test]
    fn fused_layer_matches_per_op_with_biases() -> Result<()> {
        fused_matches_per_op("qwen2", true, false, &ALL_TARGET_MODULES)?;
        fused_matches_per_op("llama", true, true, &ALL_TARGET_MODULES)
    }

    /// Adapter dropout: the merged-weight path plus a per-projection correction for the
    /// dropped-out input equals the per-op path, which applies the same masks to the input.
    #[test]
    fn fused_layer_matches_per_op_with_dropout() -> Result<()> {
        fused_matches_per_op_dropout("llama", false, false, &ALL_TARGET_MODULES, 0.3)?;
        let some = ["q_proj", "v_proj", "up_proj", "down_proj"];
        fused_matches_per_op_dropout("qwen2", true, false, &some, 0.1)
    }

    /// Adapters on a subset of the projections (PEFT's Llama default, and one with a gap in
    /// each stacked group), and none at all.
    #[test]
    fn fused_layer_matches_per_op_on_target_subsets() -> Result<()> {
        fused_matches_per_op("llama", false, false, &["q_proj", "v_proj"])?;
        fused_matches_per_op("qwen2", true, false, &["k_proj", "up_proj", "down_proj"])?;
        fused_matches_per_op("llama", false, false, &[])
    }

    /// Without a saved forward state (evaluation mode), the backward pass recomputes it.
    #[test]
    fn fused_layer_backward_without_saved_state() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = config("llama");
        let (layer, _varmap) = layer(&cfg, false, false, &ALL_TARGET_MODULES, 0.0)?;
        let packing = Packing::causal(1, 40, &dev).expect("packing");
        let rotary = RotaryEmbedding::new(&cfg, &dev).expect("rotary");
        let (cos, sin) = rotary
            .tables(&packing.position_ids, DType::F32)
            .expect("tables");
        let ctx = LayerContext::new(&packing, &cos, &sin)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 40, HIDDEN), &dev)?)?;
        let kept = decoder_layer(x.as_tensor(), &layer.refs(), &ctx, true)?.expect("fused");
        let lost = decoder_layer(x.as_tensor(), &layer.refs(), &ctx, false)?.expect("fused");
        assert_eq!(max_diff(&kept, &lost)?, 0.0);
        let gk = kept.sum_all()?.backward()?;
        let gl = lost.sum_all()?.backward()?;
        let (a, b) = (gk.get(x.as_tensor()), gl.get(x.as_tensor()));
        let (Some(a), Some(b)) = (a, b) else {
            panic!("missing input gradient");
        };
        assert_eq!(max_diff(a, b)?, 0.0);
        Ok(())
    }
}
