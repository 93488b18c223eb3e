//! Randomness that recomputation replays: dropout masks that are the same in the forward pass
//! and when the backward pass re-runs the layer.
//!
//! A checkpointed layer runs twice: once in the forward pass and once more when the backward
//! pass recomputes it from its boundary. A layer that draws from candle's own generator
//! ([`candle_nn::ops::dropout`], `Tensor::rand`) draws a different mask the second time, and its
//! gradients then belong to no forward at all: wrong by 20% to 300%, with no error. Draw through
//! this module instead:
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use checkpoint_runtime::{Checkpointer, Layer, Mode, Policy, rng};
//!
//! #[derive(Clone)]
//! struct Noisy(Var);
//!
//! impl Layer for Noisy {
//!     fn forward_checkpointed(&self, x: &Tensor, (): &()) -> candle_core::Result<Tensor> {
//!         // Not candle_nn::ops::dropout: that mask would change when the layer is recomputed.
//!         rng::dropout(&x.broadcast_mul(self.0.as_tensor())?.tanh()?, 0.1)
//!     }
//! }
//!
//! # fn main() -> checkpoint_runtime::Result<()> {
//! let dev = Device::Cpu;
//! let layers = [Noisy(Var::new(&[0.5f32], &dev)?), Noisy(Var::new(&[2.0f32], &dev)?)];
//! let x = Tensor::ones((4, 64), candle_core::DType::F32, &dev)?;
//! let grad = |mode| -> checkpoint_runtime::Result<Vec<f32>> {
//!     let ckpt = Checkpointer::new(Policy::new(mode)).with_seed(7);
//!     let y = ckpt.run_stack(&x, layers.iter().map(|l| (l, ())))?;
//!     let grads = ckpt.backward(&y.sum_all()?)?;
//!     let g = grads.get(layers[0].0.as_tensor()).expect("every parameter has a gradient");
//!     Ok(g.to_vec1()?)
//! };
//! // The recomputed masks are the forward's: the plain graph's gradients, bit for bit.
//! assert_eq!(grad(Mode::Recompute)?, grad(Mode::None)?);
//! # Ok(())
//! # }
//! ```
//!
//! # Where the draws come from
//!
//! The engine gives every layer invocation a key, and enters it around each call of the layer:
//! in the forward pass, in a budget policy's probe and in recomputation alike, in every mode,
//! [`Mode::None`](crate::Mode::None) included. Each draw inside the call (each [`dropout`] or
//! [`uniform`]) takes the next number of that invocation's counter, which starts from zero on
//! every call, so the recomputed layer draws exactly what the forward drew. A key is a function
//! of the engine's seed ([`Checkpointer::with_seed`](crate::Checkpointer::with_seed), 0 unless
//! set), how many stacks the engine ran before this one (since it was created or reseeded), and
//! the layer's position in its stack; a stack nested in a layer takes its key from that layer's
//! invocation. So every step draws new masks, the same sequence of steps draws the same masks in
//! every mode and on every run, and two engines with the same seed draw alike.
//!
//! The numbers are a counter-based hash (SplitMix64), computed on the host and uploaded as one
//! byte per element (a dropout mask) or one `f32` (a uniform draw); the tensor is then converted
//! on the carry's device to the carry's dtype.
//!
//! # Plain calls
//!
//! A layer called without an engine (a `#[checkpointable(engine = ckpt)]` forward with
//! `ckpt = None`, or a direct call) has no invocation to draw from, and a draw there fails with
//! [`Error::NoRandomSource`] rather than guess. Give such calls a
//! generator of your own with [`Rng::scope`]: every draw in the scope takes the generator's next
//! number, so a sequence of scoped calls is reproducible from the seed. Those are not the masks
//! an engine draws (a plain call has no stack position); to compare a checkpointed run with the
//! plain graph, run the plain graph through an engine in [`Mode::None`](crate::Mode::None).
//!
//! Draws are per thread: a layer that hands work to other threads must draw before it does.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Shape, Tensor};

use crate::error::Error;

