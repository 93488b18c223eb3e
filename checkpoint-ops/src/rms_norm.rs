//! RMS normalisation with a weight, as Qwen2/Llama compute it: `x / sqrt(mean(x²) + eps) * w`
//! over the last dimension, statistics in f32.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::kernel::{Float, ROWS_PER_TASK, check_float, check_like, slice, storage, with_float};

const OP: &str = "rms_norm";

/// `xs / sqrt(mean(xs², last dim) + eps) * weight`, in one pass per row.
///
/// `xs`: `(.., d)`, f32, bf16 or f16; `weight`: `(d,)`, same dtype and device. The sum of squares
/// is accumulated in f32, sequentially along each row, so the result is bit-for-bit the same for
/// any thread count. Gradients flow to both `xs` and `weight`.
///
/// On a device other than the CPU this is `candle_nn::ops::rms_norm_slow` (the composite ops).
///
/// # Errors
/// If `weight` is not `(d,)`, the dtypes or devices differ, the dtype is not a float, or `eps`
/// is negative or not finite.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    check_float(OP, "xs", xs)?;
    check_like(OP, ("xs", xs), ("weight", weight))?;
    let d = xs.dim(candle_core::D::Minus1)?;
    if weight.dims() != [d] {
        bail!(
            "{OP}: `weight` has shape {:?} but `xs` ends in {d}; the weight must be ({d},)",
            weight.dims()
        )
    }
    if !(eps.is_finite() && eps >= 0.0) {
        bail!("{OP}: eps is {eps}; use a small non-negative number such as 1e-6")
    }
    if !xs.device().is_cpu() {
        return candle_nn::ops::rms_norm_slow(xs, weight, eps);
    }
    xs.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

/// `1 / sqrt(mean(x²) + eps)` of one row, summed in order.
#[inline]
fn inv_rms<T: Float>(row: &[T], eps: f32) -> f32 {
    let sum_sq: f32 = row.iter().map(|&v| v.to_f32() * v.to_f32()).sum();
    #[allow(clippy::cast_precision_loss)]
    let mean = sum_sq / row.len() as f32;
    1.0 / (mean + eps).sqrt()
}

#[derive(Debug)]
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = wl.shape().elem_count();
        with_float!(OP, xs.dtype(), T => {
            let (x, w) = (slice::<T>(OP, xs, xl)?, slice::<T>(OP, w, wl)?);
            let mut out = vec![T::from_f32(0.0); x.len()];
            out.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(x.par_chunks(d * ROWS_PER_TASK))
                .for_each(|(out, x)| {
                    for (out, x) in out.chunks_mut(d).zip(x.chunks(d)) {
                        let r = inv_rms(x, self.eps);
                        for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
                            *o = T::from_f32(x.to_f32() * r * w.to_f32());
                        }
                    }
                });
            Ok((storage(out), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = if xs.track_op() {
            Some(xs.apply_op3_no_bwd(weight, &grad, &RmsNormGradX { eps: self.eps })?)
        } else {
            None
        };
        let dw = if weight.track_op() {
            Some(xs.apply_op2_no_bwd(&grad, &RmsNormGradW { eps: self.eps })?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// `dx = r · (g·w − n · mean(g·w·n))` with `n = x·r`, per row.
#[derive(Debug)]
struct RmsNormGradX {
    eps: f32,
}

impl CustomOp3 for RmsNormGradX {
    fn name(&self) -> &'static str {
        "rms_norm (backward, input)"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = wl.shape().elem_count();
        #[allow(clippy::cast_precision_loss)]
        let inv_d = 1.0 / d as f32;
        with_float!(OP, xs.dtype(), T => {
            let x = slice::<T>(OP, xs, xl)?;
            let w = slice::<T>(OP, w, wl)?;
            let g = slice::<T>(OP, g, gl)?;
            let mut out = vec![T::from_f32(0.0); x.len()];
            out.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(x.par_chunks(d * ROWS_PER_TASK))
                .zip(g.par_chunks(d * ROWS_PER_TASK))
                .for_each(|((out, x), g)| {
                    for ((out, x), g) in out.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                        let r = inv_rms(x, self.eps);
                        let dot: f32 = x
                            .iter()
                            .zip(g)
                            .zip(w)
                            .map(|((&x, &g), &w)| g.to_f32() * w.to_f32() * x.to_f32() * r)
                            .sum();
                        let c = dot * inv_d;
                        for (((o, &x), &g), &w) in out.iter_mut().zip(x).zip(g).zip(w) {
                            let n = x.to_f32() * r;
                            *o = T::from_f32(r * (g.to_f32() * w.to_f32() - n * c));
                        }
                    }
                });
            Ok((storage(out), xl.shape().clone()))
        })
    }
}

/// `dw = Σ_rows g · n`. Rows are summed in blocks of a fixed size, then the blocks in order: the
/// same additions in the same order whatever the thread count.
#[derive(Debug)]
struct RmsNormGradW {
    eps: f32,
}

/// Rows per partial sum of the weight gradient (fixed: it decides the order of additions).
const ROWS_PER_PARTIAL: usize = 64;

impl CustomOp2 for RmsNormGradW {
    fn name(&self) -> &'static str {
        "rms_norm (backward, weight)"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = *xl.dims().last().unwrap_or(&0);
        if d == 0 {
            bail!("{OP}: the last dimension is empty")
        }
        with_float!(OP, xs.dtype(), T => {
            let x = slice::<T>(OP, xs, xl)?;
            let g = slice::<T>(OP, g, gl)?;
            let partials: Vec<Vec<f32>> = x
                .par_chunks(d * ROWS_PER_PARTIAL)
                .zip(g.par_chunks(d * ROWS_PER_PARTIAL))
                .map(|(x, g)| {
                    let mut acc = vec![0f32; d];
                    for (x, g) in x.chunks(d).zip(g.chunks(d)) {
                        let r = inv_rms(x, self.eps);
                        for ((a, &x), &g) in acc.iter_mut().zip(x).zip(g) {
                            *a += g.to_f32() * x.to_f32() * r;
                        }
                    }
                    acc
                })
                .collect();
            let mut total = vec![0f32; d];
            for p in &partials {
                for (t, &p) in total.iter_mut().zip(p) {
                    *t += p;
                }
            }
            let out: Vec<T> = total.into_iter().map(T::from_f32).collect();
            Ok((storage(out), Shape::from(d)))
        })
    }
}
