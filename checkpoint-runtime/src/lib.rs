//! Gradient checkpointing for [candle](https://github.com/huggingface/candle), with the layer
//! resolved at compile time and gradients equal to the plain graph's.
//!
//! - [`checkpointable`]: the attribute that makes a layer checkpointable (struct and impl) and
//!   rewrites the layer calls of a model's forward into calls through an engine.
//! - [`Layer`] and [`Kwargs`]: what the attribute implements: one entry point taking the layer
//!   (`&self`), the carry tensor and the owned keyword record ([`MultiLayer`] for a method with
//!   several carries or auxiliary outputs); [`Partial`] and [`Method`]: a method with its keyword
//!   arguments bound, called later.
//! - [`Checkpointer`]: runs stacks of layers under a [`Policy`] and returns complete gradients
//!   from [`Checkpointer::backward`], or steps a candle-nn optimizer with them
//!   ([`Checkpointer::backward_step`]); [`Stats`] says what it kept where and what that cost.
//! - [`GradientAudit`]: names the trainable variables a backward left without a gradient (the
//!   weights behind a candle-nn op that cuts the graph).
//! - [`rng`]: dropout and uniform draws that recomputation replays (candle's own
//!   `candle_nn::ops::dropout` draws anew when a layer is recomputed, and its gradients are
//!   wrong); [`RecomputeCheck`] checks every recomputed output against the forward's.
//!
//! A checkpointed stack is one node of candle's graph. The forward runs the layers without
//! keeping their graphs and stores only each segment's input (its boundary) on the device
//! ([`Mode::Recompute`]), in host memory ([`Mode::OffloadHost`]) or in a private file
//! ([`Mode::OffloadDisk`]); the backward brings each boundary back, re-runs its segment and
//! back-propagates through that fresh graph. Everything downstream of the stack is ordinary
//! candle, and the gradients are those of the plain graph ([`Mode::None`]): bit for bit on CPU.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use checkpoint_runtime::{Checkpointer, Mode, Policy, checkpointable};
//!
//! #[checkpointable]
//! #[derive(Clone)]
//! struct Scale(Var);
//!
//! #[checkpointable]
//! impl Scale {
//!     fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
//!         xs.broadcast_mul(self.0.as_tensor())?.tanh()
//!     }
//! }
//!
//! /// The loop becomes one checkpointed stack; with `ckpt = None`, plain calls.
//! #[checkpointable(engine = ckpt)]
//! fn stack(layers: &[Scale], xs: &Tensor, ckpt: Option<&Checkpointer>) -> candle_core::Result<Tensor> {
//!     let mut xs = xs.clone();
//!     #[checkpoint]
//!     for layer in layers {
//!         xs = layer.forward(&xs)?;
//!     }
//!     Ok(xs)
//! }
//!
//! # fn main() -> checkpoint_runtime::Result<()> {
//! let dev = Device::Cpu;
//! let layers = vec![Scale(Var::new(&[0.5f32], &dev)?), Scale(Var::new(&[2.0f32], &dev)?)];
//! let xs = Tensor::new(&[[1.0f32, -1.0]], &dev)?;
//! let grads = |mode| -> checkpoint_runtime::Result<Vec<f32>> {
//!     let ckpt = Checkpointer::new(Policy::new(mode));
//!     let ys = stack(&layers, &xs, Some(&ckpt))?;
//!     let grads = ckpt.backward(&ys.sum_all()?)?;
//!     let g = grads.get(layers[0].0.as_tensor()).expect("every parameter has a gradient");
//!     Ok(g.to_vec1::<f32>()?)
//! };
//! assert_eq!(grads(Mode::OffloadDisk)?, grads(Mode::None)?);
//! # Ok(())
//! # }
//! ```

mod audit;
mod autograd;
mod budget;
mod engine;
mod error;
mod fingerprint;
mod layer;
mod outputs;
mod partial;
mod policy;
pub mod rng;
mod stats;
mod store;
mod sync;

pub use audit::GradientAudit;
pub use budget::{BudgetPlan, DISK_BANDWIDTH, HOST_BANDWIDTH, LayerCost, plan_budget};
pub use checkpoint_derive::checkpointable;
pub use engine::Checkpointer;
pub use error::{Error, Result};
pub use layer::{Kwargs, Layer};
pub use outputs::{MultiLayer, StackOutputs};
pub use partial::{Method, Partial};
pub use policy::{Mode, Placement, Policy, RecomputeCheck, Segment};
pub use stats::Stats;
pub use store::disk::DiskConfig;

#[doc(hidden)]
pub mod __private;

/// The README's example, compiled and run as a doctest.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
