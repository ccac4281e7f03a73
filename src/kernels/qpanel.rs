//! Products against 4-bit weights with 8-bit activations: the inference engine's fastest
//! format for many sequences at once.
//!
//! With 32 sequences a decode step is compute-bound, and on AVX2 an f32 fused multiply-add
//! does 8 multiply-adds per instruction. `vpmaddubsw` multiplies 32 unsigned bytes by 32
//! signed bytes and adds neighbouring pairs: 32 multiply-adds per instruction, exact in
//! integers. So the weights are held as 4-bit codes `q` in `0..=15` with a scale `d` and a
//! minimum `m` per block of [`QK`] along `k` (`w = d q + m`, llama.cpp's Q4_1), and each
//! activation row is quantized per block to 8-bit codes `x = dx xq`, `xq` in `-127..=127`.
//! The block's dot product is then
//!
//! `sum w x = d dx sum(q xq) + m (dx sum xq)`
//!
//! with `sum(q xq)` an exact integer. Eight `vpmaddubsw` of a block fit a 16-bit lane
//! (`8 * 2 * 15 * 127 = 30480`), so a block costs one widening per lane.
//!
//! **Weights.** A GGUF's Q4_1 tensors come back exactly: llama.cpp's Q4_1 quantizer sets a
//! block's minimum to its smallest weight and its scale to `(max - min) / 15`, both f16, and
//! [`QPanels::quantize`] recovers both from the dequantized block (tested). Weights from any
//! other source (f32, bf16, other GGUF types) are quantized the same way, which rounds them.
//!
//! **Arithmetic.** Every output is, over its blocks in order from zero,
//! `acc = fma(float(sum(q xq)), d * dx, acc); acc = fma(m, dx * float(sum xq), acc)`, from
//! that row of `x` and that row of `W` alone: batch-invariant by construction, and the
//! portable path gives the vector path's bits.

use half::f16;
use rayon::prelude::*;

use super::panel::{drive, Operands, NR};

/// Weights per block along `k`, each with its own scale and minimum.
pub const QK: usize = 32;
/// `k` steps of 4 bytes per block.
const STEPS: usize = QK / 4;
/// Activation rows per micro-tile (eight 16-bit accumulators, two weight vectors, a
/// broadcast and the nibble mask stay in registers).
const MR: usize = 4;

/// One block of [`QK`] along `k` for one panel of [`NR`] output rows.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct QBlock {
    /// Step `s` covers `k` in `4 s .. 4 s + 4`: byte `j` holds, in its low nibble, the code
    /// of row `j / 4` at `k = 4 s + j % 4`, and in its high nibble that of row `8 + j / 4`.
    q: [[u8; 32]; STEPS],
    /// Each row's scale (an f16 value).
    d: [f32; NR],
    /// Each row's minimum (an f16 value).
    m: [f32; NR],
}

impl QBlock {
    /// Where row `i`'s codes sit in every step: the offset of its four bytes, and the shift of
    /// its nibble within them.
    fn slot(i: usize) -> (usize, u32) {
        ((i % 8) * 4, if i < 8 { 0 } else { 4 })
    }

    /// Row `i`'s code at `kk` within the block.
    fn code(&self, i: usize, kk: usize) -> u8 {
        let (byte, shift) = Self::slot(i);
        (self.q[kk / 4][byte + kk % 4] >> shift) & 0x0f
    }
}

/// One block of [`QK`] along `k` for a tile of [`MR`] activation rows.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(32))]
struct XBlock {
    /// Row `r`, step `s`: the row's four codes at `k = 4 s ..`, as the bytes of an `i32`.
    q: [[i32; STEPS]; MR],
    /// Each row's scale `dx`.
    d: [f32; MR],
    /// Each row's `dx * sum(xq)`.
    s: [f32; MR],
}

/// An `(n, k)` weight matrix as 4-bit codes in panels of [`NR`] rows: panel `p` is
/// `blocks[p * k / QK .. (p + 1) * k / QK]`. Rows past `n` in the last panel are zeros.
#[derive(Debug, Clone)]
pub struct QPanels {
    n: usize,
    k: usize,
    blocks: Vec<QBlock>,
}

/// A block's scale and minimum, as f16 values, and its codes: the scale spans the block's
/// range in 15 steps from its minimum.
fn quantize_block(v: &[f32], q: &mut [u8]) -> (f32, f32) {
    let (lo, hi) = v
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    let m = f16::from_f32(lo).to_f32();
    let d = f16::from_f32((hi - lo) / 15.0).to_f32();
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (c, &x) in q.iter_mut().zip(v) {
        *c = ((x - m) * id).round().clamp(0.0, 15.0) as u8;
    }
    (d, m)
}

