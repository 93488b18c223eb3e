//! Scaled, masked softmax over the last dimension: the attention probabilities
//! `softmax(scale · scores + mask)`, in f32, without the scaled, masked and exponentiated
//! temporaries of the composite ops.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Tensor, bail,
};
use rayon::prelude::*;

use crate::kernel::{Float, ROWS_PER_TASK, check_float, check_no_grad, slice, storage, with_float};

const OP: &str = "masked_softmax";

/// `softmax(scale · scores + mask)` over the last dimension, returned in the dtype of `scores`.
///
/// `scores`: `(.., n)`, f32, bf16 or f16. `mask`: additive (0 where allowed, a large negative
/// number such as `f32::MIN` where not), any float dtype (read as f32), broadcastable to
/// `scores`, e.g. `(b, 1, t, t)` for scores `(b, heads, t, t)`; `None`: no mask. Each row is
/// computed in f32 as candle's `softmax` does (subtract the maximum, exponentiate, divide by the
/// sum summed in order), so the result is the same for any thread count. A row whose mask is
/// `-inf` everywhere gives NaN, as the composite ops do; use a finite minimum to get a uniform
/// row instead.
///
/// The gradient flows to `scores`; the mask is a constant and must not require one.
///
/// On a device other than the CPU this is the composite `candle_nn::ops::softmax`.
///
/// # Errors
/// If the mask does not broadcast to `scores`, requires a gradient, or a dtype is not a float.
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    check_float(OP, "scores", scores)?;
    if scores.rank() == 0 {
        bail!("{OP}: `scores` is a scalar; it must have a last dimension to normalise over")
    }
    if !scale.is_finite() {
        bail!("{OP}: scale is {scale}; use a finite number (1 / sqrt(head_dim) for attention)")
    }
    let mask = match mask {
        None => None,
        Some(m) => {
            check_float(OP, "mask", m)?;
            check_no_grad(OP, "mask", m)?;
            if !m.device().same_device(scores.device()) {
                bail!(
                    "{OP}: `mask` is on {:?} but `scores` on {:?}; move it with `to_device`",
                    m.device().location(),
                    scores.device().location()
                )
            }
            let broadcast = m.to_dtype(DType::F32)?.broadcast_as(scores.shape()).map_err(|_| {
                candle_core::Error::Msg(format!(
                    "{OP}: `mask` has shape {:?}, which does not broadcast to the scores' {:?}; \
                     give it size 1 or the scores' size in each dimension",
                    m.dims(),
                    scores.dims()
                ))
            })?;
            Some(broadcast)
        }
    };
    if !scores.device().is_cpu() {
        let dtype = scores.dtype();
        let mut xs = (scores.to_dtype(DType::F32)? * scale)?;
        if let Some(mask) = &mask {
            xs = (xs + mask)?;
        }
        return candle_nn::ops::softmax(&xs, D::Minus1)?.to_dtype(dtype);
    }
    #[allow(clippy::cast_possible_truncation)]
    let op = MaskedSoftmax {
        scale: scale as f32,
    };
    let scores = scores.contiguous()?;
    match mask {
        Some(mask) => scores.apply_op2(&mask, op),
        None => scores.apply_op1(op),
    }
}

#[derive(Debug)]
struct MaskedSoftmax {
    scale: f32,
}

/// Where row `row` of a mask broadcast (with zero strides) to `dims` starts, and its stride
/// along the last dimension.
fn mask_row(layout: &Layout, row: usize) -> (usize, usize) {
    let (dims, strides) = (layout.dims(), layout.stride());
    let last = dims.len() - 1;
    let mut rest = row;
    let mut offset = layout.start_offset();
    for k in (0..last).rev() {
        offset += (rest % dims[k]) * strides[k];
        rest /= dims[k];
    }
    (offset, strides[last])
}

impl MaskedSoftmax {
    fn run(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        mask: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let n = *xl.dims().last().unwrap_or(&0);
        if n == 0 {
            return Ok((xs.clone(), xl.shape().clone()));
        }
        let mask = match mask {
            Some((s, l)) => Some((s.as_slice::<f32>()?, l)),
            None => None,
        };
        with_float!(OP, xs.dtype(), T => {
            let x = slice::<T>(OP, xs, xl)?;
            let mut out = vec![T::from_f32(0.0); x.len()];
            out.par_chunks_mut(n * ROWS_PER_TASK)
                .zip(x.par_chunks(n * ROWS_PER_TASK))
                .enumerate()
                .for_each(|(task, (out, x))| {
                    let mut row = vec![0f32; n];
                    for (i, (out, x)) in out.chunks_mut(n).zip(x.chunks(n)).enumerate() {
                        for (r, &x) in row.iter_mut().zip(x) {
                            *r = x.to_f32() * self.scale;
                        }
                        if let Some((m, ml)) = mask {
                            let (start, stride) = mask_row(ml, task * ROWS_PER_TASK + i);
                            for (j, r) in row.iter_mut().enumerate() {
                                *r += m[start + j * stride];
                            }
                        }
                        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let mut sum = 0f32;
                        for r in &mut row {
                            *r = (*r - max).exp();
                            sum += *r;
                        }
                        for (o, &r) in out.iter_mut().zip(&row) {
                            *o = T::from_f32(r / sum);
                        }
                    }
                });
            Ok((storage(out), xl.shape().clone()))
        })
    }

    /// `d scores = scale · y · (g − Σ g·y)`, computed from the output `y`.
    fn grad(&self, probs: &Tensor, grad: &Tensor) -> Result<Tensor> {
        probs.contiguous()?.apply_op2_no_bwd(
            &grad.contiguous()?,
            &MaskedSoftmaxGrad { scale: self.scale },
        )
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, None)
    }

    fn bwd(&self, _xs: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad(res, grad)?))
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        mask: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, Some((mask, ml)))
    }

    fn bwd(
        &self,
        _xs: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.grad(res, grad)?), None))
    }
}

#[derive(Debug)]
struct MaskedSoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmaxGrad {
    fn name(&self) -> &'static str {
        "masked_softmax (backward)"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = *yl.dims().last().unwrap_or(&0);
        if n == 0 {
            return Ok((ys.clone(), yl.shape().clone()));
        }
        with_float!(OP, ys.dtype(), T => {
            let y = slice::<T>(OP, ys, yl)?;
            let g = slice::<T>(OP, gs, gl)?;
            let mut out = vec![T::from_f32(0.0); y.len()];
            out.par_chunks_mut(n * ROWS_PER_TASK)
                .zip(y.par_chunks(n * ROWS_PER_TASK))
                .zip(g.par_chunks(n * ROWS_PER_TASK))
                .for_each(|((out, y), g)| {
                    for ((out, y), g) in out.chunks_mut(n).zip(y.chunks(n)).zip(g.chunks(n)) {
                        let dot: f32 = y.iter().zip(g).map(|(&y, &g)| y.to_f32() * g.to_f32()).sum();
                        for ((o, &y), &g) in out.iter_mut().zip(y).zip(g) {
                            *o = T::from_f32(self.scale * y.to_f32() * (g.to_f32() - dot));
                        }
                    }
                });
            Ok((storage(out), yl.shape().clone()))
        })
    }
}
