//! One engine step: the decoder run over the new tokens of many sequences at once, each
//! attending to its own KV cache.
//!
//! The rows of a step are the new tokens of every scheduled sequence, one after another: a
//! whole prompt chunk for a sequence being prefilled, one token for a sequence being decoded.
//! Projections are one GEMM over all rows (a decode step of 32 sequences is a `32 x hidden`
//! product instead of 32 matrix-vector products), and attention runs per row against that
//! row's own cache.
//!
//! **Batch invariance.** Every value a row gets depends on that row's token, position and
//! cache alone, never on what else is in the step:
//! - each output of a projection is one fused multiply-add chain over `k` in order
//!   ([`crate::kernels::panel`]; Q8_0: one block dot product per output), whatever the number
//!   of rows;
//! - attention, RMSNorm, RoPE and SwiGLU are computed row by row, in an order fixed by the
//!   row's own length, the same code for a prompt row and a decoded row.
//!
//! So a sequence decodes the same tokens alone or among 31 others, prefilled in one chunk or
//! in several, and its decoding log-probabilities equal a teacher-forced scoring of the same
//! tokens (tests/infer_engine.rs checks all three).

use rayon::prelude::*;

use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};

use super::weights::{quantize_rows, LayerWeights, Matrix, Weights};
use crate::kernels::ops::{dot, norm_rows, rope_rows, sigmoid, softmax_in_place};
use crate::model::push_rope_row;

/// Keys and values of one sequence: per layer, one row of `kv` floats per cached position.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            len: 0,
        }
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every cached position and releases the memory.
    pub fn clear(&mut self) {
        for b in self.k.iter_mut().chain(self.v.iter_mut()) {
            *b = Vec::new();
        }
        self.len = 0;
    }
}

/// Which rows of a chunk need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt chunk that is not the last).
    None,
    /// The chunk's last row (decoding).
    Last,
    /// Every row (teacher-forced scoring).
    All,
}

/// The new tokens of one sequence in a step.
#[derive(Debug, Clone)]
pub struct Chunk<'a> {
    /// Index of the sequence's cache in the slice passed to [`forward`].
    pub cache: usize,
    /// Tokens at positions `cache.len()..cache.len() + tokens.len()`.
    pub tokens: &'a [u32],
    /// Rows whose logits are wanted.
    pub logits: Logits,
    /// Whether to return this chunk's hidden states at the requested layers.
    pub hidden: bool,
}

/// What a step returns.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// Logits of the wanted rows, `vocab` floats each, in chunk then row order.
    pub logits: Vec<f32>,
    /// Per requested layer, the hidden states (after that layer) of every row of the chunks
    /// that asked for them, `hidden` floats each, in chunk then row order.
    pub hidden: Vec<Vec<f32>>,
}

/// `y (m x n) = x (m x k) W^T (+ y when accumulate) (+ bias)`, W `(n, k)`, in whichever
/// format the engine holds it.
fn linear(x: &[f32], w: &Matrix, k: usize, bias: Option<&[f32]>, y: &mut [f32], accumulate: bool) {
    match w {
        Matrix::F32(w) => w.matmul(x, bias, y, accumulate),
        Matrix::F16(w) => w.matmul(x, bias, y, accumulate),
        Matrix::Q4(w) => w.matmul(x, bias, y, accumulate),
        Matrix::Q8_0(w) => linear_q8_0(x, w, k, bias, y, accumulate),
    }
}

/// The Q8_0 product: each row of `x` quantized to Q8_0 blocks on its own, then every output
/// an integer dot product of two block rows (candle's AVX2 `vec_dot`), so a row's outputs never
/// depend on the other rows. Columns are split across threads in blocks, and within a block
/// each weight row is read once and dotted with every activation row: the weights stream
/// through memory once per step, however many sequences it holds.
fn linear_q8_0(
    x: &[f32],
    w: &[BlockQ8_0],
    k: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    accumulate: bool,
) {
    const COLS: usize = 32;
    let kb = k / 32;
    let n = w.len() / kb;
    let m = x.len() / k;
    let xq = quantize_rows(x, k);
    // `t` is `(n, m)`: one column of outputs per weight row.
    let mut t = vec![0f32; n * m];
    t.par_chunks_mut(COLS * m)
        .zip(w.par_chunks(COLS * kb))
        .for_each(|(out, wb)| {
            for (o, wr) in out.chunks_mut(m).zip(wb.chunks(kb)) {
                for (v, xr) in o.iter_mut().zip(xq.chunks(kb)) {
                    *v = BlockQ8_0::vec_dot(k, wr, xr);
                }
            }
        });
    y.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        for (c, v) in row.iter_mut().enumerate() {
            let dot = t[c * m + r];
            let sum = if accumulate { *v + dot } else { dot };
            *v = sum + bias.map_or(0.0, |b| b[c]);
        }
    });
}