impl QPanels {
    /// Quantizes `w`, `(n, k)` row-major, `k` a multiple of [`QK`].
    pub fn quantize(w: &[f32], k: usize) -> Self {
        assert!(
            k > 0 && k.is_multiple_of(QK) && w.len().is_multiple_of(k),
            "quantize: {} is not rows of {k}, a multiple of {QK}",
            w.len()
        );
        let n = w.len() / k;
        let kb = k / QK;
        let empty = QBlock {
            q: [[0; 32]; STEPS],
            d: [0.0; NR],
            m: [0.0; NR],
        };
        let mut blocks = vec![empty; n.div_ceil(NR) * kb];
        blocks
            .par_chunks_mut(kb)
            .enumerate()
            .for_each(|(p, panel)| {
                let mut codes = [0u8; QK];
                for i in 0..NR.min(n - p * NR) {
                    let row = &w[(p * NR + i) * k..(p * NR + i + 1) * k];
                    for (b, blk) in panel.iter_mut().enumerate() {
                        let (d, m) = quantize_block(&row[b * QK..(b + 1) * QK], &mut codes);
                        blk.d[i] = d;
                        blk.m[i] = m;
                        let (byte, shift) = QBlock::slot(i);
                        for (kk, &c) in codes.iter().enumerate() {
                            blk.q[kk / 4][byte + kk % 4] |= c << shift;
                        }
                    }
                }
            });
        Self { n, k, blocks }
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
        std::mem::size_of::<QBlock>() * self.blocks.len()
    }

    /// The code, scale and minimum of weight `(row, kk)`.
    fn code(&self, row: usize, kk: usize) -> (u8, f32, f32) {
        let blk = &self.blocks[(row / NR) * (self.k / QK) + kk / QK];
        let i = row % NR;
        (blk.code(i, kk % QK), blk.d[i], blk.m[i])
    }

    /// The weight at `(row, kk)`: `q d + m`, as llama.cpp's Q4_1 dequantizes it.
    pub fn get(&self, row: usize, kk: usize) -> f32 {
        let (q, d, m) = self.code(row, kk);
        q as f32 * d + m
    }

    /// The matrix as `(n, k)` row-major f32, each weight as [`QPanels::get`] gives it.
    pub fn unpack(&self) -> Vec<f32> {
        let k = self.k;
        let mut out = vec![0f32; self.n * k];
        out.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
            for (kk, v) in row.iter_mut().enumerate() {
                *v = self.get(r, kk);
            }
        });
        out
    }

    /// `y (m x n) = x (m x k) W^T`, plus `y` when `accumulate`, plus `bias`; `m` is
    /// `x.len() / k`. Each output is `(y +) dot + bias`, the dot computed as the module docs say.
    pub fn matmul(&self, x: &[f32], bias: Option<&[f32]>, y: &mut [f32], accumulate: bool) {
        let tile = tile_fn();
        drive(
            &self.blocks,
            (self.n, self.k),
            MR,
            Operands {
                x,
                bias,
                y,
                accumulate,
            },
            |x, out| quantize_rows(x, self.k, out),
            |w, x, rows, buf| tile(w, x, rows, buf.try_into().expect("a tile")),
        );
    }
}

/// Quantizes rows of `x` (width `k`) per block of [`QK`], each row on its own, into tiles of
/// [`MR`] rows: tile `t` is `out[t * k / QK .. (t + 1) * k / QK]`; rows past the end are zeros.
fn quantize_rows(x: &[f32], k: usize, out: &mut Vec<XBlock>) {
    let (m, kb) = (x.len() / k, k / QK);
    let block = block_fn();
    // Each block built once and moved into place: no pass to zero the buffer first.
    (0..m.div_ceil(MR) * kb)
        .into_par_iter()
        .map(|i| {
            let (t, b) = (i / kb, i % kb);
            let mut blk = XBlock::default();
            for r in 0..MR.min(m - t * MR) {
                let at = (t * MR + r) * k + b * QK;
                let v = x[at..at + QK].try_into().expect("a block");
                let (d, sum) = block(v, &mut blk.q[r]);
                blk.d[r] = d;
                blk.s[r] = d * sum as f32;
            }
            blk
        })
        .collect_into_vec(out);
}