/// SplitMix64's increment (2^64 / φ).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Domain tags, so that keys derived for different purposes never coincide by construction.
const TAG_ENGINE: u64 = 0x656e_6769_6e65; // "engine"
const TAG_USER: u64 = 0x7573_6572; // "user"
const TAG_LAYER: u64 = 0x006c_6179_6572; // "layer"
const TAG_DRAW: u64 = 0x6472_6177; // "draw"

/// SplitMix64's output function: a bijective 64-bit mix.
pub(crate) const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of child `n` of `key` in the domain `tag`.
const fn derive(key: u64, tag: u64, n: u64) -> u64 {
    mix(key ^ mix(tag ^ mix(n.wrapping_add(GOLDEN))))
}

/// Element `i` of the stream of `key`: SplitMix64 seeded with `key`.
const fn element(key: u64, i: u64) -> u64 {
    mix(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// Where the draws of the running code come from.
#[derive(Debug, Clone, Copy)]
struct Frame {
    key: u64,
    /// Draws taken so far in this frame.
    draws: u64,
    /// `Some(stack)` inside an engine's layer invocation, for the stacks nested in it.
    engine: Option<StackKey>,
}

thread_local! {
    /// The innermost frame of this thread: set only for the duration of a layer invocation or
    /// an [`Rng::scope`], and restored when it ends (by unwinding too).
    static CURRENT: Cell<Option<Frame>> = const { Cell::new(None) };
}

/// Restores the enclosing frame when a frame ends.
struct Restore(Option<Frame>);

impl Drop for Restore {
    fn drop(&mut self) {
        CURRENT.set(self.0);
    }
}

/// Takes the next draw of `frame`, the current frame: the draw's key.
fn take_draw(mut frame: Frame) -> u64 {
    let n = frame.draws;
    frame.draws += 1;
    CURRENT.set(Some(frame));
    derive(frame.key, TAG_DRAW, n)
}

/// The key of the next draw of the current frame, for `what` (the helper drawing).
fn next_draw(what: &'static str) -> Result<u64, Error> {
    let frame = CURRENT.get().ok_or(Error::NoRandomSource { what })?;
    Ok(take_draw(frame))
}

/// The random state of one engine: its seed and how many stacks it has keyed.
#[derive(Debug, Default)]
pub(crate) struct Streams {
    seed: AtomicU64,
    /// Top-level stacks keyed so far (nested stacks take their keys from their layer).
    stacks: AtomicU64,
}

impl Streams {
    /// Starts over from `seed`: the next stack is stack 0 again.
    pub(crate) fn reseed(&self, seed: u64) {
        self.seed.store(seed, Ordering::SeqCst);
        self.stacks.store(0, Ordering::SeqCst);
    }

    pub(crate) fn seed(&self) -> u64 {
        self.seed.load(Ordering::SeqCst)
    }

    /// The key of a stack about to run: from the enclosing layer invocation when this stack is
    /// nested in one (so that recomputing that layer keys it alike), else the engine's next.
    pub(crate) fn next_stack(&self) -> StackKey {
        if let Some(frame) = CURRENT.get()
            && let Some(parent) = frame.engine
        {
            return StackKey {
                key: take_draw(frame),
                ordinal: parent.ordinal,
                nested: true,
            };
        }
        let ordinal = self.stacks.fetch_add(1, Ordering::SeqCst);
        StackKey {
            key: derive(self.seed(), TAG_ENGINE, ordinal),
            ordinal,
            nested: false,
        }
    }
}

/// The random key of one run of a stack, and which run it is (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StackKey {
    key: u64,
    /// The engine's count of top-level stacks when this one (or the one it is nested in) ran.
    ordinal: u64,
    nested: bool,
}

impl StackKey {
    /// Runs `f` as the invocation of layer `index` of this stack: its draws start from zero.
    pub(crate) fn invoke<R>(self, index: usize, f: impl FnOnce() -> R) -> R {
        let frame = Frame {
            key: derive(self.key, TAG_LAYER, index as u64),
            draws: 0,
            engine: Some(self),
        };
        let _restore = Restore(CURRENT.replace(Some(frame)));
        f()
    }
}

impl fmt::Display for StackKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nested {
            write!(f, "a stack nested in stack {} of this engine", self.ordinal)
        } else {
            write!(f, "stack {} of this engine", self.ordinal)
        }
    }
}

