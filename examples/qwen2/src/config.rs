//! `config.json` of a Hugging Face Qwen2 checkpoint, in both spellings of the rotary base:
//! `rope_theta` at the top level (published Qwen2 checkpoints) or
//! `rope_parameters: {rope_theta, rope_type}` (what transformers 5 writes).
//!
//! Settings this implementation does not implement are refused with an error naming the key,
//! never silently ignored.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The model hyper-parameters, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary size (rows of `model.embed_tokens.weight`).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Longest sequence the rotary embedding is meant for.
    pub max_position_embeddings: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// Whether the output head shares the embedding matrix (no `lm_head.weight` in the file).
    pub tie_word_embeddings: bool,
    /// Standard deviation of the random initialisation.
    pub initializer_range: f64,
}

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    use_sliding_window: bool,
    layer_types: Option<Vec<String>>,
    hidden_act: Option<String>,
    attention_dropout: Option<f64>,
    #[serde(default = "default_init_range")]
    initializer_range: f64,
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

fn default_max_positions() -> usize {
    32768
}

fn default_eps() -> f64 {
    1e-6
}

fn default_init_range() -> f64 {
    0.02
}

impl Config {
    /// Reads and validates `path` (a `config.json`).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Json`] for an unreadable file, [`Error::Config`] naming the key
    /// of a setting that is not implemented or inconsistent.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
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
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| Error::Json {
            path: "config.json".into(),
            source,
        })?;
        raw.validate()
    }

    /// The `config.json` text of this configuration, in the spelling published Qwen2
    /// checkpoints use (top-level `rope_theta`), readable by transformers and by
    /// [`Config::from_json`].
    #[must_use]
    pub fn to_json(&self) -> String {
        let value = serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": false,
        });
        // A `Value` always serialises.
        format!("{value:#}\n")
    }

    /// The small byte-level model that `qwen2 train` initialises at random: vocabulary 256,
    /// width 128, 4 layers, 4 query heads over 2 key/value heads, tied head.
    #[must_use]
    pub fn tiny_bytes() -> Self {
        Self {
            vocab_size: 256,
            hidden_size: 128,
            intermediate_size: 352,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 32,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
            initializer_range: 0.02,
        }
    }

    /// Query heads served by each key/value head.
    #[must_use]
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

impl RawConfig {
    fn validate(self) -> Result<Config> {
        if self.use_sliding_window {
            return Err(Error::config(
                "use_sliding_window",
                "sliding-window attention is not implemented; set it to false (full attention, \
                 what Qwen2 checkpoints ship with) or train with a model that does not need it",
            ));
        }
        if let Some(types) = &self.layer_types
            && let Some(i) = types.iter().position(|t| t != "full_attention")
        {
            return Err(Error::config(
                "layer_types",
                format!(
                    "layer {i} is `{}`; only `full_attention` is implemented",
                    types[i]
                ),
            ));
        }
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return Err(Error::config(
                "hidden_act",
                format!("`{act}` is not implemented; Qwen2 uses `silu`"),
            ));
        }
        if self.attention_dropout.is_some_and(|p| p != 0.0) {
            return Err(Error::config(
                "attention_dropout",
                "dropout is not implemented (and recomputation must reproduce the forward \
                 exactly); set it to 0.0",
            ));
        }
        if let Some(scaling) = &self.rope_scaling
            && !scaling.is_null()
            && !is_default_rope(scaling)
        {
            return Err(Error::config(
                "rope_scaling",
                format!(
                    "rope scaling {scaling} is not implemented; only the default rotary \
                         embedding is (set rope_scaling to null)"
                ),
            ));
        }
        let rope_theta = match (&self.rope_parameters, self.rope_theta) {
            (Some(params), top) => {
                if let Some(kind) = &params.rope_type
                    && kind != "default"
                {
                    return Err(Error::config(
                        "rope_parameters.rope_type",
                        format!(
                            "rope type `{kind}` is not implemented; only `default` is \
                                 (rope scaling is not supported)"
                        ),
                    ));
                }
                let theta = params.rope_theta.or(top).ok_or_else(|| {
                    Error::config(
                        "rope_parameters.rope_theta",
                        "missing: the rotary base must be given",
                    )
                })?;
                if top.is_some_and(|t| t != theta) {
                    return Err(Error::config(
                        "rope_theta",
                        format!(
                            "the top-level rope_theta ({top:?}) disagrees with \
                             rope_parameters.rope_theta ({theta}); keep one of them"
                        ),
                    ));
                }
                theta
            }
            (None, Some(theta)) => theta,
            (None, None) => {
                return Err(Error::config(
                    "rope_theta",
                    "missing: give `rope_theta` at the top level or \
                     `rope_parameters: {\"rope_theta\": ..., \"rope_type\": \"default\"}`",
                ));
            }
        };
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(Error::config(
                "num_key_value_heads",
                format!(
                    "{kv_heads} key/value heads cannot serve {heads} query heads: it must be a \
                     non-zero divisor of num_attention_heads"
                ),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if self.hidden_size.is_multiple_of(heads) => self.hidden_size / heads,
            None => {
                return Err(Error::config(
                    "hidden_size",
                    format!(
                        "{} is not a multiple of num_attention_heads ({heads}); give head_dim",
                        self.hidden_size
                    ),
                ));
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(Error::config(
                "head_dim",
                format!("{head_dim} is odd; the rotary embedding needs an even head width"),
            ));
        }
        Ok(Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            tie_word_embeddings: self.tie_word_embeddings,
            initializer_range: self.initializer_range,
        })
    }
}

/// `{"rope_type": "default"}` (or `"type"`) is the plain rotary embedding.
fn is_default_rope(scaling: &serde_json::Value) -> bool {
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(serde_json::Value::as_str);
    kind == Some("default")
}
