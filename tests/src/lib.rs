//! Shared support for the cross-crate tests and benchmarks: deterministic parameters, an MLP
//! block and a Qwen2-like decoder block written with differentiable candle ops, layers that
//! draw randomness, training steps and gradient comparison, a counting global allocator for
//! memory measurements, and scratch directories.

pub mod alloc;
pub mod block;
pub mod compare;
pub mod init;
pub mod mlp;
pub mod run;
pub mod stochastic;
pub mod temp;
