//! Fused CPU operations with hand-written backward passes.
//!
//! candle's autograd keeps every intermediate tensor of the forward pass alive until the
//! backward pass and, for a matrix product, always computes the gradient of both operands.
//! For LoRA training most of that is wasted: base weights are frozen, so their gradients are
//! never needed, and attention/normalisation can be recomputed cheaply from their inputs.
//! The operations here are [`candle_core::CustomOp1`]/[`CustomOp2`]/[`CustomOp3`]s whose graph
//! node keeps only its inputs and output, and whose backward pass produces exactly the
//! gradients required (never one for a frozen weight).
//!
//! Frozen weights, masks and rotary tables are captured in the op rather than passed as
//! arguments, so autograd never sees them.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape,
    Tensor, D,
};
use std::sync::Arc;

/// Copies a contiguous CPU storage region into a tensor of the same dtype.
fn cpu_tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("fused op: non-contiguous input")
    };
    let shape = l.shape().clone();
    let dev = Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[a..b], shape, &dev),
        CpuStorage::F64(v) => Tensor::from_slice(&v[a..b], shape, &dev),
        CpuStorage::F16(v) => Tensor::from_slice(&v[a..b], shape, &dev),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[a..b], shape, &dev),
        _ => bail!("fused op: unsupported dtype"),
    }
}

/// Contiguous f32 values of a CPU storage region.
fn cpu_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(v[a..b].to_vec()),
        _ => cpu_tensor(s, l)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>(),
    }
}

/// The storage of `t` converted to `dtype`.
fn cpu_storage(t: &Tensor, dtype: DType) -> Result<(CpuStorage, Shape)> {
    let shape = t.shape().clone();
    let flat = t.to_dtype(dtype)?.flatten_all()?;
    let s = match dtype {
        DType::F32 => CpuStorage::F32(flat.to_vec1()?),
        DType::F64 => CpuStorage::F64(flat.to_vec1()?),
        DType::F16 => CpuStorage::F16(flat.to_vec1()?),
        DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
        other => bail!("fused op: unsupported dtype {other:?}"),
    };
    Ok((s, shape))
}

fn f32_storage(v: Vec<f32>, shape: &Shape) -> (CpuStorage, Shape) {
    (CpuStorage::F32(v), shape.clone())
}

fn vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

// ---------------------------------------------------------------------------------------------
// Linear layers with a frozen weight.
// ---------------------------------------------------------------------------------------------

/// `x W^T` for a frozen `W` `(out, in)`; `x` is `(rows, in)`. The backward pass returns only
/// `grad W` for `x`.
struct FrozenLinear {
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_tensor(s, l)?;
        let y = x.matmul(&self.w.t()?)?;
        cpu_storage(&y, x.dtype())
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.matmul(&self.w)?))
    }
}

/// `x W^T + scale * (x A^T) B^T` with a frozen `W` `(out, in)` and trainable `A` `(r, in)`,
/// `B` `(out, r)`; `x` is `(rows, in)`.
struct LoraMatmul {
    w: Tensor,
    scale: f64,
}

