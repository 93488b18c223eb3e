//! AdamW (decoupled weight decay) as two in-place passes per parameter: the moments (and, for a
//! half-precision parameter, its f32 master copy) in one, the parameter in the other. No
//! temporaries: candle-nn's `AdamW` allocates about ten parameter-sized tensors per step.

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, Var, bail};
use candle_nn::{Optimizer, ParamsAdamW};
use rayon::prelude::*;

use crate::kernel::{ELEMS_PER_TASK, Float, check_float, slice, slice_mut, with_float};

const OP: &str = "adamw";

/// AdamW over [`Var`]s with f32 moments, and an f32 master copy of every parameter that is not
/// f32 itself (so that bf16/f16 training does not lose small updates to rounding).
///
/// The update is candle-nn's `AdamW` (same [`ParamsAdamW`], same formula, same order of
/// operations, in f32), done in place: per parameter one pass updates the moments and one writes
/// the parameter. Element-wise, so bit-for-bit deterministic for any thread count.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_nn::{Optimizer, ParamsAdamW};
/// use checkpoint_ops::AdamW;
///
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[1f32, -2.0], &Device::Cpu)?;
/// let mut opt = AdamW::new(vec![w.clone()], ParamsAdamW { lr: 0.1, ..ParamsAdamW::default() })?;
/// let loss = w.as_tensor().sqr()?.sum_all()?;
/// opt.backward_step(&loss)?;
/// assert!(w.as_tensor().abs()?.sum_all()?.to_scalar::<f32>()? < 3.0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct AdamW {
    params: ParamsAdamW,
    vars: Vec<Slot>,
    step: u32,
}

/// One parameter and its state: `(2, n)` f32 rows `[m, v]`, plus the master row for a parameter
/// that is not f32.
#[derive(Debug)]
struct Slot {
    var: Var,
    state: Tensor,
}

impl AdamW {
    /// The optimizer's hyper-parameters.
    #[must_use]
    pub fn params(&self) -> &ParamsAdamW {
        &self.params
    }

    /// The f32 master copy of `var` (flattened), if it has one (it is not f32 and is optimized
    /// here); what the optimizer updates, of which `var` is the rounded copy.
    ///
    /// # Errors
    /// If candle cannot take the row.
    pub fn master(&self, var: &Var) -> Result<Option<Tensor>> {
        for slot in &self.vars {
            if slot.var.as_tensor().id() == var.as_tensor().id() && slot.state.dim(0)? == 3 {
                return Ok(Some(slot.state.get(2)?));
            }
        }
        Ok(None)
    }

    /// Steps taken (the bias corrections' exponent).
    #[must_use]
    pub fn step_count(&self) -> u32 {
        self.step
    }

    /// The optimizer's state of `var`: an f32 `(2, n)` tensor of rows `[m, v]`, or `(3, n)`
    /// `[m, v, master]` for a parameter that is not f32; `None` if `var` is not optimized here.
    /// With [`step_count`](Self::step_count), what [`restore`](Self::restore) needs to continue
    /// a run exactly.
    #[must_use]
    pub fn state(&self, var: &Var) -> Option<&Tensor> {
        self.vars
            .iter()
            .find(|slot| slot.var.as_tensor().id() == var.as_tensor().id())
            .map(|slot| &slot.state)
    }

    /// Continues from a saved state: the step count, and for each variable its
    /// [`state`](Self::state) (the master row, if any, is rounded into the variable).
    ///
    /// # Errors
    /// If a variable is not optimized here, or its state has the wrong dtype or shape.
    pub fn restore<'a>(
        &mut self,
        step: u32,
        states: impl IntoIterator<Item = (&'a Var, Tensor)>,
    ) -> Result<()> {
        for (var, state) in states {
            let Some(slot) = self
                .vars
                .iter_mut()
                .find(|slot| slot.var.as_tensor().id() == var.as_tensor().id())
            else {
                bail!(
                    "{OP}: restore: a variable {:?} is not optimized here",
                    var.dims()
                )
            };
            if state.dtype() != DType::F32 || state.dims() != slot.state.dims() {
                bail!(
                    "{OP}: restore: a state of {:?} {:?} for a variable {:?} {:?}; expected F32 \
                     {:?} (rows m, v and a master row for a half-precision variable)",
                    state.dtype(),
                    state.dims(),
                    var.dtype(),
                    var.dims(),
                    slot.state.dims()
                )
            }
            let state = state.to_device(slot.var.device())?.contiguous()?.copy()?;
            if state.dim(0)? == 3 {
                let master = state.get(2)?.reshape(var.shape())?;
                slot.var.set(&master.to_dtype(var.dtype())?)?;
            }
            slot.state = state;
        }
        self.step = step;
        Ok(())
    }

