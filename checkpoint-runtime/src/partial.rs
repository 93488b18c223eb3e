//! [`Partial`]: a layer method with its keyword arguments bound, called later with the carry.

use std::fmt;

use candle_core::Tensor;

use crate::engine::Checkpointer;
use crate::layer::{Kwargs, Layer};
use crate::outputs::{MultiLayer, StackOutputs};

/// A checkpointable method of layer `L`, implemented on the method's owned keyword record: what
/// lets [`Partial::call`] call the method itself, with its own carry argument and return type,
/// whether it returns one tensor ([`Layer`]) or a tuple ([`MultiLayer`]).
///
/// `#[checkpointable]` implements it for each method's `<Layer>KwargsOwned`; there is no need to
/// implement it by hand. Every implementation is the plain call of the method: `invoke(layer,
/// carry, kwargs)` is `layer.method(carry, ..kwargs)`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not the keyword record of a checkpointable method of `{L}`",
    label = "no checkpointable method of `{L}` takes these keyword arguments",
    note = "bind the arguments with the `partial` (or `partial_<method>`) that `#[checkpointable]` \
            generated on the layer's impl"
)]
pub trait Method<L>: Kwargs {
    /// The method's carry argument: `&'c Tensor`, or a tuple of them such as
    /// `(&'c Tensor, &'c Tensor)`.
    type Carry<'c>;
    /// What the method returns: its own return type, such as `Result<Tensor>` or
    /// `Result<(Tensor, Tensor)>`.
    type Output;

    /// Calls the method of `layer` on `carry` with the keyword arguments `kwargs`, re-borrowed.
    fn invoke(layer: &L, carry: Self::Carry<'_>, kwargs: &Self) -> Self::Output;
}

/// A checkpointable method with its keyword arguments applied, waiting for the carry: the
/// analogue of Python's `functools.partial(layer.forward, **kwargs)`, except that the layer is
/// never lost. It is kept as a typed reference, so an engine can always re-run it.
///
/// `#[checkpointable]` generates `layer.partial(..)` (and `layer.partial_<method>(..)` for
/// methods other than `forward`). The keyword arguments are held owned (the `K` of
/// [`Layer<K>`] or [`MultiLayer<K>`]), so a partial can be called any number of times, stored,
/// or handed to an engine, and every call sees the same arguments. [`call`](Self::call) takes the
/// method's own carry argument and returns what the method returns, a tuple included.
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
///
/// A method with several carries or auxiliary outputs works the same way:
///
/// ```
/// # use candle_core::{Device, Tensor};
/// use checkpoint_runtime::{checkpointable, Checkpointer, Policy};
///
/// #[checkpointable]
/// #[derive(Clone)]
/// struct Residual;
///
/// #[checkpointable]
/// impl Residual {
///     /// A `(hidden, residual)` carry, and the new hidden state's sum as an auxiliary output.
///     fn forward(
///         &self,
///         carry: (&Tensor, &Tensor),
///         scale: f64,
///     ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
///         let residual = (carry.0 + carry.1)?;
///         let hidden = (residual.tanh()? * scale)?;
///         let sum = hidden.sum_keepdim(0)?;
///         Ok((hidden, residual, sum))
///     }
/// }
///
/// # fn main() -> checkpoint_runtime::Result<()> {
/// let (h, r) = (Tensor::new(&[1.0f32, -1.0], &Device::Cpu)?, Tensor::new(&[0.5f32, 0.5], &Device::Cpu)?);
/// let f = Residual.partial(2.0);
/// let (hidden, residual, sum) = f.call((&h, &r))?;
///
/// let ckpt = Checkpointer::new(Policy::recompute());
/// let out = f.run_outputs(&ckpt, &[h, r])?;
/// assert_eq!(out.carry[0].to_vec1::<f32>()?, hidden.to_vec1::<f32>()?);
/// assert_eq!(out.carry[1].to_vec1::<f32>()?, residual.to_vec1::<f32>()?);
/// assert_eq!(out.aux[0][0].to_vec1::<f32>()?, sum.to_vec1::<f32>()?);
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

impl<L, K: Method<L>> Partial<'_, L, K> {
    /// Calls the method on `carry` with the bound keyword arguments, without an engine: exactly
    /// what the bound call `layer.method(carry, ..)` computes, returning what it returns (a
    /// tuple for a method returning several tensors). `carry` is the method's carry argument:
    /// `&xs`, or `(&hidden, &residual)` for a tuple carry.
    ///
    /// # Errors
    /// The method's error.
    pub fn call(&self, carry: K::Carry<'_>) -> K::Output {
        K::invoke(self.layer, carry, &self.kwargs)
    }
}

impl<'l, L, K: Clone> Partial<'l, L, K> {
    /// Runs the call through `engine` (a stack of one).
    ///
    /// # Errors
    /// The layer's error, naming it; see [`Checkpointer::run`].
    pub fn run(&self, engine: &Checkpointer, carry: &Tensor) -> crate::Result<Tensor>
    where
        L: Layer<K>,
        K: Kwargs,
    {
        engine.run(self.layer, carry, self.kwargs.clone())
    }

    /// Runs the call of a method with several carries or auxiliary outputs through `engine` (a
    /// stack of one): `carry` holds the carry tensors in the order of the method's carry
    /// argument, and the result's [`aux`](StackOutputs::aux) has one entry, this call's
    /// auxiliary outputs.
    ///
    /// # Errors
    /// The layer's error, naming it; see [`Checkpointer::run_stack_outputs`].
    pub fn run_outputs(
        &self,
        engine: &Checkpointer,
        carry: &[Tensor],
    ) -> crate::Result<StackOutputs>
    where
        L: MultiLayer<K>,
        K: Kwargs,
    {
        engine.run_stack_outputs(carry, [(self.layer, self.kwargs.clone())])
    }

    /// What `#[checkpoint]` call sites hand to the engine for `partial.call(&xs)`: `run` or
    /// `run_stack_outputs` then requires the layer to be a `Layer<K>` or a `MultiLayer<K>`.
    #[doc(hidden)]
    #[must_use]
    pub fn __checkpointable_call(&self) -> (&'l L, K) {
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
