//! The SwiGLU gate: `silu(gate) · up` in one pass (the composite allocates the sigmoid, the SiLU
//! and the product separately), and both gradients in one pass.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::kernel::{ELEMS_PER_TASK, Float, check_float, check_like, slice, storage, with_float};

const OP: &str = "silu_mul";

/// `silu(gate) · up`, with `silu(a) = a / (1 + exp(−a))`, element-wise in f32.
///
/// `gate` and `up`: the same shape, dtype (f32, bf16 or f16) and device. Gradients flow to both.
///
/// On a device other than the CPU this is the composite `gate.silu()? * up`.
///
/// # Errors
/// If the shapes, dtypes or devices differ, or the dtype is not a float.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_float(OP, "gate", gate)?;
    check_like(OP, ("gate", gate), ("up", up))?;
    if gate.shape() != up.shape() {
        bail!(
            "{OP}: `gate` has shape {:?} but `up` {:?}; they must be equal",
            gate.dims(),
            up.dims()
        )
    }
    if !gate.device().is_cpu() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

#[inline]
fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

#[derive(Debug)]
struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_float!(OP, gs.dtype(), T => {
            let (gate, up) = (slice::<T>(OP, gs, gl)?, slice::<T>(OP, us, ul)?);
            let mut out = vec![T::from_f32(0.0); gate.len()];
            out.par_chunks_mut(ELEMS_PER_TASK)
                .zip(gate.par_chunks(ELEMS_PER_TASK))
                .zip(up.par_chunks(ELEMS_PER_TASK))
                .for_each(|((out, gate), up)| {
                    for ((o, &a), &u) in out.iter_mut().zip(gate).zip(up) {
                        let a = a.to_f32();
                        *o = T::from_f32(a / (1.0 + (-a).exp()) * u.to_f32());
                    }
                });
            Ok((storage(out), gl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // One pass writes both gradients, stacked: (2, ..shape).
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SiluMulGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// `d gate = g · u · σ(a) · (1 + a · (1 − σ(a)))`, `d up = g · a · σ(a)`, stacked.
#[derive(Debug)]
struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "silu_mul (backward)"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let mut dims = vec![2];
        dims.extend_from_slice(gl.dims());
        with_float!(OP, gs.dtype(), T => {
            let (gate, up) = (slice::<T>(OP, gs, gl)?, slice::<T>(OP, us, ul)?);
            let grad = slice::<T>(OP, ds, dl)?;
            let mut out = vec![T::from_f32(0.0); 2 * gate.len()];
            let (d_gate, d_up) = out.split_at_mut(gate.len());
            d_gate
                .par_chunks_mut(ELEMS_PER_TASK)
                .zip(d_up.par_chunks_mut(ELEMS_PER_TASK))
                .zip(gate.par_chunks(ELEMS_PER_TASK))
                .zip(up.par_chunks(ELEMS_PER_TASK).zip(grad.par_chunks(ELEMS_PER_TASK)))
                .for_each(|(((d_gate, d_up), gate), (up, grad))| {
                    for (((dg, du), &a), (&u, &g)) in d_gate
                        .iter_mut()
                        .zip(d_up.iter_mut())
                        .zip(gate)
                        .zip(up.iter().zip(grad))
                    {
                        let (a, u, g) = (a.to_f32(), u.to_f32(), g.to_f32());
                        let s = sigmoid(a);
                        *dg = T::from_f32(g * u * s * (1.0 + a * (1.0 - s)));
                        *du = T::from_f32(g * a * s);
                    }
                });
            Ok((storage(out), Shape::from(dims)))
        })
    }
}