    /// [`step`](Optimizer::step) with every gradient multiplied by `scale` first, in f32 inside
    /// the update (global-norm clipping without rounding scaled half-precision gradients, and
    /// without a scaled copy of them).
    ///
    /// # Errors
    /// As [`step`](Optimizer::step); also for a `scale` that is not finite.
    pub fn step_scaled(&mut self, grads: &GradStore, scale: f64) -> Result<()> {
        if !scale.is_finite() {
            bail!("{OP}: the gradient scale is {scale}; it must be finite")
        }
        #[allow(clippy::cast_possible_truncation)]
        self.update(grads, scale as f32)
    }

    fn update(&mut self, grads: &GradStore, grad_scale: f32) -> Result<()> {
        self.step = self.step.saturating_add(1);
        let p = &self.params;
        let step = i32::try_from(self.step).unwrap_or(i32::MAX);
        #[allow(clippy::cast_possible_truncation)]
        let update = Update {
            grad_scale,
            beta1: p.beta1 as f32,
            one_minus_beta1: (1.0 - p.beta1) as f32,
            beta2: p.beta2 as f32,
            one_minus_beta2: (1.0 - p.beta2) as f32,
            scale_m: (1.0 / (1.0 - p.beta1.powi(step))) as f32,
            scale_v: (1.0 / (1.0 - p.beta2.powi(step))) as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            lr: p.lr as f32,
            eps: p.eps as f32,
        };
        for slot in &mut self.vars {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            check_float(OP, "gradient", grad)?;
            let dtype_ok = grad.dtype() == slot.var.dtype() || grad.dtype() == DType::F32;
            if grad.shape() != slot.var.shape() || !dtype_ok {
                bail!(
                    "{OP}: a gradient is {:?} {:?} but its variable {:?} {:?}; pass the \
                     GradStore of a backward through these variables (f32 gradients, say \
                     accumulated ones, are taken for any variable)",
                    grad.dtype(),
                    grad.dims(),
                    slot.var.dtype(),
                    slot.var.dims()
                )
            }
            let grad = grad.contiguous()?;
            if slot.var.device().is_cpu() {
                slot.state.inplace_op2(&grad, &Moments(update))?;
                slot.var.inplace_op2(&slot.state, &Apply(update))?;
            } else {
                slot.state = composite(&slot.var, &slot.state, &grad, update)?;
            }
        }
        Ok(())
    }
}

impl Optimizer for AdamW {
    type Config = ParamsAdamW;

    /// Keeps the float variables (others cannot be optimized; candle-nn drops them too).
    ///
    /// # Errors
    /// If a hyper-parameter is out of range, or candle cannot allocate the state.
    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        check_params(&params)?;
        let vars = vars
            .into_iter()
            .filter(|var| matches!(var.dtype(), DType::F32 | DType::BF16 | DType::F16))
            .map(|var| {
                let (n, device) = (var.elem_count(), var.device());
                let moments = Tensor::zeros((2, n), DType::F32, device)?;
                let state = if var.dtype() == DType::F32 {
                    moments
                } else {
                    let master = var.as_tensor().flatten_all()?.to_dtype(DType::F32)?;
                    Tensor::cat(&[moments, master.unsqueeze(0)?], 0)?
                };
                Ok(Slot { var, state })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            vars,
            step: 0,
        })
    }

    /// One update of every variable that has a gradient in `grads` (the others keep their
    /// values and moments, as in candle-nn).
    ///
    /// # Errors
    /// If a gradient's shape differs from its variable's, or its dtype is neither the
    /// variable's nor f32.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.update(grads, 1.0)
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}

fn check_params(p: &ParamsAdamW) -> Result<()> {
    let ok = p.lr.is_finite()
        && p.lr >= 0.0
        && (0.0..1.0).contains(&p.beta1)
        && (0.0..1.0).contains(&p.beta2)
        && p.eps.is_finite()
        && p.eps > 0.0
        && p.weight_decay.is_finite()
        && p.weight_decay >= 0.0;
    if !ok {
        bail!(
            "{OP}: hyper-parameters out of range (lr {}, beta1 {}, beta2 {}, eps {}, weight \
             decay {}); need lr >= 0, betas in [0, 1), eps > 0, weight decay >= 0",
            p.lr,
            p.beta1,
            p.beta2,
            p.eps,
            p.weight_decay
        )
    }
    Ok(())
}

/// The step's constants, in f32, as candle-nn's `AdamW` rounds them.
#[derive(Debug, Clone, Copy)]
struct Update {
    /// Multiplies every gradient (1: none).
    grad_scale: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    scale_m: f32,
    scale_v: f32,
    /// `1 − lr · weight_decay`.
    decay: f32,
    lr: f32,
    eps: f32,
}

