//! `config.json` of a Hugging Face Qwen2-MoE checkpoint: the Qwen2 keys (attention, norms,
//! rotary base, vocabulary; read and validated by [`qwen2::Config`]) plus the mixture-of-experts
//! keys. Settings this implementation does not implement are refused naming the key.

use std::path::Path;

use qwen2::{Error, Result};
use serde::Deserialize;

/// The hyper-parameters of a Qwen2-MoE model, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Everything a Qwen2 decoder shares: widths, heads, norms, rope, vocabulary, head tying.
    /// Its `intermediate_size` is the width of the dense MLP of non-sparse layers.
    pub base: qwen2::Config,
    /// Routed experts per sparse layer.
    pub num_experts: usize,
    /// Experts each token is routed to (top-k).
    pub num_experts_per_tok: usize,
    /// Inner width of one routed expert.
    pub moe_intermediate_size: usize,
    /// Inner width of the shared expert (every token goes through it).
    pub shared_expert_intermediate_size: usize,
    /// Whether the top-k routing weights are renormalised to sum to 1.
    pub norm_topk_prob: bool,
    /// Layer `i` is sparse when `(i + 1) % decoder_sparse_step == 0` (and not in
    /// `mlp_only_layers`).
    pub decoder_sparse_step: usize,
    /// Layers with a dense MLP whatever `decoder_sparse_step` says.
    pub mlp_only_layers: Vec<usize>,
    /// Weight of the load-balancing loss in the total loss.
    pub router_aux_loss_coef: f64,
}

/// The mixture-of-experts keys as written.
#[derive(Debug, Deserialize)]
struct RawMoe {
    num_experts: usize,
    num_experts_per_tok: usize,
    moe_intermediate_size: usize,
    shared_expert_intermediate_size: usize,
    #[serde(default)]
    norm_topk_prob: bool,
    #[serde(default = "one")]
    decoder_sparse_step: usize,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    #[serde(default = "default_aux_coef")]
    router_aux_loss_coef: f64,
}

fn one() -> usize {
    1
}

fn default_aux_coef() -> f64 {
    0.001
}

impl Config {
    /// Reads and validates `path` (a `config.json`).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Json`] for an unreadable file, [`Error::Config`] naming the key
    /// of a setting that is not implemented or inconsistent.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text).map_err(|err| match err {
            Error::Json { source, .. } => Error::Json {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    ///
    /// # Errors
    /// As [`Config::from_file`].
    pub fn from_json(text: &str) -> Result<Self> {
        let base = qwen2::Config::from_json(text)?;
        let raw: RawMoe = serde_json::from_str(text).map_err(|source| Error::Json {
            path: "config.json".into(),
            source,
        })?;
        if raw.num_experts == 0 {
            return Err(Error::config(
                "num_experts",
                "0 experts: a Qwen2-MoE model needs at least one (use the qwen2 example for a \
                 dense model)",
            ));
        }
        if raw.num_experts_per_tok == 0 || raw.num_experts_per_tok > raw.num_experts {
            return Err(Error::config(
                "num_experts_per_tok",
                format!(
                    "{} experts per token out of {}: it must be between 1 and num_experts",
                    raw.num_experts_per_tok, raw.num_experts
                ),
            ));
        }
        if raw.decoder_sparse_step == 0 {
            return Err(Error::config(
                "decoder_sparse_step",
                "0: give 1 (every layer sparse) or more",
            ));
        }
        if let Some(&i) = raw
            .mlp_only_layers
            .iter()
            .find(|&&i| i >= base.num_hidden_layers)
        {
            return Err(Error::config(
                "mlp_only_layers",
                format!(
                    "layer {i} does not exist: the model has {} layers",
                    base.num_hidden_layers
                ),
            ));
        }
        Ok(Self {
            base,
            num_experts: raw.num_experts,
            num_experts_per_tok: raw.num_experts_per_tok,
            moe_intermediate_size: raw.moe_intermediate_size,
            shared_expert_intermediate_size: raw.shared_expert_intermediate_size,
            norm_topk_prob: raw.norm_topk_prob,
            decoder_sparse_step: raw.decoder_sparse_step,
            mlp_only_layers: raw.mlp_only_layers,
            router_aux_loss_coef: raw.router_aux_loss_coef,
        })
    }

    /// Whether layer `i` routes through experts (else it has a dense MLP), as transformers
    /// decides it.
    #[must_use]
    pub fn is_sparse(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i) && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// A small random-init model for `qwen2-moe train`: byte vocabulary, width 64, 2 layers,
    /// 4 experts (top 2) and a shared expert.
    #[must_use]
    pub fn tiny_bytes() -> Self {
        let base = qwen2::Config {
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 176,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
            initializer_range: 0.02,
        };
        Self {
            base,
            num_experts: 4,
            num_experts_per_tok: 2,
            moe_intermediate_size: 64,
            shared_expert_intermediate_size: 128,
            norm_topk_prob: false,
            decoder_sparse_step: 1,
            mlp_only_layers: Vec::new(),
            router_aux_loss_coef: 0.01,
        }
    }
}
