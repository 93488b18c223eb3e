//! Qwen2ForCausalLM: token embedding → decoder layers → final norm → output head (tied to the
//! embedding or its own `lm_head.weight`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, Init, Linear, VarBuilder};
use checkpoint_runtime::{Checkpointer, checkpointable};

use crate::attention::additive_mask;
use crate::config::Config;
use crate::layer::DecoderLayer;
use crate::lora::LoraConfig;
use crate::nn::{RmsNorm, linear};
use crate::rope::Rope;

/// The ends of a Qwen2-family causal LM, around its decoder stack: the token embedding in, the
/// final norm and the output head out (Qwen2-MoE shares them).
#[derive(Debug, Clone)]
pub struct Ends {
    embed_tokens: Embedding,
    norm: RmsNorm,
    lm_head: Linear,
}

impl Ends {
    /// `vb.model.{embed_tokens, norm}` and, for an untied head, `vb.lm_head.weight`.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn new(cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        let model = vb.pp("model");
        let init = Init::Randn {
            mean: 0.0,
            stdev: cfg.initializer_range,
        };
        let embeddings = model.pp("embed_tokens").get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "weight",
            init,
        )?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg, &model.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embeddings.clone(), None)
        } else {
            linear(
                cfg.hidden_size,
                cfg.vocab_size,
                false,
                cfg,
                &vb.pp("lm_head"),
            )?
        };
        Ok(Self {
            embed_tokens: Embedding::new(embeddings, cfg.hidden_size),
            norm,
            lm_head,
        })
    }

    /// Hidden states `(b, t, hidden)` for `input_ids` `(b, t)`.
    ///
    /// # Errors
    /// An id outside the vocabulary.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(input_ids)
    }

    /// Logits `(b, t, vocab)` for the last layer's hidden states `(b, t, hidden)`.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn head(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.norm.forward(xs)?; // (b, t, hidden)
        self.lm_head.forward(&xs) // (b, t, vocab)
    }
}

/// The causal language model. Its parameters carry their Hugging Face names in the
/// [`VarBuilder`] it was built from.
#[derive(Debug, Clone)]
pub struct Qwen2 {
    ends: Ends,
    layers: Vec<DecoderLayer>,
    cfg: Config,
}

impl Qwen2 {
    /// `vb.model.{embed_tokens, layers.N, norm}` and, for an untied head, `vb.lm_head.weight`.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn new(cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        Self::with_lora(cfg, None, vb)
    }

    /// [`Qwen2::new`], with LoRA updates on the projections `lora` targets, in every layer
    /// (`vb.model.layers.N.{self_attn,mlp}.P.lora_{A,B}.weight`).
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn with_lora(cfg: &Config, lora: Option<&LoraConfig>, vb: &VarBuilder<'_>) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::with_lora(cfg, lora, &vb.pp("model.layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            ends: Ends::new(cfg, vb)?,
            layers,
            cfg: cfg.clone(),
        })
    }

    /// The configuration the model was built from.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Logits `(b, t, vocab)` for `input_ids` `(b, t)` (u32 or i64) with `attention_mask`
    /// `(b, t)` (1 = token, 0 = right padding; `None` = no padding).
    ///
    /// `ckpt`: `None` runs the layers as plain calls; `Some` runs the whole stack through the
    /// engine as one `run_stack` (the `#[checkpoint]` loop below, rewritten by
    /// `#[checkpointable(engine = ckpt)]`), and the gradients must then come from
    /// [`Checkpointer::backward`].
    ///
    /// # Errors
    /// On a shape mismatch, or an engine error naming the layer.
    #[checkpointable(engine = ckpt)]
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        ckpt: Option<&Checkpointer>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let device = input_ids.device();
        let mut xs = self.ends.embed(input_ids)?; // (b, t, hidden)
        let rope = Rope::new(&self.cfg, t, xs.dtype(), device)?;
        let mask = additive_mask(attention_mask, b, t, device)?; // (b, 1, t, t) f32
        #[checkpoint] // the whole loop: ONE engine stack (the plain calls when `ckpt` is None)
        for layer in &self.layers {
            xs = layer.forward(&xs, Some(&mask), &rope)?;
        }
        self.ends.head(&xs) // (b, t, vocab)
    }
}
