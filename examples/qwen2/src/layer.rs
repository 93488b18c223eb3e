//! The decoder layer: pre-norm attention and MLP, each with a residual connection.
//!
//! `#[checkpointable]` on the struct and on its impl makes `forward` checkpointable: the first
//! argument after `&self` is the carry (the hidden states), the rest are keyword arguments. The
//! macro generates the keyword records [`DecoderLayerKwargs`] (borrowed, by name) and
//! [`DecoderLayerKwargsOwned`] (what the engine keeps until backward re-runs the layer), the
//! runtime's [`Layer`](checkpoint_runtime::Layer) implementation, and the curried
//! (`layer.partial(mask, &rope)`) and kwargs-bound (`layer.call_kw(&xs, ..)`) forms.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use checkpoint_runtime::checkpointable;

use crate::attention::Attention;
use crate::config::Config;
use crate::lora::LoraConfig;
use crate::mlp::Mlp;
use crate::nn::RmsNorm;
use crate::rope::Rope;

/// Qwen2DecoderLayer, `model.layers.N`.
#[checkpointable]
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

#[checkpointable]
impl DecoderLayer {
    /// `vb.{self_attn, mlp, input_layernorm, post_attention_layernorm}`.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn new(cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        Self::with_lora(cfg, None, vb)
    }

    /// [`DecoderLayer::new`], with LoRA updates on the projections `lora` targets.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn with_lora(cfg: &Config, lora: Option<&LoraConfig>, vb: &VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::with_lora(cfg, lora, &vb.pp("self_attn"))?,
            mlp: Mlp::with_lora(cfg, lora, &vb.pp("mlp"))?,
            input_layernorm: RmsNorm::new(cfg.hidden_size, cfg, &vb.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                cfg,
                &vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    /// `hidden`: `(b, t, hidden)`, the carry. `attention_mask`: the additive mask of
    /// [`additive_mask`](crate::attention::additive_mask), `None` for causal only. `rope`: the
    /// rotary tables for `t` positions.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(
        &self,
        hidden: &Tensor,
        attention_mask: Option<&Tensor>,
        rope: &Rope,
    ) -> Result<Tensor> {
        let normed = self.input_layernorm.forward(hidden)?;
        let hidden = (hidden + self.self_attn.forward(&normed, attention_mask, rope)?)?;
        let normed = self.post_attention_layernorm.forward(&hidden)?;
        &hidden + self.mlp.forward(&normed)? // (b, t, hidden)
    }
}
