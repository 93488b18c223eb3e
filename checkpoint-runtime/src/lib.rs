//! Gradient checkpointing for [candle](https://github.com/huggingface/candle), with the layer
//! resolved at compile time and gradients equal to the plain graph's.
//!
//! - [`Layer`]: what an engine can re-run; `#[checkpointable]` implements it for you.
//! - [`Checkpointer`]: runs stacks of layers under a [`Policy`] and returns complete gradients
//!   from [`Checkpointer::backward`].
//!
//! A checkpointed stack is one node of candle's graph. The forward runs the layers without
//! keeping their graphs and stores only each segment's input (its boundary); the backward
//! re-runs each segment from its boundary and back-propagates through that fresh graph.
//! Everything downstream of the stack is ordinary candle.

mod autograd;
mod budget;
mod engine;
mod error;
mod layer;
mod partial;
mod policy;
mod stats;
mod store;

pub use budget::{BudgetPlan, DISK_BANDWIDTH, HOST_BANDWIDTH, LayerCost, plan_budget};
pub use checkpoint_derive::checkpointable;
pub use engine::Checkpointer;
pub use error::{Error, Result};
pub use layer::{Kwargs, Layer};
pub use partial::Partial;
pub use policy::{Mode, Placement, Policy, Segment};
pub use stats::Stats;
pub use store::disk::DiskConfig;

#[doc(hidden)]
pub mod __private;