/// Rounds one block of activations to codes `round(x / d)`, `d = max |x| / 127`, ties to
/// even, the codes as the bytes of `STEPS` `i32`s; returns `d` and the codes' sum.
type BlockFn = fn(&[f32; QK], &mut [i32; STEPS]) -> (f32, i32);

/// The fastest block quantizer this CPU runs.
fn block_fn() -> BlockFn {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present.
        return |v, q| unsafe { quantize_block_avx2(v, q) };
    }
    quantize_block_portable
}

/// The scale of a block whose largest magnitude is `amax`, and its reciprocal (0 for an
/// all-zero block).
fn act_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

fn quantize_block_portable(v: &[f32; QK], q: &mut [i32; STEPS]) -> (f32, i32) {
    let (d, id) = act_scale(v.iter().fold(0f32, |a, x| a.max(x.abs())));
    let mut sum = 0i32;
    for (q, four) in q.iter_mut().zip(v.chunks_exact(4)) {
        let mut bytes = [0u8; 4];
        for (b, &x) in bytes.iter_mut().zip(four) {
            let c = (x * id).round_ties_even().clamp(-127.0, 127.0) as i8;
            sum += i32::from(c);
            *b = c as u8;
        }
        *q = i32::from_le_bytes(bytes);
    }
    (d, sum)
}

/// [`quantize_block_portable`] in vectors: `vcvtps2dq` rounds ties to even, as the portable
/// path does, so both give the same codes.
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(v: &[f32; QK], q: &mut [i32; STEPS]) -> (f32, i32) {
    use std::arch::x86_64::*;
    use std::mem::transmute;
    let v = transmute::<[f32; QK], [[f32; 8]; 4]>(*v).map(|a| transmute::<[f32; 8], __m256>(a));
    let sign = _mm256_set1_ps(-0.0);
    let abs = v.map(|a| _mm256_andnot_ps(sign, a));
    let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    let (d, id) = act_scale(_mm_cvtss_f32(m));
    let idv = _mm256_set1_ps(id);
    let c = v.map(|a| _mm256_cvtps_epi32(_mm256_mul_ps(a, idv)));
    // Every code is within -127..=127, so the saturating packs keep it; they interleave the
    // 128-bit lanes, which the permute puts back in order.
    let w = _mm256_packs_epi16(
        _mm256_packs_epi32(c[0], c[1]),
        _mm256_packs_epi32(c[2], c[3]),
    );
    let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    *q = transmute::<__m256i, [i32; STEPS]>(w);
    let s = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    (d, _mm_cvtsi128_si32(s))
}

/// A micro-tile: the first `rows <= MR` rows of a quantized tile against one panel, into
/// `out` (`rows x NR`).
type TileFn = fn(&[QBlock], &[XBlock], usize, &mut [f32; MR * NR]);

/// The fastest tile this CPU runs (the check is a cached load).
fn tile_fn() -> TileFn {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return tile_avx2;
    }
    tile_portable
}

