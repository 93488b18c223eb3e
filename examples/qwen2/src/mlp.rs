//! The SwiGLU feed-forward block: `down_proj(silu(gate_proj(x)) * up_proj(x))`, the gate and the
//! product fused (`checkpoint_ops::silu_mul`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::config::Config;
use crate::nn::linear;

/// Qwen2MLP.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// `vb.{gate_proj, up_proj, down_proj}.weight`.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn new(cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        Self::with_width(cfg.intermediate_size, cfg, vb)
    }

    /// As [`Mlp::new`] with an inner width of `intermediate` (a mixture-of-experts model's
    /// experts and shared expert are narrower than `cfg.intermediate_size`).
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn with_width(intermediate: usize, cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, intermediate);
        Ok(Self {
            gate_proj: linear(h, i, false, cfg, &vb.pp("gate_proj"))?,
            up_proj: linear(h, i, false, cfg, &vb.pp("up_proj"))?,
            down_proj: linear(i, h, false, cfg, &vb.pp("down_proj"))?,
        })
    }

    /// `(b, t, hidden)` → `(b, t, hidden)`.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(xs)?; // (b, t, i)
        let up = self.up_proj.forward(xs)?; // (b, t, i)
        self.down_proj
            .forward(&checkpoint_ops::silu_mul(&gate, &up)?) // (b, t, h)
    }
}
