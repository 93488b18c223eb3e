//! Qwen2-MoE (Hugging Face `Qwen2MoeForCausalLM`) in candle, on top of the `qwen2` example's
//! attention, norms, rotary embedding and loader.
//!
//! Read top to bottom: [`config`] → [`router`] → [`moe`] (routed experts, shared expert and
//! its sigmoid gate) → [`layer`] → [`model`] → [`router_loss`] (load balancing, total loss);
//! then [`loader`] and [`verify`] (parity against a reference file).

pub mod config;
pub mod layer;
pub mod loader;
pub mod model;
pub mod moe;
pub mod router;
pub mod router_loss;
pub mod train;
pub mod verify;

pub use config::Config;
pub use model::{Output, Qwen2Moe};
pub use qwen2::{Error, Result};