/// A generator for layers called without an engine.
///
/// Inside [`scope`](Self::scope), [`dropout`] and [`uniform`] draw from this generator; each
/// draw takes its next number, so the same seed and the same sequence of calls give the same
/// numbers. An engine's layer invocations inside the scope still draw from the engine.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use checkpoint_runtime::rng::{self, Rng};
///
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::ones(1000, candle_core::DType::F32, &Device::Cpu)?;
/// // Outside any engine and any scope there is nothing to draw from: an error, not a guess.
/// assert!(rng::dropout(&x, 0.5).is_err());
///
/// let (mut a, mut b) = (Rng::new(3), Rng::new(3));
/// let ya = a.scope(|| rng::dropout(&x, 0.5))?;
/// let yb = b.scope(|| rng::dropout(&x, 0.5))?;
/// assert_eq!(ya.to_vec1::<f32>()?, yb.to_vec1::<f32>()?);
/// // The next draw is a new one.
/// let next = a.scope(|| rng::dropout(&x, 0.5))?;
/// assert_ne!(next.to_vec1::<f32>()?, ya.to_vec1::<f32>()?);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    key: u64,
    draws: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    #[must_use]
    pub const fn new(seed: u64) -> Self {
        Self {
            key: derive(seed, TAG_USER, 0),
            draws: 0,
        }
    }

    /// Runs `f` with this generator as the source of its draws, and keeps its position for
    /// the next scope.
    pub fn scope<R>(&mut self, f: impl FnOnce() -> R) -> R {
        struct Finish<'a> {
            rng: &'a mut Rng,
            outer: Option<Frame>,
        }
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                if let Some(frame) = CURRENT.replace(self.outer) {
                    self.rng.draws = frame.draws;
                }
            }
        }
        let frame = Frame {
            key: self.key,
            draws: self.draws,
            engine: None,
        };
        let _finish = Finish {
            outer: CURRENT.replace(Some(frame)),
            rng: self,
        };
        f()
    }
}

/// Zeroes each element of `xs` with probability `p` and scales the others by `1 / (1 - p)`:
/// [`candle_nn::ops::dropout`]'s computation, with a mask that recomputation replays.
///
/// The mask is made on `xs`'s device in `xs`'s dtype. `p = 0` returns `xs` itself and draws
/// nothing (so an evaluation pass needs no engine or scope).
///
/// # Errors
/// [`Error::InvalidDropout`] for `p` outside `[0, 1)`;
/// [`Error::NoRandomSource`] outside any engine invocation and
/// any [`Rng::scope`]; a candle error if the mask cannot be built on `xs`'s device.
pub fn dropout(xs: &Tensor, p: f32) -> candle_core::Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::InvalidDropout { p }.into());
    }
    if p == 0.0 {
        return Ok(xs.clone());
    }
    let key = next_draw("dropout")?;
    // Keep an element when its 64-bit draw is at least p·2^64: probability 1 - p.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let threshold = (f64::from(p) * 18_446_744_073_709_551_616.0) as u64;
    let keep: Vec<u8> = (0..xs.elem_count() as u64)
        .map(|i| u8::from(element(key, i) >= threshold))
        .collect();
    let scale = 1.0 / (1.0 - f64::from(p));
    let mask = Tensor::from_vec(keep, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
    xs * (mask * scale)?
}

