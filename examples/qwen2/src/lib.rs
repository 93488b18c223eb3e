//! Qwen2 (Hugging Face `Qwen2ForCausalLM`) in candle, written with differentiable ops only and
//! trained through `checkpoint-runtime`'s engines.
//!
//! Read top to bottom: [`config`] → [`rope`] → [`nn`] → [`mlp`] → [`attention`] → [`layer`] →
//! [`model`] → [`loss`]; then [`loader`] (checkpoints into trainable variables), [`save`] (and
//! back out), [`lora`] and [`adapter`] (LoRA updates on a frozen base, PEFT adapter
//! directories), [`state`] (the optimizer and sampler, to resume a run), [`tokenizer`] (the
//! checkpoint's `tokenizer.json`, or bytes), [`chat`] (chat templates and assistant-only
//! labels), [`data`] (text and JSONL files into labelled batches, an eval split), [`threads`]
//! (how candle's CPU thread pools share the cores), [`train`] and [`verify`] (parity against a
//! reference file); [`cli`] holds what the binaries share on their command lines, and
//! [`bench`](mod@bench) times one full training step.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use checkpoint_runtime::{Checkpointer, Policy};
//!
//! # fn main() -> qwen2::Result<()> {
//! let dev = Device::Cpu;
//! let loaded = qwen2::loader::load("tests/fixtures/qwen2-tiny".as_ref(), DType::F32, &dev)?;
//! let batch = qwen2::data::collate(&[&[1, 2, 3, 4], &[5, 6]], &dev)?;
//! let ckpt = Checkpointer::new(Policy::recompute());
//! let logits = loaded.model.forward(&batch.input_ids, Some(&batch.attention_mask), Some(&ckpt))?;
//! let loss = qwen2::loss::causal_lm_loss(&logits, &batch.labels)?;
//! let grads = ckpt.backward(&loss)?; // not loss.backward(): see Checkpointer
//! # let _ = grads;
//! # Ok(())
//! # }
//! ```

pub mod adapter;
pub mod attention;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod config;
pub mod data;
pub mod error;
pub mod layer;
pub mod loader;
pub mod lora;
pub mod loss;
pub mod mlp;
pub mod model;
pub mod nn;
pub mod plot;
pub mod rope;
pub mod save;
pub mod state;
pub mod threads;
pub mod tokenizer;
pub mod train;
pub mod verify;

pub use config::Config;
pub use error::{Error, Result};
pub use layer::{DecoderLayer, DecoderLayerKwargs, DecoderLayerKwargsOwned};
pub use model::Qwen2;
