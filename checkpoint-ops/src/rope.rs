//! Rotary position embedding in the Hugging Face (Qwen2, Llama) non-interleaved layout: the
//! first and second halves of each head vector form the pairs that are rotated.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::kernel::{
    Float, ROWS_PER_TASK, check_float, check_like, check_no_grad, slice, storage, with_float,
};

const OP: &str = "rope";

/// Rotates `xs` of shape `(.., t, d)` by the angles whose cosines and sines are `cos`, `sin`
/// (each `(t_max, d / 2)` with `t_max >= t`; position `p` uses row `p`):
///
/// ```text
/// y[i]       = x[i] · cos[p, i] − x[i + d/2] · sin[p, i]
/// y[i + d/2] = x[i + d/2] · cos[p, i] + x[i] · sin[p, i]      for i < d/2
/// ```
///
/// which is `x · cat(cos, cos) + rotate_half(x) · cat(sin, sin)`, as transformers' and
/// `candle_nn::rotary_emb::rope_slow` compute it. Arithmetic in f32. The gradient flows to `xs`
/// (it is the inverse rotation); the tables are constants and must not require a gradient.
///
/// On a device other than the CPU this is `rope_slow` (the composite ops).
///
/// # Errors
/// If `d` is odd, the tables are misshapen or shorter than `t`, the dtypes or devices differ,
/// the dtype is not a float, or a table requires a gradient.
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check_float(OP, "xs", xs)?;
    check_like(OP, ("xs", xs), ("cos", cos))?;
    check_like(OP, ("xs", xs), ("sin", sin))?;
    check_no_grad(OP, "cos", cos)?;
    check_no_grad(OP, "sin", sin)?;
    let dims = xs.dims();
    if dims.len() < 2 {
        bail!("{OP}: `xs` has shape {dims:?}; it must be (.., t, d)")
    }
    let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if d % 2 != 0 {
        bail!("{OP}: the head dimension {d} is odd; rotary pairs need an even one")
    }
    for (name, table) in [("cos", cos), ("sin", sin)] {
        match table.dims() {
            &[rows, half] if half == d / 2 && rows >= t => {}
            other => bail!(
                "{OP}: `{name}` has shape {other:?}; it must be (t_max, {}) with t_max >= {t}, \
                 the sequence length of `xs`",
                d / 2
            ),
        }
    }
    if !xs.device().is_cpu() {
        let (cos, sin) = (cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?);
        return candle_nn::rotary_emb::rope_slow(&xs.contiguous()?, &cos, &sin);
    }
    xs.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { t, inverse: false },
    )
}

/// The rotation (or, with `inverse`, its inverse: the backward of a rotation is the rotation by
/// the opposite angles).
#[derive(Debug)]
struct Rope {
    t: usize,
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.inverse { "rope (backward)" } else { OP }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cos: &CpuStorage,
        cl: &Layout,
        sin: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = *xl.dims().last().unwrap_or(&0);
        let half = d / 2;
        if half == 0 {
            bail!("{OP}: the head dimension is empty")
        }
        let t = self.t;
        with_float!(OP, xs.dtype(), T => {
            let x = slice::<T>(OP, xs, xl)?;
            let cos = slice::<T>(OP, cos, cl)?;
            let sin = slice::<T>(OP, sin, sl)?;
            let sign = if self.inverse { -1.0f32 } else { 1.0 };
            let mut out = vec![T::from_f32(0.0); x.len()];
            out.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(x.par_chunks(d * ROWS_PER_TASK))
                .enumerate()
                .for_each(|(task, (out, x))| {
                    for (i, (out, x)) in out.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                        let p = (task * ROWS_PER_TASK + i) % t;
                        let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
                        let (x1, x2) = x.split_at(half);
                        let (o1, o2) = out.split_at_mut(half);
                        let outs = o1.iter_mut().zip(o2.iter_mut());
                        let ins = x1.iter().zip(x2).zip(c.iter().zip(s));
                        for ((o1, o2), ((&a, &b), (&c, &s))) in outs.zip(ins) {
                            let (a, b) = (a.to_f32(), b.to_f32());
                            let (c, s) = (c.to_f32(), sign * s.to_f32());
                            *o1 = T::from_f32(a * c - b * s);
                            *o2 = T::from_f32(b * c + a * s);
                        }
                    }
                });
            Ok((storage(out), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Rope {
            t: self.t,
            inverse: !self.inverse,
        };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}