/// cos/sin of every row's position, `(rows, half)` each, computed as the training tables are.
fn rope_tables(inv_freq: &[f64], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        push_rope_row(inv_freq, p, &mut cos, &mut sin);
    }
    (cos, sin)
}

/// One row's attention for one key/value head: the `group` query heads that share it over
/// the row's cached positions.
#[derive(Clone, Copy)]
struct GroupAttention<'a> {
    /// The group's query heads, `group * d`.
    qs: &'a [f32],
    /// The sequence's cached keys and values for this layer, `kvw` per position.
    keys: &'a [f32],
    values: &'a [f32],
    /// Positions attended to (the row's own included).
    n_keys: usize,
    /// The key/value head.
    g: usize,
    /// Width of one cached position (every key/value head).
    kvw: usize,
    scale: f32,
}

/// Runs `a` into `out` (`group * d`). Each key and value is read once for the whole group;
/// head widths of 64 and 128 run with the width known at compile time, so that a head's output
/// stays in registers while the values stream past.
fn attend_group(a: GroupAttention<'_>, d: usize, out: &mut [f32]) {
    match d {
        64 => attend_group_d::<8>(a, out),
        128 => attend_group_d::<16>(a, out),
        d => attend_group_any(a, d, out),
    }
}

/// [`attend_group`] for a head width of `C` vectors of 8, known at compile time: AVX2 where
/// the CPU has it, else the portable loop.
fn attend_group_d<const C: usize>(a: GroupAttention<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if a.kvw.is_multiple_of(8)
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: AVX2 and FMA were detected.
        unsafe { attend_avx2::<C>(a, out) };
        return;
    }
    attend_group_any(a, 8 * C, out)
}

/// Scores: per key, its `8 C` values loaded once and dotted with each query head; outputs:
/// per head, `C` accumulators kept in registers while the values stream past. Vectors are
/// loaded and stored as `[f32; 8]` values, which compile to plain vector moves.
///
/// # Safety
/// AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2<const C: usize>(a: GroupAttention<'_>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    use std::mem::transmute;
    let GroupAttention {
        qs,
        keys,
        values,
        n_keys,
        g,
        kvw,
        scale,
    } = a;
    let group = qs.len() / (8 * C);
    let w8 = kvw / 8;
    let (q8, _) = qs.as_chunks::<8>();
    let (k8, _) = keys.as_chunks::<8>();
    let (v8, _) = values.as_chunks::<8>();
    let mut s = vec![0f32; group * n_keys];
    for j in 0..n_keys {
        let key = &k8[j * w8 + g * C..j * w8 + g * C + C];
        for (h, q) in q8.chunks_exact(C).enumerate() {
            let mut acc = _mm256_setzero_ps();
            for (qc, kc) in q.iter().zip(key) {
                acc = _mm256_fmadd_ps(
                    transmute::<[f32; 8], __m256>(*qc),
                    transmute::<[f32; 8], __m256>(*kc),
                    acc,
                );
            }
            // Horizontal sum of the 8 lanes.
            let x = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
            let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
            let x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
            s[h * n_keys + j] = _mm_cvtss_f32(x) * scale;
        }
    }
    let (o8, _) = out.as_chunks_mut::<8>();
    for (h, o) in o8.chunks_exact_mut(C).enumerate() {
        let p = &mut s[h * n_keys..(h + 1) * n_keys];
        softmax_in_place(p);
        let mut acc = [_mm256_setzero_ps(); C];
        for (j, &pj) in p.iter().enumerate() {
            let v = &v8[j * w8 + g * C..j * w8 + g * C + C];
            let pv = _mm256_set1_ps(pj);
            for (a, vc) in acc.iter_mut().zip(v) {
                *a = _mm256_fmadd_ps(pv, transmute::<[f32; 8], __m256>(*vc), *a);
            }
        }
        for (dst, a) in o.iter_mut().zip(acc) {
            *dst = transmute::<__m256, [f32; 8]>(a);
        }
    }
}

