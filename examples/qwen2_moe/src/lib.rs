//! Qwen2-MoE (Hugging Face `Qwen2MoeForCausalLM`) in candle, on top of the `qwen2` example's
//! attention, norms, rotary embedding and loader.
//!
//! Read top to bottom: [`config`] → [`router`] → [`moe`] (routed experts, shared expert and
//! its sigmoid gate) → [`layer`] → [`model`] → [`router_loss`] (load balancing, total loss);
//! then [`loader`], [`train`] and [`verify`] (parity against a reference file).
//!
//! The decoder layer is `#[checkpointable]` and returns `(hidden, router logits)`: with an
//! engine, the router logits come back from checkpointed (recomputed, offloaded) layers as
//! auxiliary outputs, and the load-balancing loss's gradient reaches their routers.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use checkpoint_runtime::{Checkpointer, Policy};
//!
//! # fn main() -> qwen2::Result<()> {
//! let dev = Device::Cpu;
//! let loaded = qwen2_moe::loader::load("tests/fixtures/qwen2-moe-tiny".as_ref(), DType::F32, &dev)?;
//! let batch = qwen2::data::collate(&[&[1, 2, 3, 4], &[5, 6]], &dev)?;
//! let mask = Some(&batch.attention_mask);
//! let ckpt = Checkpointer::new(Policy::recompute());
//! let out = loaded.model.forward(&batch.input_ids, mask, Some(&ckpt))?;
//! let (loss, _ce, _aux) = qwen2_moe::router_loss::total_loss(
//!     &out.logits,
//!     &batch.labels,
//!     &out.router_logits,
//!     loaded.model.config(),
//!     mask,
//! )?;
//! let grads = ckpt.backward(&loss)?; // not loss.backward(): see Checkpointer
//! # let _ = grads;
//! # Ok(())
//! # }
//! ```

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
