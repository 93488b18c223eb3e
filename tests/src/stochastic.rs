//! Layers that draw randomness: through the engine's replayed draws
//! ([`checkpoint_runtime::rng`]), or through candle's own generator (the trap: recomputation
//! draws a new mask).

use candle_core::{Result, Tensor};
use checkpoint_runtime::{Kwargs, Layer, rng};

/// Where a [`Dropped`] layer draws its mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draws {
    /// [`rng::dropout`]: the engine replays the mask in recomputation.
    Replayed,
    /// [`candle_nn::ops::dropout`]: a fresh mask on every call, recomputation included.
    Candle,
}

/// `dropout(inner(x), p)`: any layer with dropout on its output.
#[derive(Debug, Clone)]
pub struct Dropped<L> {
    /// The layer whose output is dropped.
    pub inner: L,
    /// The probability of zeroing an element.
    pub p: f32,
    /// Where the mask comes from.
    pub draws: Draws,
}

impl<L> Dropped<L> {
    /// `inner` with replayed dropout `p`.
    pub const fn new(inner: L, p: f32) -> Self {
        Self {
            inner,
            p,
            draws: Draws::Replayed,
        }
    }

    /// `inner` with candle's dropout `p`: wrong gradients under checkpointing.
    pub const fn candle(inner: L, p: f32) -> Self {
        Self {
            inner,
            p,
            draws: Draws::Candle,
        }
    }
}

impl<L: Layer<K>, K: Kwargs> Layer<K> for Dropped<L> {
    fn forward_checkpointed(&self, x: &Tensor, kwargs: &K) -> Result<Tensor> {
        let y = self.inner.forward_checkpointed(x, kwargs)?;
        match self.draws {
            Draws::Replayed => rng::dropout(&y, self.p),
            Draws::Candle => candle_nn::ops::dropout(&y, self.p),
        }
    }
}