impl CustomOp3 for LoraMatmul {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        let x = cpu_tensor(s1, l1)?;
        let a = cpu_tensor(s2, l2)?;
        let b = cpu_tensor(s3, l3)?;
        let u = (x.matmul(&a.t()?)? * self.scale)?;
        let y = (x.matmul(&self.w.t()?)? + u.matmul(&b.t()?)?)?;
        cpu_storage(&y, x.dtype())
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let g = g.contiguous()?;
        let gu = (g.matmul(&b)? * self.scale)?;
        let dx = (g.matmul(&self.w)? + gu.matmul(&a)?)?;
        let u = x.matmul(&a.t()?)?;
        let db = (g.t()?.matmul(&u)? * self.scale)?;
        let da = gu.t()?.matmul(&x)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x W^T` with `W` frozen, for `x` `(rows, in)`.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return x.matmul(&w.detach().t()?);
    }
    x.contiguous()?.apply_op1(FrozenLinear { w: w.detach() })
}

/// `x W^T + scale * (x A^T) B^T` with `W` frozen, for `x` `(rows, in)`.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    if !x.device().is_cpu() {
        let delta = (x.matmul(&a.t()?)? * scale)?.matmul(&b.t()?)?;
        return x.matmul(&w.detach().t()?)? + delta;
    }
    x.contiguous()?.apply_op3(
        a,
        b,
        LoraMatmul {
            w: w.detach(),
            scale,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// RMSNorm.
// ---------------------------------------------------------------------------------------------

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension, f32 only, `w` frozen.
struct RmsNormOp {
    w: Arc<Vec<f32>>,
    eps: f32,
}

impl RmsNormOp {
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut x = cpu_f32(s, l)?;
        let n = self.w.len();
        for row in x.chunks_mut(n) {
            let r = self.inv_rms(row);
            for (v, w) in row.iter_mut().zip(self.w.iter()) {
                *v *= r * w;
            }
        }
        Ok(f32_storage(x, l.shape()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let xv = vec_f32(x)?;
        let gv = vec_f32(g)?;
        let n = self.w.len();
        let mut dx = vec![0f32; xv.len()];
        for ((xr, gr), dr) in xv.chunks(n).zip(gv.chunks(n)).zip(dx.chunks_mut(n)) {
            let r = self.inv_rms(xr);
            let dot: f32 = xr
                .iter()
                .zip(gr)
                .zip(self.w.iter())
                .map(|((x, g), w)| x * g * w)
                .sum();
            let c = r * r * r * dot / n as f32;
            for (((d, x), g), w) in dr.iter_mut().zip(xr).zip(gr).zip(self.w.iter()) {
                *d = r * g * w - c * x;
            }
        }
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Fused RMSNorm for f32 CPU tensors; `None` when not applicable.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    let op = RmsNormOp {
        w: Arc::new(w.flatten_all()?.to_vec1::<f32>()?),
        eps: eps as f32,
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding.
// ---------------------------------------------------------------------------------------------

/// RoPE (`rotate_half` layout) on `(batch, seq, heads, head_dim)` with per-position
/// `(batch * seq, head_dim / 2)` cos/sin tables.
struct RopeOp {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    heads: usize,
    half: usize,
}

impl RopeOp {
    /// Rotates `x` in place; `inverse` applies the transpose (the backward pass).
    fn rotate(&self, x: &mut [f32], inverse: bool) {
        let (h, half) = (self.heads, self.half);
        let sign = if inverse { -1.0 } else { 1.0 };
        for (pos, chunk) in x.chunks_mut(h * 2 * half).enumerate() {
            let c = &self.cos[pos * half..(pos + 1) * half];
            let s = &self.sin[pos * half..(pos + 1) * half];
            for head in chunk.chunks_mut(2 * half) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    let si = sign * s[i];
                    x1[i] = a * c[i] - b * si;
                    x2[i] = b * c[i] + a * si;
                }
            }
        }
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut x = cpu_f32(s, l)?;
        self.rotate(&mut x, false);
        Ok(f32_storage(x, l.shape()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let mut gv = vec_f32(g)?;
        self.rotate(&mut gv, true);
        Ok(Some(Tensor::from_vec(gv, x.shape(), x.device())?))
    }
}

/// Fused RoPE on `(batch, seq, heads, head_dim)` f32 CPU tensors with `(batch, 1, seq,
/// head_dim / 2)` tables; `None` when not applicable.
pub fn rope_bthd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (_, _, heads, d) = x.dims4()?;
    let op = RopeOp {
        cos: Arc::new(vec_f32(cos)?),
        sin: Arc::new(vec_f32(sin)?),
        heads,
        half: d / 2,
    };
    if op.cos.len() * 2 * heads != x.elem_count() {
        bail!("rope: tables do not match the input shape {:?}", x.dims());
    }
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

// ---------------------------------------------------------------------------------------------
// Attention.
// ---------------------------------------------------------------------------------------------

/// `softmax(q k^T * scale + mask) v` with grouped-query heads, on `(batch, seq, heads,
/// head_dim)` inputs (`k`/`v` with `heads / n_rep` heads), output `(batch, seq, heads,
/// head_dim)`. The probabilities are recomputed in the backward pass instead of being kept.
struct AttentionOp {
    /// `(batch, 1, seq, seq)` f32 additive mask.
    mask: Tensor,
    scale: f64,
}

/// `(b, t, n, d)` -> `(b, n, t, d)` contiguous.
fn heads_first(x: &Tensor) -> Result<Tensor> {
    x.transpose(1, 2)?.contiguous()
}

impl AttentionOp {
    /// `(q', k', v', probs)`: q grouped as `(b, n_kv, n_rep * t, d)`, k/v as `(b, n_kv, t, d)`,
    /// probs `(b, n_kv, n_rep * t, t)`.
    fn probs(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<[Tensor; 4]> {
        let (b, t, nh, d) = q.dims4()?;
        let nkv = k.dim(2)?;
        let rep = nh / nkv;
        let q = heads_first(q)?.reshape((b, nkv, rep * t, d))?;
        let k = heads_first(k)?;
        let v = heads_first(v)?;
        let s = (q.matmul(&k.t()?)? * self.scale)?
            .reshape((b, nkv, rep, t, t))?
            .broadcast_add(&self.mask.reshape((b, 1, 1, t, t))?)?
            .reshape((b, nkv, rep * t, t))?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        Ok([q, k, v, p])
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
        let q = cpu_tensor(s1, l1)?;
        let k = cpu_tensor(s2, l2)?;
        let v = cpu_tensor(s3, l3)?;
        let (b, t, nh, d) = q.dims4()?;
        let [_, _, v, p] = self.probs(&q, &k, &v)?;
        let o = p
            .matmul(&v)?
            .reshape((b, nh, t, d))?
            .transpose(1, 2)?
            .contiguous()?;
        cpu_storage(&o, DType::F32)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, nh, d) = q.dims4()?;
        let nkv = k.dim(2)?;
        let [q, k, v, p] = self.probs(&q.detach(), &k.detach(), &v.detach())?;
        let g = heads_first(g)?.reshape((b, nkv, (nh / nkv) * t, d))?;
        let dv = p.t()?.matmul(&g)?;
        let dp = g.matmul(&v.t()?)?;
        let delta = (&dp * &p)?.sum_keepdim(D::Minus1)?;
        let ds = (dp.broadcast_sub(&delta)? * p)?;
        let dq = (ds.matmul(&k)? * self.scale)?.reshape((b, nh, t, d))?;
        let dk = (ds.t()?.matmul(&q)? * self.scale)?;
        let back = |x: Tensor| x.transpose(1, 2)?.contiguous();
        Ok((Some(back(dq)?), Some(back(dk)?), Some(back(dv)?)))
    }
}

/// Fused attention for f32 CPU tensors in `(batch, seq, heads, head_dim)` layout (`k`/`v` may
/// have fewer heads, grouped-query style); output `(batch, seq, heads, head_dim)`. `None` when
/// not applicable.
pub fn attention_bthd(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() || q.dtype() != DType::F32 {
        return Ok(None);
    }
    let d = q.dim(D::Minus1)?;
    let op = AttentionOp {
        mask: mask.to_dtype(DType::F32)?.detach(),
        scale: 1.0 / (d as f64).sqrt(),
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}

// ---------------------------------------------------------------------------------------------
// SwiGLU.
// ---------------------------------------------------------------------------------------------

/// `silu(gate) * up`, f32.
struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let mut a = cpu_f32(s1, l1)?;
        let b = cpu_f32(s2, l2)?;
        for (x, u) in a.iter_mut().zip(&b) {
            *x = *x * sigmoid(*x) * u;
        }
        Ok(f32_storage(a, l1.shape()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let a = vec_f32(gate)?;
        let b = vec_f32(up)?;
        let gv = vec_f32(g)?;
        let mut da = vec![0f32; a.len()];
        let mut db = vec![0f32; a.len()];
        for i in 0..a.len() {
            let s = sigmoid(a[i]);
            let silu = a[i] * s;
            db[i] = gv[i] * silu;
            da[i] = gv[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
        }
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(da, gate.shape(), dev)?),
            Some(Tensor::from_vec(db, up.shape(), dev)?),
        ))
    }
}

/// Fused `silu(gate) * up` for f32 CPU tensors of the same shape; `None` when not applicable.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !gate.device().is_cpu()
        || gate.dtype() != DType::F32
        || up.dtype() != DType::F32
        || gate.dims() != up.dims()
    {
        return Ok(None);
    }
    Ok(Some(
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

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
    fn lora_linear_matches_autograd() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, (6, 5), &Device::Cpu)?;
        let vars = [randn(&[7, 5])?, randn(&[3, 5])?, randn(&[6, 3])?];
        check(
            &vars,
            |t| lora_linear(&t[0], &w, &t[1], &t[2], 2.0),
            |t| {
                let d = t[0].matmul(&t[1].t()?)?.matmul(&t[2].t()?)?;
                t[0].matmul(&w.t()?)? + (d * 2.0)?
            },
        )?;
        check(
            &vars[..1],
            |t| frozen_linear(&t[0], &w),
            |t| t[0].matmul(&w.t()?),
        )
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

    #[test]
    fn rope_and_attention_match_autograd() -> Result<()> {
        let (b, t, nh, nkv, d) = (2, 5, 4, 2, 6);
        let cos = Tensor::randn(0f32, 1.0, (b, 1, t, d / 2), &Device::Cpu)?;
        let sin = Tensor::randn(0f32, 1.0, (b, 1, t, d / 2), &Device::Cpu)?;
        check(
            &[randn(&[b, t, nh, d])?],
            |t| Ok(rope_bthd(&t[0], &cos, &sin)?.expect("f32")),
            |t| {
                let x = t[0].transpose(1, 2)?;
                crate::model::apply_rope(&x, &cos, &sin)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                    .transpose(1, 2)
            },
        )?;
        let packing = crate::model::Packing::from_segments(
            &[vec![0, 0, 0, 1, 1], vec![0, 0, 0, 0, 0]],
            None,
            &Device::Cpu,
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mask = packing.mask;
        check(
            &[
                randn(&[b, t, nh, d])?,
                randn(&[b, t, nkv, d])?,
                randn(&[b, t, nkv, d])?,
            ],
            |x| Ok(attention_bthd(&x[0], &x[1], &x[2], &mask)?.expect("f32")),
            |x| {
                let h = |x: &Tensor| x.transpose(1, 2)?.contiguous();
                let err = |e: crate::model::ModelError| candle_core::Error::Msg(e.to_string());
                let k = crate::model::repeat_kv(h(&x[1])?, nh / nkv).map_err(err)?;
                let v = crate::model::repeat_kv(h(&x[2])?, nh / nkv).map_err(err)?;
                crate::model::attention(&h(&x[0])?, &k, &v, &mask)
                    .map_err(err)?
                    .transpose(1, 2)
            },
        )
    }

    #[test]
    fn swiglu_matches_autograd() -> Result<()> {
        check(
            &[randn(&[3, 4])?, randn(&[3, 4])?],
            |t| Ok(swiglu(&t[0], &t[1])?.expect("f32")),
            |t| candle_nn::ops::silu(&t[0])? * &t[1],
        )
    }
}
