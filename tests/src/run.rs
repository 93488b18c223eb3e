//! One training step through an engine, and how far two steps' results are apart.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use checkpoint_runtime::{Checkpointer, Kwargs, Layer};

use crate::compare::{max_abs_diff, max_grad_diff};

/// One step's results: the stack output, the loss and the complete gradient store.
#[derive(Debug)]
pub struct Step {
    /// The stack's output.
    pub output: Tensor,
    /// The loss (a scalar).
    pub loss: Tensor,
    /// What [`Checkpointer::backward`] returned.
    pub grads: GradStore,
}

/// Runs `layers` on `input` through `ckpt`, each with `kwargs`, and back-propagates a loss that
/// weighs every output element differently (so that no gradient is uniform).
///
/// # Errors
/// The engine's error.
pub fn step<L: Layer<K>, K: Kwargs + Clone>(
    ckpt: &Checkpointer,
    layers: &[L],
    kwargs: &K,
    input: &Tensor,
) -> checkpoint_runtime::Result<Step> {
    let output = ckpt.run_stack(input, layers.iter().map(|l| (l, kwargs.clone())))?;
    let n = u32::try_from(output.elem_count()).unwrap_or(u32::MAX);
    let weights = Tensor::arange(0u32, n, input.device())?
        .to_dtype(output.dtype())?
        .reshape(output.shape())?
        .affine(1e-3, -0.5)?
        .cos()?;
    let loss = (&output * weights)?.sum_all()?;
    let grads = ckpt.backward(&loss)?;
    Ok(Step {
        output,
        loss,
        grads,
    })
}

/// The largest difference between two steps: their outputs, losses, the gradients of `input`
/// and of every one of `params`. Fails if either store lacks one of those gradients or holds
/// any other, or if the shapes differ.
///
/// # Errors
/// A missing or extra gradient, or mismatched shapes.
pub fn step_diff(a: &Step, b: &Step, input: &Var, params: &[Var]) -> Result<f64> {
    for (which, step) in [("first", a), ("second", b)] {
        let held = step.grads.get_ids().count();
        if held != params.len() + 1 {
            return Err(candle_core::Error::msg(format!(
                "the {which} store holds {held} gradients, not {} (the input and every \
                 parameter)",
                params.len() + 1
            )));
        }
    }
    let input_grad = |s: &Step| {
        s.grads
            .get(input.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::msg("the input has no gradient"))
    };
    Ok(max_abs_diff(&a.output, &b.output)?
        .max(max_abs_diff(&a.loss, &b.loss)?)
        .max(max_abs_diff(&input_grad(a)?, &input_grad(b)?)?)
        .max(max_grad_diff(&a.grads, &b.grads, params)?))
}
