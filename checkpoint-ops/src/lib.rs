//! Fused differentiable ops for training transformers with candle.
//!
//! Each op is a candle custom op with a CPU kernel and a backward, replacing a chain of candle
//! ops that would allocate a temporary per step (and some of which, in candle-nn, silently cut
//! the gradient):
//!
//! | op                 | replaces                                           |
//! |--------------------|----------------------------------------------------|
//! | [`rms_norm`]       | `candle_nn::ops::rms_norm_slow`                    |
//! | [`rope`]           | `candle_nn::rotary_emb::rope_slow`                 |
//! | [`masked_softmax`] | `(scores * scale + mask)` then `ops::softmax`      |
//! | [`silu_mul`]       | `gate.silu()? * up`                                |
//! | [`cross_entropy`]  | `log_softmax`, `gather`, mean (chunked, see there) |
//! | [`AdamW`]          | `candle_nn::AdamW` (in place, f32 master weights)  |
//!
//! Every kernel parallelises over rows (or element blocks) and computes each row in a fixed
//! order, so results are bit-for-bit identical run to run and for any thread count. Arithmetic is
//! in f32; f32, bf16 and f16 tensors are accepted. On a device other than the CPU each op falls
//! back to the composite candle ops it replaces, so model code can call them unconditionally.
//! Bad arguments give an error naming the op, the argument and the fix.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let x = Var::randn(0f32, 1.0, (2, 8), &dev)?;
//! let w = Tensor::ones(8, candle_core::DType::F32, &dev)?;
//! let y = checkpoint_ops::rms_norm(&x, &w, 1e-6)?;
//! let grads = y.sqr()?.sum_all()?.backward()?;
//! assert!(grads.get(x.as_tensor()).is_some());
//! # Ok(())
//! # }
//! ```

mod adamw;
mod cross_entropy;
mod kernel;
mod rms_norm;
mod rope;
mod silu_mul;
mod softmax;

pub use adamw::AdamW;
pub use cross_entropy::{IGNORE_INDEX, cross_entropy};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use silu_mul::silu_mul;
pub use softmax::masked_softmax;
