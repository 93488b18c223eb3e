//! [`Partial`]: a layer method with its keyword arguments bound, called later with the carry.

use std::fmt;

use candle_core::Tensor;

use crate::engine::Checkpointer;
use crate::layer::{Kwargs, Layer};

/// A checkpointable method with its keyword arguments applied, waiting for the carry: the
/// analogue of Python's `functools.partial(layer.forward, **kwargs)`, except that the layer is
/// never lost. It is kept as a typed reference, so an engine can always re-run it.
///
/// `#[checkpointable]` generates `layer.partial(..)` (and `layer.partial_<method>(..)` for
/// methods other than `forward`). The keyword arguments are held owned (the `K` of
/// [`Layer<K>`]), so a partial can be called any number of times, stored, or handed to an
/// engine, and every call sees the same arguments.
///
/// ```
/// # use candle_core::{Device, Tensor, Var};
/// use checkpoint_runtime::{checkpointable, Checkpointer, Policy};
///
/// #[checkpointable]
/// #[derive(Clone)]
/// struct Scale(Var);
///
/// #[checkpointable]
/// impl Scale {
///     fn forward(&self, xs: &Tensor, bias: f64) -> candle_core::Result<Tensor> {
///         xs.broadcast_mul(self.0.as_tensor())? + bias
///     }
/// }
///
/// # fn main() -> candle_core::Result<()> {
/// let layer = Scale(Var::new(&[2.0f32], &Device::Cpu)?);
/// let xs = Tensor::new(&[1.0f32, -1.0], &Device::Cpu)?;
/// let f = layer.partial(0.5);
/// assert_eq!(f.call(&xs)?.to_vec1::<f32>()?, [2.5, -1.5]);
/// assert_eq!(f.kwargs().bias, 0.5);
///
/// let ckpt = Checkpointer::new(Policy::recompute());
/// let ys = f.run(&ckpt, &xs)?;
/// assert_eq!(ys.to_vec1::<f32>()?, [2.5, -1.5]);
/// # Ok(())
/// # }
/// ```
pub struct Partial<'l, L, K> {
    layer: &'l L,
    kwargs: K,
}

impl<'l, L, K> Partial<'l, L, K> {
    /// Binds `kwargs` to `layer`.
    #[must_use]
    pub const fn new(layer: &'l L, kwargs: K) -> Self {
        Self { layer, kwargs }
    }

    /// The layer, resolved at compile time.
    #[must_use]
    pub const fn layer(&self) -> &'l L {
        self.layer
    }

    /// The bound keyword arguments.
    #[must_use]
    pub const fn kwargs(&self) -> &K {
        &self.kwargs
    }

    /// The layer and its keyword arguments.
    #[must_use]
    pub fn into_parts(self) -> (&'l L, K) {
        (self.layer, self.kwargs)
    }
}

impl<'l, L: Layer<K>, K: Kwargs> Partial<'l, L, K> {
    /// Calls the method on `carry` with the bound keyword arguments, without an engine: exactly
    /// what the bound call `layer.method(carry, ..)` computes.
    ///
    /// # Errors
    /// The layer's error.
    pub fn call(&self, carry: &Tensor) -> candle_core::Result<Tensor> {
        self.layer.forward_checkpointed(carry, &self.kwargs)
    }

    /// Runs the call through `engine` (a stack of one).
    ///
    /// # Errors
    /// The layer's error, naming it; see [`Checkpointer::run`].
    pub fn run(&self, engine: &Checkpointer, carry: &Tensor) -> crate::Result<Tensor>
    where
        K: Clone,
    {
        engine.run(self.layer, carry, self.kwargs.clone())
    }

    /// What `#[checkpoint]` call sites hand to the engine for `partial.call(&xs)`.
    #[doc(hidden)]
    #[must_use]
    pub fn __checkpointable_call(&self) -> (&'l L, K)
    where
        K: Clone,
    {
        (self.layer, self.kwargs.clone())
    }
}

impl<L, K: Clone> Clone for Partial<'_, L, K> {
    fn clone(&self) -> Self {
        Self {
            layer: self.layer,
            kwargs: self.kwargs.clone(),
        }
    }
}

impl<L, K> fmt::Debug for Partial<'_, L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Partial")
            .field("layer", &std::any::type_name::<L>())
            .field("kwargs", &std::any::type_name::<K>())
            .finish()
    }
}

#[diagnostic::do_not_recommend]
impl<L, K> crate::__private::Resolve for Partial<'_, L, K> {
    type Layer = Self;
    fn resolve(&self) -> &Self {
        self
    }
}
