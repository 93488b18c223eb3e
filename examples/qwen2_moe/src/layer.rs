//! The decoder layer: pre-norm attention (Qwen2's, reused) and a feed-forward block that is
//! either the sparse mixture of experts or, for layers `mlp_only_layers` /
//! `decoder_sparse_step` leave dense, a plain MLP. Each with a residual connection.
//!
//! `#[checkpointable]` with a tuple return: the hidden states are the carry, the router logits
//! an auxiliary output the engine hands back per layer (recomputed layers included), so that
//! the load-balancing loss's gradient reaches the routers of checkpointed layers.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use checkpoint_runtime::checkpointable;
use qwen2::attention::Attention;
use qwen2::mlp::Mlp;
use qwen2::nn::RmsNorm;
use qwen2::rope::Rope;

use crate::config::Config;
use crate::moe::SparseMoe;

/// The feed-forward block of one layer, `model.layers.N.mlp`.
#[derive(Debug, Clone)]
pub enum FeedForward {
    /// Routed experts and the shared expert.
    Sparse(SparseMoe),
    /// A dense MLP of width `intermediate_size` (Qwen2MoeMLP).
    Dense(Mlp),
}

/// Qwen2MoeDecoderLayer, `model.layers.N`.
#[checkpointable]
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: FeedForward,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    num_experts: usize,
}

#[checkpointable]
impl DecoderLayer {
    /// Layer `index` from `vb.{self_attn, mlp, input_layernorm, post_attention_layernorm}`.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn new(cfg: &Config, index: usize, vb: &VarBuilder<'_>) -> Result<Self> {
        let base = &cfg.base;
        let mlp = if cfg.is_sparse(index) {
            FeedForward::Sparse(SparseMoe::new(cfg, &vb.pp("mlp"))?)
        } else {
            FeedForward::Dense(Mlp::new(base, &vb.pp("mlp"))?)
        };
        Ok(Self {
            self_attn: Attention::new(base, &vb.pp("self_attn"))?,
            mlp,
            input_layernorm: RmsNorm::new(base.hidden_size, base, &vb.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(
                base.hidden_size,
                base,
                &vb.pp("post_attention_layernorm"),
            )?,
            num_experts: cfg.num_experts,
        })
    }

    /// Whether this layer routes through experts (and so yields router logits).
    #[must_use]
    pub fn is_sparse(&self) -> bool {
        matches!(self.mlp, FeedForward::Sparse(_))
    }

    /// `hidden`: `(b, t, hidden)`. `attention_mask`: additive, from
    /// [`additive_mask`](qwen2::attention::additive_mask). `rope`: tables for `t` positions.
    /// Returns the new hidden states and the router logits `(b·t, experts)`; a dense layer
    /// returns `(0, experts)` router logits (every layer of one stack has one signature), which
    /// the model leaves out.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(
        &self,
        hidden: &Tensor,
        attention_mask: Option<&Tensor>,
        rope: &Rope,
    ) -> Result<(Tensor, Tensor)> {
        let normed = self.input_layernorm.forward(hidden)?;
        let hidden = (hidden + self.self_attn.forward(&normed, attention_mask, rope)?)?;
        let normed = self.post_attention_layernorm.forward(&hidden)?;
        let (out, logits) = match &self.mlp {
            FeedForward::Sparse(moe) => moe.forward(&normed)?,
            FeedForward::Dense(mlp) => {
                let none = Tensor::zeros((0, self.num_experts), hidden.dtype(), hidden.device())?;
                (mlp.forward(&normed)?, none)
            }
        };
        Ok(((&hidden + out)?, logits)) // (b, t, hidden), (b·t | 0, experts)
    }
}
