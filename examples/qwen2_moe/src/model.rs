//! Qwen2MoeForCausalLM: token embedding → decoder layers → final norm → output head, with the
//! router logits of every sparse layer for the load-balancing loss.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use checkpoint_runtime::{Checkpointer, checkpointable};
use qwen2::attention::additive_mask;
use qwen2::model::Ends;
use qwen2::rope::Rope;

use crate::config::Config;
use crate::layer::DecoderLayer;

/// What one forward pass yields.
#[derive(Debug, Clone)]
pub struct Output {
    /// `(b, t, vocab)`.
    pub logits: Tensor,
    /// The router logits of each sparse layer, in layer order, each `(b·t, experts)`.
    pub router_logits: Vec<Tensor>,
}

/// The causal language model; its parameters carry their Hugging Face names in the
/// [`VarBuilder`] it was built from.
#[derive(Debug, Clone)]
pub struct Qwen2Moe {
    /// Qwen2's embedding, final norm and head.
    ends: Ends,
    layers: Vec<DecoderLayer>,
    cfg: Config,
}

impl Qwen2Moe {
    /// `vb.model.{embed_tokens, layers.N, norm}` and, for an untied head, `vb.lm_head.weight`.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn new(cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        let layers = (0..cfg.base.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, i, &vb.pp("model.layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            ends: Ends::new(&cfg.base, vb)?,
            layers,
            cfg: cfg.clone(),
        })
    }

    /// The configuration the model was built from.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Logits and router logits for `input_ids` `(b, t)` (u32 or i64) with `attention_mask`
    /// `(b, t)` (1 = token, 0 = right padding; `None` = no padding).
    ///
    /// `ckpt`: `None` runs the layers as plain calls; `Some` runs the whole stack through the
    /// engine as one stack, the router logits coming back as each layer's auxiliary output, and
    /// the gradients must then come from [`Checkpointer::backward`].
    ///
    /// # Errors
    /// On a shape mismatch, or an engine error naming the layer.
    #[checkpointable(engine = ckpt)]
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        ckpt: Option<&Checkpointer>,
    ) -> Result<Output> {
        let (b, t) = input_ids.dims2()?;
        let device = input_ids.device();
        let mut xs = self.ends.embed(input_ids)?; // (b, t, hidden)
        let rope = Rope::new(&self.cfg.base, t, xs.dtype(), device)?;
        let mask = additive_mask(attention_mask, b, t, device)?; // (b, 1, t, t) f32
        let mut all_logits = Vec::with_capacity(self.layers.len());
        #[checkpoint] // the whole loop: ONE engine stack (the plain calls when `ckpt` is None)
        for layer in &self.layers {
            let (h, logits) = layer.forward(&xs, Some(&mask), &rope)?;
            xs = h;
            all_logits.push(logits);
        }
        // Dense layers route nothing: the load-balancing loss is over the sparse ones only.
        let router_logits = self
            .layers
            .iter()
            .zip(all_logits)
            .filter(|(layer, _)| layer.is_sparse())
            .map(|(_, logits)| logits)
            .collect();
        Ok(Output {
            logits: self.ends.head(&xs)?, // (b, t, vocab)
            router_logits,
        })
    }
}