/// A tensor of values uniform in `[0, 1)` of `shape`, made on `device` in `dtype` (a float
/// dtype), drawn like [`dropout`]'s masks: recomputation replays it.
///
/// # Errors
/// [`Error::NoRandomSource`] outside any engine invocation and
/// any [`Rng::scope`]; a candle error if the tensor cannot be built.
pub fn uniform(
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    let key = next_draw("uniform")?;
    // The top 24 bits: exactly representable in f32, so every value lies in [0, 1).
    #[allow(clippy::cast_precision_loss)]
    let values: Vec<f32> = (0..shape.elem_count() as u64)
        .map(|i| (element(key, i) >> 40) as f32 / (1u64 << 24) as f32)
        .collect();
    Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_restores_the_enclosing_frame_and_keeps_its_position() -> candle_core::Result<()> {
        let mut outer = Rng::new(1);
        let mut inner = Rng::new(2);
        let x = Tensor::ones(64, DType::F32, &Device::Cpu)?;
        let (a, b) = outer.scope(|| -> candle_core::Result<_> {
            let a = dropout(&x, 0.5)?;
            inner.scope(|| dropout(&x, 0.5))?;
            Ok((a, dropout(&x, 0.5)?))
        })?;
        assert_eq!((outer.draws, inner.draws), (2, 1));
        // The outer scope's second draw is its own, not the inner scope's.
        let mut replay = Rng::new(1);
        let (ra, rb) = replay
            .scope(|| -> candle_core::Result<_> { Ok((dropout(&x, 0.5)?, dropout(&x, 0.5)?)) })?;
        assert_eq!(a.to_vec1::<f32>()?, ra.to_vec1::<f32>()?);
        assert_eq!(b.to_vec1::<f32>()?, rb.to_vec1::<f32>()?);
        assert!(CURRENT.get().is_none());
        Ok(())
    }

    #[test]
    fn a_frame_is_restored_when_the_layer_panics() {
        let key = Streams::default().next_stack();
        let caught = std::panic::catch_unwind(|| key.invoke(0, || panic!("layer bug")));
        assert!(caught.is_err());
        assert!(CURRENT.get().is_none());
    }

    #[test]
    fn invocations_restart_their_draws_and_layers_draw_apart() -> candle_core::Result<()> {
        let key = Streams::default().next_stack();
        let draw = |index| key.invoke(index, || uniform(16, DType::F32, &Device::Cpu));
        let (first, again, other) = (draw(0)?, draw(0)?, draw(1)?);
        assert_eq!(first.to_vec1::<f32>()?, again.to_vec1::<f32>()?);
        assert_ne!(first.to_vec1::<f32>()?, other.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn stacks_are_numbered_and_nested_stacks_keyed_by_their_layer() {
        let streams = Streams::default();
        let (s0, s1) = (streams.next_stack(), streams.next_stack());
        assert_ne!(s0.key, s1.key);
        assert_eq!(s1.to_string(), "stack 1 of this engine");
        let nested = |_| s1.invoke(3, || streams.next_stack());
        let (n, again) = (nested(()), nested(()));
        assert_eq!(n, again);
        assert_eq!(n.to_string(), "a stack nested in stack 1 of this engine");
        // Nested stacks do not advance the engine's count: recomputation runs them again.
        assert_eq!(streams.next_stack().ordinal, 2);
        streams.reseed(5);
        let reseeded = streams.next_stack();
        assert_eq!((reseeded.ordinal, reseeded.key == s0.key), (0, false));
    }

    #[test]
    fn dropout_keeps_about_one_minus_p_and_scales_them() -> candle_core::Result<()> {
        let x = Tensor::ones(20_000, DType::F32, &Device::Cpu)?;
        let y = Rng::new(9).scope(|| dropout(&x, 0.25))?.to_vec1::<f32>()?;
        let kept = y.iter().filter(|&&v| v != 0.0).count();
        #[allow(clippy::cast_precision_loss)]
        let rate = kept as f64 / y.len() as f64;
        assert!((rate - 0.75).abs() < 0.02, "{rate}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        Ok(())
    }

    #[test]
    fn bad_probabilities_and_missing_sources_are_errors() -> candle_core::Result<()> {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu)?;
        for p in [1.0, -0.1, f32::NAN] {
            let err = Rng::new(0)
                .scope(|| dropout(&x, p))
                .err()
                .map(|e| e.to_string());
            assert!(err.is_some_and(|e| e.contains("[0, 1)")), "{p}");
        }
        let err = dropout(&x, 0.1).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("Rng::new(seed).scope")));
        // p = 0 draws nothing, so it needs no source.
        assert_eq!(dropout(&x, 0.0)?.to_vec1::<f32>()?, [1.0; 4]);
        Ok(())
    }
}