/// [`attend_group`] for any head width `d`.
fn attend_group_any(a: GroupAttention<'_>, d: usize, out: &mut [f32]) {
    let (n_keys, g, kvw) = (a.n_keys, a.g, a.kvw);
    let group = a.qs.len() / d;
    let mut s = vec![0f32; group * n_keys];
    for j in 0..n_keys {
        let key = &a.keys[j * kvw + g * d..j * kvw + g * d + d];
        for (h, q) in a.qs.chunks_exact(d).enumerate() {
            s[h * n_keys + j] = dot(q, key) * a.scale;
        }
    }
    for (h, o) in out.chunks_exact_mut(d).enumerate() {
        let p = &mut s[h * n_keys..(h + 1) * n_keys];
        softmax_in_place(p);
        o.iter_mut().for_each(|v| *v = 0.0);
        for (j, &pj) in p.iter().enumerate() {
            let v = &a.values[j * kvw + g * d..j * kvw + g * d + d];
            for (o, v) in o.iter_mut().zip(v) {
                *o += pj * v;
            }
        }
    }
}

/// Runs one step. `caches[c.cache]` must be distinct for every chunk; each gains the chunk's
/// keys and values. Positions past the model's rotary range are refused by the caller.
///
/// The step runs on a thread of the rayon pool (`rayon::scope` moves it there once when called
/// from outside the pool, and runs it in place on a worker), so that its hundreds of parallel
/// loops start on a worker instead of each being handed to the pool and waited for: about a
/// fifth of a one-sequence step went to those hand-offs.
pub fn forward(
    w: &Weights,
    chunks: &[Chunk<'_>],
    caches: &mut [KvCache],
    hidden_layers: &[usize],
) -> StepOutput {
    rayon::scope(|_| forward_on_pool(w, chunks, caches, hidden_layers))
}

/// [`forward`], on a thread of the pool.
fn forward_on_pool(
    w: &Weights,
    chunks: &[Chunk<'_>],
    caches: &mut [KvCache],
    hidden_layers: &[usize],
) -> StepOutput {
    let dims = w.dims;
    let (h, qn, kvw, qkvw, inter) = (dims.hidden, dims.q(), dims.kv(), dims.qkv(), dims.inter);
    // Row bookkeeping: for every row, its chunk, its position and its key count.
    let mut tokens = Vec::new();
    let mut positions = Vec::new();
    let mut row_chunk = Vec::new();
    for (ci, c) in chunks.iter().enumerate() {
        let start = caches[c.cache].len;
        for (i, &t) in c.tokens.iter().enumerate() {
            tokens.push(t);
            positions.push(start + i);
            row_chunk.push(ci);
        }
    }
    let rows = tokens.len();
    let mut out = StepOutput {
        logits: Vec::new(),
        hidden: vec![Vec::new(); hidden_layers.len()],
    };
    if rows == 0 {
        return out;
    }
    let (cos, sin) = rope_tables(&w.inv_freq, &positions);
    let half = dims.d / 2;
    let mut x = vec![0f32; rows * h];
    x.par_chunks_mut(h).zip(&tokens).for_each(|(row, &t)| {
        let t = t as usize;
        row.copy_from_slice(&w.embed[t * h..(t + 1) * h]);
    });
    let scale = 1.0 / (dims.d as f32).sqrt();
    let group = dims.nh / dims.nkv;
    let mut qkv = vec![0f32; rows * qkvw];
    let mut y = vec![0f32; rows * qn];
    let mut gu = vec![0f32; rows * 2 * inter];
    let mut act = vec![0f32; rows * inter];
    for (li, lw) in w.layers.iter().enumerate() {
        let LayerWeights {
            ln1,
            ln2,
            eps1,
            eps2,
            ..
        } = lw;
        // Attention block.
        let h1 = norm_rows(&x, ln1, *eps1);
        linear(&h1, &lw.qkv, h, lw.qkv_bias.as_deref(), &mut qkv, false);
        rope_rows(
            &mut qkv,
            qkvw,
            dims.nh + dims.nkv,
            half,
            (&cos, &sin),
            false,
        );
        // Append this step's keys and values to each sequence's cache.
        for (r, row) in qkv.chunks(qkvw).enumerate() {
            let c = &mut caches[chunks[row_chunk[r]].cache];
            c.k[li].extend_from_slice(&row[qn..qn + kvw]);
            c.v[li].extend_from_slice(&row[qn + kvw..]);
        }
        {
            let caches: &[KvCache] = caches;
            let qkv = &qkv;
            let (positions, row_chunk) = (&positions, &row_chunk);
            let gw = group * dims.d;
            y.par_chunks_mut(gw).enumerate().for_each(|(i, o)| {
                let (r, g) = (i / dims.nkv, i % dims.nkv);
                let c = &caches[chunks[row_chunk[r]].cache];
                let qs = &qkv[r * qkvw + g * gw..r * qkvw + (g + 1) * gw];
                let n_keys = positions[r] + 1;
                let a = GroupAttention {
                    qs,
                    keys: &c.k[li],
                    values: &c.v[li],
                    n_keys,
                    g,
                    kvw,
                    scale,
                };
                attend_group(a, dims.d, o);
            });
        }
        linear(&y, &lw.o, qn, lw.o_bias.as_deref(), &mut x, true);
        // MLP block.
        let h2 = norm_rows(&x, ln2, *eps2);
        linear(&h2, &lw.gu, h, lw.gu_bias.as_deref(), &mut gu, false);
        act.par_chunks_mut(inter)
            .zip(gu.par_chunks(2 * inter))
            .for_each(|(a, row)| {
                let (g, u) = row.split_at(inter);
                for ((a, g), u) in a.iter_mut().zip(g).zip(u) {
                    *a = g * sigmoid(*g) * u;
                }
            });
        linear(&act, &lw.down, inter, lw.down_bias.as_deref(), &mut x, true);
        if let Some(slot) = hidden_layers.iter().position(|&l| l == li) {
            for (r, row) in x.chunks(h).enumerate() {
                if chunks[row_chunk[r]].hidden {
                    out.hidden[slot].extend_from_slice(row);
                }
            }
        }
    }
    for c in chunks {
        caches[c.cache].len += c.tokens.len();
    }
    // Final norm and logits for the wanted rows only.
    let mut wanted = Vec::new();
    let mut r0 = 0;
    for c in chunks {
        let n = c.tokens.len();
        match c.logits {
            Logits::None => {}
            Logits::Last => wanted.extend_from_slice(&x[(r0 + n - 1) * h..(r0 + n) * h]),
            Logits::All => wanted.extend_from_slice(&x[r0 * h..(r0 + n) * h]),
        }
        r0 += n;
    }
    if !wanted.is_empty() {
        let normed = norm_rows(&wanted, &w.norm, w.norm_eps);
        let m = normed.len() / h;
        // Logits in blocks of rows, so scoring a long sequence never holds more than a block's
        // `rows x vocab` product besides the output.
        const BLOCK: usize = 64;
        out.logits = vec![0f32; m * dims.vocab];
        for (xb, lb) in normed
            .chunks(BLOCK * h)
            .zip(out.logits.chunks_mut(BLOCK * dims.vocab))
        {
            linear(xb, &w.head, h, None, lb, false);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::panel::uniform;

    /// The vector path (head widths 64 and 128) and the portable one compute the same
    /// attention, and both match softmax-weighted values computed in f64.
    #[test]
    fn grouped_attention_paths_agree_with_the_definition() {
        for (d, nkv, group, n_keys) in [(64, 3, 3, 37), (128, 2, 4, 5), (64, 1, 1, 1)] {
            let kvw = nkv * d;
            let keys = uniform(n_keys * kvw, 1);
            let values = uniform(n_keys * kvw, 2);
            let qs = uniform(group * d, 3);
            let scale = 1.0 / (d as f32).sqrt();
            for g in 0..nkv {
                let a = GroupAttention {
                    qs: &qs,
                    keys: &keys,
                    values: &values,
                    n_keys,
                    g,
                    kvw,
                    scale,
                };
                let mut fast = vec![0f32; group * d];
                let mut portable = vec![0f32; group * d];
                attend_group(a, d, &mut fast);
                attend_group_any(a, d, &mut portable);
                for h in 0..group {
                    let q = &qs[h * d..(h + 1) * d];
                    let scores: Vec<f64> = (0..n_keys)
                        .map(|j| {
                            let k = &keys[j * kvw + g * d..j * kvw + g * d + d];
                            q.iter().zip(k).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale as f64
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::MIN, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    for i in 0..d {
                        let want: f64 = (0..n_keys)
                            .map(|j| {
                                (scores[j] - max).exp() / z * values[j * kvw + g * d + i] as f64
                            })
                            .sum();
                        for (name, got) in [("fast", &fast), ("portable", &portable)] {
                            let v = got[h * d + i] as f64;
                            assert!(
                                (v - want).abs() < 1e-5,
                                "{name}, d {d}, head {h}, lane {i}: {v} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