/// The portable tile: the same integer sums and the same fused chains, so the same bits.
fn tile_portable(w: &[QBlock], x: &[XBlock], rows: usize, out: &mut [f32; MR * NR]) {
    for r in 0..rows {
        let acc = &mut out[r * NR..(r + 1) * NR];
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (wb, xb) in w.iter().zip(x) {
            for (i, a) in acc.iter_mut().enumerate() {
                let mut dot = 0i32;
                for s in 0..STEPS {
                    let xs = xb.q[r][s].to_le_bytes();
                    for (j, &xc) in xs.iter().enumerate() {
                        dot += wb.code(i, 4 * s + j) as i32 * xc as i8 as i32;
                    }
                }
                *a = (dot as f32).mul_add(wb.d[i] * xb.d[r], *a);
                *a = wb.m[i].mul_add(xb.s[r], *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn tile_avx2(w: &[QBlock], x: &[XBlock], rows: usize, out: &mut [f32; MR * NR]) {
    assert_eq!(w.len(), x.len());
    // SAFETY: `tile_fn` picked this path only where the CPU has AVX2 and FMA.
    unsafe {
        match rows {
            1 => tile_rows::<1>(w, x, out),
            2 => tile_rows::<2>(w, x, out),
            3 => tile_rows::<3>(w, x, out),
            _ => tile_rows::<MR>(w, x, out),
        }
    }
}

/// Blocks whose integer sums a tile gathers before folding them into its float accumulators.
#[cfg(target_arch = "x86_64")]
const CHUNK: usize = 6;

/// `R` rows against one panel, in chunks of [`CHUNK`] blocks and two passes per chunk, so
/// that neither pass needs more than the 16 vector registers. The integer pass: per step,
/// one load of 32 bytes split into the two nibble vectors, `R` broadcasts of four
/// activation codes and `2 R` `vpmaddubsw` summed in 16 bits; per block, the sums widened to
/// 32 bits and set aside. The float pass: per block, the scale and the minimum per
/// accumulator.
///
/// # Safety
/// AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_rows<const R: usize>(w: &[QBlock], x: &[XBlock], out: &mut [f32; MR * NR]) {
    use std::arch::x86_64::*;
    use std::mem::transmute;
    let nibble = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    let mut sums = [[[_mm256_setzero_si256(); 2]; R]; CHUNK];
    for (wc, xc) in w.chunks(CHUNK).zip(x.chunks(CHUNK)) {
        for ((wb, xb), sum) in wc.iter().zip(xc).zip(sums.iter_mut()) {
            let mut ilo = [_mm256_setzero_si256(); R];
            let mut ihi = [_mm256_setzero_si256(); R];
            for s in 0..STEPS {
                // By-value transmutes of aligned arrays: plain vector loads, no copies.
                let v = transmute::<[u8; 32], __m256i>(wb.q[s]);
                let w0 = _mm256_and_si256(v, nibble);
                let w1 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                for r in 0..R {
                    let xv = _mm256_set1_epi32(xb.q[r][s]);
                    ilo[r] = _mm256_add_epi16(ilo[r], _mm256_maddubs_epi16(w0, xv));
                    ihi[r] = _mm256_add_epi16(ihi[r], _mm256_maddubs_epi16(w1, xv));
                }
            }
            for r in 0..R {
                sum[r] = [
                    _mm256_madd_epi16(ilo[r], ones),
                    _mm256_madd_epi16(ihi[r], ones),
                ];
            }
            // Keeps the sums in memory: the float pass reads them back.
            std::arch::asm!("", options(nostack, preserves_flags));
        }
        for ((wb, xb), sum) in wc.iter().zip(xc).zip(sums.iter()) {
            let [d0, d1] = transmute::<[f32; NR], [[f32; 8]; 2]>(wb.d);
            let [m0, m1] = transmute::<[f32; NR], [[f32; 8]; 2]>(wb.m);
            let (d0, d1) = (
                transmute::<[f32; 8], __m256>(d0),
                transmute::<[f32; 8], __m256>(d1),
            );
            let (m0, m1) = (
                transmute::<[f32; 8], __m256>(m0),
                transmute::<[f32; 8], __m256>(m1),
            );
            for r in 0..R {
                let (dx, sx) = (_mm256_set1_ps(xb.d[r]), _mm256_set1_ps(xb.s[r]));
                let a = _mm256_cvtepi32_ps(sum[r][0]);
                let b = _mm256_cvtepi32_ps(sum[r][1]);
                lo[r] = _mm256_fmadd_ps(a, _mm256_mul_ps(d0, dx), lo[r]);
                hi[r] = _mm256_fmadd_ps(b, _mm256_mul_ps(d1, dx), hi[r]);
                lo[r] = _mm256_fmadd_ps(m0, sx, lo[r]);
                hi[r] = _mm256_fmadd_ps(m1, sx, hi[r]);
            }
        }
    }
    for r in 0..R {
        let (a, b) = (
            transmute::<__m256, [f32; 8]>(lo[r]),
            transmute::<__m256, [f32; 8]>(hi[r]),
        );
        out[r * NR..r * NR + 8].copy_from_slice(&a);
        out[r * NR + 8..r * NR + NR].copy_from_slice(&b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::panel::{check_rows, uniform};

    /// Each output by the module's definition, row by row, from the codes.
    fn reference(p: &QPanels, x: &[f32]) -> Vec<f32> {
        let (n, k) = (p.n(), p.k());
        let m = x.len() / k;
        let mut xt = Vec::new();
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            quantize_rows(&x[i * k..(i + 1) * k], k, &mut xt);
            for j in 0..n {
                let mut acc = 0f32;
                for (b, xb) in xt.iter().enumerate() {
                    let (mut dot, mut sum) = (0i32, 0i32);
                    for kk in 0..QK {
                        let xc = xb.q[0][kk / 4].to_le_bytes()[kk % 4] as i8 as i32;
                        dot += p.code(j, b * QK + kk).0 as i32 * xc;
                        sum += xc;
                    }
                    let (_, d, mn) = p.code(j, b * QK);
                    acc = (dot as f32).mul_add(d * xb.d[0], acc);
                    acc = mn.mul_add(xb.d[0] * sum as f32, acc);
                }
                y[i * n + j] = acc;
            }
        }
        y
    }

    #[test]
    fn q4_1_weights_come_back_exactly() {
        // Blocks as llama.cpp's Q4_1 quantizer writes them: minimum and (max - min) / 15 in
        // f16, the block's extremes at codes 0 and 15, dequantized as `q d + m`.
        let (n, k) = (19, 96);
        let noise = uniform(n * k, 21);
        let mut w = vec![0f32; n * k];
        let mut codes = vec![0u8; n * k];
        for (bi, (blk, c)) in w.chunks_mut(QK).zip(codes.chunks_mut(QK)).enumerate() {
            let d = f16::from_f32(0.001 + 0.01 * (bi % 7) as f32).to_f32();
            let m = f16::from_f32(-0.05 * (bi % 5) as f32 - 0.01).to_f32();
            for (j, (v, q)) in blk.iter_mut().zip(c.iter_mut()).enumerate() {
                *q = match j {
                    3 => 0,
                    17 => 15,
                    _ => ((noise[bi * QK + j] + 1.0) * 7.99) as u8,
                };
                *v = *q as f32 * d + m;
            }
        }
        let p = QPanels::quantize(&w, k);
        assert_eq!(p.unpack(), w);
        for r in 0..n {
            for kk in 0..k {
                assert_eq!(p.code(r, kk).0, codes[r * k + kk]);
            }
        }
    }

    #[test]
    fn products_follow_the_definition_and_are_batch_invariant() {
        let (n, k) = (37, 96);
        let p = QPanels::quantize(&uniform(n * k, 22), k);
        check_rows(
            (n, k),
            &[1, 3, 4, 5, 50, 97],
            30,
            |x, y| p.matmul(x, None, y, false),
            |x| reference(&p, x),
        );
    }

    #[test]
    fn the_vector_tile_gives_the_portable_tiles_bits() {
        let k = 128;
        let p = QPanels::quantize(&uniform(NR * k, 23), k);
        let mut xt = Vec::new();
        quantize_rows(&uniform(MR * k, 24), k, &mut xt);
        for rows in 1..=MR {
            let mut a = [0f32; MR * NR];
            let mut b = [0f32; MR * NR];
            tile_portable(&p.blocks, &xt, rows, &mut a);
            tile_fn()(&p.blocks, &xt, rows, &mut b);
            assert_eq!(a[..rows * NR], b[..rows * NR], "rows = {rows}");
        }
    }

    #[test]
    fn the_vector_block_quantizer_gives_the_portable_codes() {
        let mut v = uniform(QK * 64, 27);
        // An all-zero block, and a block of ties (its scale is 1).
        v[QK..2 * QK].fill(0.0);
        for (j, x) in v[2 * QK..3 * QK].iter_mut().enumerate() {
            *x = if j == 0 { -127.0 } else { j as f32 - 16.5 };
        }
        for (i, blk) in v.chunks_exact(QK).enumerate() {
            let blk: &[f32; QK] = blk.try_into().unwrap();
            let (mut a, mut b) = ([0i32; STEPS], [0i32; STEPS]);
            let pa = quantize_block_portable(blk, &mut a);
            let pb = block_fn()(blk, &mut b);
            assert_eq!((pa, a), (pb, b), "block {i}");
        }
    }

    #[test]
    fn products_stay_within_the_activation_rounding_of_f32() {
        // The weights as quantized, in f32, against the activations unrounded: the only
        // difference is each activation's rounding to 1/254 of its block's largest magnitude.
        let (n, k, m) = (24, 256, 3);
        let p = QPanels::quantize(&uniform(n * k, 25), k);
        let w = p.unpack();
        let x = uniform(m * k, 26);
        let mut y = vec![0f32; m * n];
        p.matmul(&x, Some(&vec![0.5; n]), &mut y, false);
        for i in 0..m {
            for j in 0..n {
                let (mut exact, mut bound) = (0f64, 1e-4);
                for (b, xb) in x[i * k..(i + 1) * k].chunks(QK).enumerate() {
                    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                    for (kk, &xv) in xb.iter().enumerate() {
                        let wv = w[j * k + b * QK + kk] as f64;
                        exact += wv * xv as f64;
                        bound += wv.abs() * amax / 254.0;
                    }
                }
                let got = y[i * n + j] as f64 - 0.5;
                assert!((got - exact).abs() <= bound, "({i}, {j}): {got} vs {exact}");
            }
        }
    }
}
