//! Small building blocks shared by the modules: a linear layer initialised the way transformers
//! initialises Qwen2, and an RMS norm (the fused, differentiable `checkpoint_ops::rms_norm`).

use candle_core::{Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use crate::config::Config;

/// A linear layer: `vb.weight` of shape `(out, in)` (and `vb.bias` of shape `(out,)` when `bias`), drawn from
/// N(0, initializer_range) / zeros when the builder creates them.
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    cfg: &Config,
    vb: &VarBuilder<'_>,
) -> Result<Linear> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: cfg.initializer_range,
    };
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// Root-mean-square normalisation, Qwen2RMSNorm: statistics in f32. One pass per row with
/// [`checkpoint_ops::rms_norm`], which has a backward (candle-nn's fused `rms_norm` /
/// `RmsNorm::forward` would cut the gradient, DESIGN §4); in bf16/f16 the weight is applied
/// before the single rounding, where transformers rounds the normalised value first.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// `vb.weight`, shape `(size,)`, ones when created.
    ///
    /// # Errors
    /// If the builder has no such tensor or it is misshapen.
    pub fn new(size: usize, cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        #[allow(clippy::cast_possible_truncation)]
        let eps = cfg.rms_norm_eps as f32;
        Ok(Self {
            weight: vb.get_with_hints(size, "weight", Init::Const(1.0))?,
            eps,
        })
    }

    /// Normalises over the last dimension.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        checkpoint_ops::rms_norm(xs, &self.weight, self.eps)
    }
}
