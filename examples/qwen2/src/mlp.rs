//! The SwiGLU feed-forward block: `down_proj(silu(gate_proj(x)) * up_proj(x))`, the gate and the
//! product fused (`checkpoint_ops::silu_mul`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::Config;
use crate::lora::{LoraConfig, LoraLinear, Target};

/// Qwen2MLP.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

impl Mlp {
    /// `vb.{gate_proj, up_proj, down_proj}.weight`.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn new(cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        Self::with_lora(cfg, None, vb)
    }

    /// [`Mlp::new`], with LoRA updates on the projections `lora` targets.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn with_lora(cfg: &Config, lora: Option<&LoraConfig>, vb: &VarBuilder<'_>) -> Result<Self> {
        Self::build(cfg.intermediate_size, cfg, lora, vb)
    }

    /// As [`Mlp::new`] with an inner width of `intermediate` (a mixture-of-experts model's
    /// experts and shared expert are narrower than `cfg.intermediate_size`).
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn with_width(intermediate: usize, cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        Self::build(intermediate, cfg, None, vb)
    }

    fn build(
        intermediate: usize,
        cfg: &Config,
        lora: Option<&LoraConfig>,
        vb: &VarBuilder<'_>,
    ) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, intermediate);
        let proj = |i, o, target: Target| {
            LoraLinear::new(i, o, false, target, cfg, lora, &vb.pp(target.name()))
        };
        Ok(Self {
            gate_proj: proj(h, i, Target::GateProj)?,
            up_proj: proj(h, i, Target::UpProj)?,
            down_proj: proj(i, h, Target::DownProj)?,
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
