//! The rotary position embedding of Qwen2 (the "default" rope type, no scaling):
//! `inv_freq[i] = 1 / theta^(2i / head_dim)`, angle = position × inv_freq, computed in f32 and
//! cast to the compute dtype, as transformers does. Applied with the fused, differentiable
//! `checkpoint_ops::rope` (candle-nn's `rope` / `rope_i` / `rope_thd` kernels cut the gradient).

use candle_core::{DType, Device, Result, Tensor};

use crate::config::Config;

/// Cosine and sine tables for positions `0..t`, shared by every layer of one forward pass.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor, // (t, d / 2)
    sin: Tensor, // (t, d / 2)
}

impl Rope {
    /// The tables for a sequence of `t` positions.
    ///
    /// # Errors
    /// If candle cannot build them on `device`.
    pub fn new(cfg: &Config, t: usize, dtype: DType, device: &Device) -> Result<Self> {
        let d = cfg.head_dim;
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| {
                #[allow(clippy::cast_precision_loss)]
                let exponent = (2 * i) as f64 / d as f64;
                #[allow(clippy::cast_possible_truncation)]
                let f = (1.0 / cfg.rope_theta.powf(exponent)) as f32;
                f
            })
            .collect();
        #[allow(clippy::cast_precision_loss)]
        let positions: Vec<f32> = (0..t).map(|p| p as f32).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, d / 2), device)?;
        let positions = Tensor::from_vec(positions, (t, 1), device)?;
        let angles = positions.matmul(&inv_freq)?; // (t, d / 2)
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    /// Rotates `xs` of shape `(b, h, t, d)` (any layout; the op makes it contiguous).
    ///
    /// # Errors
    /// If `xs` is longer than the tables or misshapen.
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        checkpoint_ops::rope(xs, &self.cos, &self.sin)
    }
}
