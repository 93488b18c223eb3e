//! Shared support for the cross-crate tests and benchmarks: deterministic parameters, an MLP
//! block and a Qwen2-like decoder block written with differentiable candle ops, gradient
//! comparison, and a counting global allocator for memory measurements.

pub mod alloc;
pub mod block;
pub mod compare;
pub mod init;
pub mod mlp;