impl Update {
    /// `θ · (1 − lr·λ) − lr · m̂ / (√v̂ + eps)`.
    #[inline]
    fn theta(&self, theta: f32, m: f32, v: f32) -> f32 {
        let (m_hat, v_hat) = (m * self.scale_m, v * self.scale_v);
        theta * self.decay - m_hat / (v_hat.sqrt() + self.eps) * self.lr
    }
}

/// Pass 1, on the state: `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, and the master row.
#[derive(Debug)]
struct Moments(Update);

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "adamw (moments)"
    }

    fn cpu_fwd(
        &self,
        ss: &mut CpuStorage,
        sl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let u = self.0;
        let n = gl.shape().elem_count();
        let state = slice_mut::<f32>(OP, ss, sl)?;
        let (m, rest) = state.split_at_mut(n);
        let (v, master) = rest.split_at_mut(n);
        with_float!(OP, gs.dtype(), T => {
            let g = slice::<T>(OP, gs, gl)?;
            let moments = |m: &mut [f32], v: &mut [f32], g: &[T], master: Option<&mut [f32]>| {
                for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                    let g = g.to_f32() * u.grad_scale;
                    *m = *m * u.beta1 + g * u.one_minus_beta1;
                    *v = *v * u.beta2 + g * g * u.one_minus_beta2;
                }
                if let Some(master) = master {
                    for ((w, &m), &v) in master.iter_mut().zip(&*m).zip(&*v) {
                        *w = u.theta(*w, m, v);
                    }
                }
            };
            let tasks = m
                .par_chunks_mut(ELEMS_PER_TASK)
                .zip(v.par_chunks_mut(ELEMS_PER_TASK))
                .zip(g.par_chunks(ELEMS_PER_TASK));
            if master.is_empty() {
                tasks.for_each(|((m, v), g)| moments(m, v, g, None));
            } else {
                tasks
                    .zip(master.par_chunks_mut(ELEMS_PER_TASK))
                    .for_each(|(((m, v), g), w)| moments(m, v, g, Some(w)));
            }
            Ok(())
        })
    }
}

/// Pass 2, on the parameter: the update from the moments (f32), or the rounded master row.
#[derive(Debug)]
struct Apply(Update);

impl InplaceOp2 for Apply {
    fn name(&self) -> &'static str {
        "adamw (parameter)"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let u = self.0;
        let state = slice::<f32>(OP, ss, sl)?;
        let n = pl.shape().elem_count();
        let (m, rest) = state.split_at(n);
        let (v, master) = rest.split_at(n);
        with_float!(OP, ps.dtype(), T => {
            let theta = slice_mut::<T>(OP, ps, pl)?;
            if master.is_empty() {
                theta
                    .par_chunks_mut(ELEMS_PER_TASK)
                    .zip(m.par_chunks(ELEMS_PER_TASK).zip(v.par_chunks(ELEMS_PER_TASK)))
                    .for_each(|(theta, (m, v))| {
                        for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
                            *t = T::from_f32(u.theta(t.to_f32(), m, v));
                        }
                    });
            } else {
                theta
                    .par_chunks_mut(ELEMS_PER_TASK)
                    .zip(master.par_chunks(ELEMS_PER_TASK))
                    .for_each(|(theta, master)| {
                        for (t, &w) in theta.iter_mut().zip(master) {
                            *t = T::from_f32(w);
                        }
                    });
            }
            Ok(())
        })
    }
}

/// The same update with candle ops (devices without a kernel here); returns the new state.
fn composite(var: &Var, state: &Tensor, grad: &Tensor, u: Update) -> Result<Tensor> {
    let g = (grad.flatten_all()?.to_dtype(DType::F32)? * f64::from(u.grad_scale))?;
    let m = ((state.get(0)? * f64::from(u.beta1))? + (&g * f64::from(u.one_minus_beta1))?)?;
    let v = ((state.get(1)? * f64::from(u.beta2))? + (g.sqr()? * f64::from(u.one_minus_beta2))?)?;
    let theta = if state.dim(0)? == 3 {
        state.get(2)?
    } else {
        var.as_tensor().flatten_all()?
    };
    let m_hat = (&m * f64::from(u.scale_m))?;
    let v_hat = (&v * f64::from(u.scale_v))?;
    let step = ((m_hat / (v_hat.sqrt()? + f64::from(u.eps))?)? * f64::from(u.lr))?;
    let theta = ((theta * f64::from(u.decay))? - step)?;
    var.set(&theta.to_dtype(var.dtype())?.reshape(var.shape())?)?;
    let rows = if state.dim(0)? == 3 {
        vec![m, v, theta]
    } else {
        vec![m, v]
    };
    Tensor::stack(&rows, 0)
}
