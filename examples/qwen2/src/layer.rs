//! The decoder layer: pre-norm attention and MLP, each with a residual connection.
//!
//! The layer's `forward` is what `#[checkpointable]` will annotate: the first argument after
//! `&self` is the carry (the hidden states), the rest are keyword arguments. Until the macro
//! lands, the keyword record and the `Layer` implementation it will generate are written by hand
//! at the end of this file; switching to the macro deletes them and adds the two attributes.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use checkpoint_runtime::{Kwargs, Layer};

use crate::attention::Attention;
use crate::config::Config;
use crate::mlp::Mlp;
use crate::nn::RmsNorm;
use crate::rope::Rope;

/// Qwen2DecoderLayer, `model.layers.N`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// `vb.{self_attn, mlp, input_layernorm, post_attention_layernorm}`.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn new(cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(cfg, &vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, &vb.pp("mlp"))?,
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

// ---- What `#[checkpointable]` generates for `forward`, written by hand until it lands. ----

/// The keyword arguments of [`DecoderLayer::forward`], owned so that the engine can keep them
/// until backward re-runs the layer.
#[derive(Debug, Clone)]
pub struct DecoderLayerKwargs {
    /// The additive mask, `(b, 1, t, t)` f32.
    pub attention_mask: Option<Tensor>,
    /// The rotary tables.
    pub rope: Rope,
}

impl Kwargs for DecoderLayerKwargs {}

impl Layer<DecoderLayerKwargs> for DecoderLayer {
    fn forward_checkpointed(&self, carry: &Tensor, kwargs: &DecoderLayerKwargs) -> Result<Tensor> {
        self.forward(carry, kwargs.attention_mask.as_ref(), &kwargs.rope)
    }
}
