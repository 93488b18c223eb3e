//! Several carries and auxiliary outputs: [`MultiLayer`] and [`Checkpointer::run_stack_outputs`].
//!
//! The engine checkpoints one tensor per boundary. A stack whose layers carry several tensors
//! (`(hidden, residual)`) or also return auxiliary outputs (a MoE layer's router logits) runs
//! through it packed: each layer's output is one 1-D tensor, its carry tensors flattened and
//! concatenated, followed by its own auxiliary outputs; the next layer reads the carry from the
//! front and ignores the rest. The engine hands back the part after the carry of every layer's
//! output (its *tap*, see `autograd.rs`), from which the auxiliary outputs are split again, and
//! gradients reaching them flow back into that layer's recomputation. So a boundary holds one
//! carry and at most one layer's auxiliary outputs, and each auxiliary output is copied once in
//! the forward (and once more for recomputation). Packing and splitting are copies, so values
//! and gradients stay those of the plain graph, bit for bit.

use std::sync::{Arc, Mutex};

use candle_core::{Shape, Tensor};

use crate::autograd::Tap;
use crate::engine::Checkpointer;
use crate::error::{Error, Result};
use crate::layer::{Kwargs, Layer};
use crate::sync::lock;

/// A layer with several carry tensors, or with auxiliary outputs besides its carry.
///
/// `#[checkpointable]` implements it for a method whose carry argument is a tuple of tensor
/// references (`carry: (&Tensor, &Tensor)`) or whose return type is a tuple
/// (`Result<(Tensor, Tensor)>`). The first [`CARRIES`](Self::CARRIES) outputs are the new carry,
/// in the order of the carry argument; every further output is an auxiliary output.
/// Implementations must be deterministic functions of `self`, the carry and the keyword record,
/// and keep the carry's shapes, dtype and device from layer to layer.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a checkpointable layer with several carries or outputs",
    label = "the engine cannot run this as a layer returning a tuple",
    note = "annotate the layer's struct (or enum) and its impl with `#[checkpointable]`, with a \
            method returning `Result<(Tensor, ..)>` written out as a tuple"
)]
pub trait MultiLayer<K: Kwargs = ()>: Clone + Send + Sync + 'static {
    /// How many of the outputs are the carry (how many tensors the carry argument takes).
    const CARRIES: usize;

    /// Runs the layer on `carry` (`CARRIES` tensors) with keyword arguments `kwargs`, returning
    /// the new carry followed by the auxiliary outputs.
    ///
    /// # Errors
    /// The layer's error.
    fn forward_outputs(&self, carry: &[Tensor], kwargs: &K) -> candle_core::Result<Vec<Tensor>>;
}

/// What [`Checkpointer::run_stack_outputs`] returns.
#[derive(Debug, Clone)]
pub struct StackOutputs {
    /// The carry after the last layer (the stack's input carry for an empty stack).
    pub carry: Vec<Tensor>,
    /// Each layer's auxiliary outputs, in layer order.
    pub aux: Vec<Vec<Tensor>>,
}

/// A [`MultiLayer`] run on the packed carry (see the module docs).
#[derive(Clone)]
pub(crate) struct Packed<L>(L);

/// A layer's keyword record, with what it needs to unpack its carry and where it records the
/// shapes of its auxiliary outputs.
#[derive(Clone)]
pub(crate) struct PackedKwargs<K> {
    kwargs: K,
    /// The shapes of the carry tensors, in order.
    carry: Arc<[Shape]>,
    /// The shapes of this layer's auxiliary outputs, recorded each time it runs.
    aux: Arc<Mutex<Vec<Shape>>>,
}

impl<K: Kwargs> Kwargs for PackedKwargs<K> {
    const METHOD: &'static str = K::METHOD;
}

impl<L: MultiLayer<K>, K: Kwargs> Layer<PackedKwargs<K>> for Packed<L> {
    fn forward_checkpointed(
        &self,
        packed: &Tensor,
        kw: &PackedKwargs<K>,
    ) -> candle_core::Result<Tensor> {
        // The carry, from the front; the previous layer's auxiliary outputs follow it.
        let carry = split(packed, &kw.carry)?;
        let outputs = self.0.forward_outputs(&carry, &kw.kwargs)?;
        if outputs.len() < carry.len() {
            return Err(candle_core::Error::msg(format!(
                "the layer returned {} tensor(s) but its carry has {}: return the new carry \
                 first, then the auxiliary outputs",
                outputs.len(),
                carry.len()
            )));
        }
        let (new_carry, aux) = outputs.split_at(carry.len());
        let mut pieces = Vec::with_capacity(outputs.len());
        for (i, (out, shape)) in new_carry.iter().zip(kw.carry.iter()).enumerate() {
            if out.shape() != shape {
                return Err(candle_core::Error::msg(format!(
                    "carry output {i} has shape {:?} but came in as {shape:?}: a checkpointed \
                     carry keeps its shape from layer to layer (reshape it outside the stack)",
                    out.shape()
                )));
            }
            pieces.push(same_kind(out, packed, "carry output", i)?.flatten_all()?);
        }
        let mut shapes = Vec::with_capacity(aux.len());
        for (i, out) in aux.iter().enumerate() {
            shapes.push(out.shape().clone());
            pieces.push(same_kind(out, packed, "auxiliary output", i)?.flatten_all()?);
        }
        *lock(&kw.aux) = shapes;
        Tensor::cat(&pieces, 0)
    }
}

/// The tensors of `shapes`, in order, from the front of the 1-D `packed`.
fn split(packed: &Tensor, shapes: &[Shape]) -> candle_core::Result<Vec<Tensor>> {
    let mut offset = 0;
    let mut tensors = Vec::with_capacity(shapes.len());
    for shape in shapes {
        let n = shape.elem_count();
        tensors.push(packed.narrow(0, offset, n)?.reshape(shape)?);
        offset += n;
    }
    Ok(tensors)
}

/// `out`, if it has the packed carry's dtype and device (one packed tensor holds them all).
fn same_kind<'t>(
    out: &'t Tensor,
    packed: &Tensor,
    what: &str,
    i: usize,
) -> candle_core::Result<&'t Tensor> {
    if out.dtype() != packed.dtype() {
        return Err(candle_core::Error::msg(format!(
            "{what} {i} is a {:?} tensor but the carry is {:?}: every tensor a layer returns \
             travels with the carry, so they share its dtype; cast it in the layer \
             (`.to_dtype(..)`), or return it from a separate, uncheckpointed call",
            out.dtype(),
            packed.dtype()
        )));
    }
    if !out.device().same_device(packed.device()) {
        return Err(candle_core::Error::msg(format!(
            "{what} {i} lives on another device than the carry: every tensor a layer returns \
             travels with the carry; keep it on the carry's device"
        )));
    }
    Ok(out)
}

impl Checkpointer {
    /// Runs a stack of [`MultiLayer`] invocations: `carry` (one tensor or several, such as
    /// `(hidden, residual)`) flows from layer to layer, and each layer's auxiliary outputs come
    /// back in [`StackOutputs::aux`]. Gradients reach the carry, the keyword arguments and
    /// the weights from the final carry and from every auxiliary output the loss uses, as in
    /// the plain graph. See the [module docs](crate::MultiLayer) for the cost.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var};
    /// use checkpoint_runtime::{Checkpointer, MultiLayer, Policy};
    ///
    /// /// Carries `xs`, and returns its mean as an auxiliary output.
    /// #[derive(Clone)]
    /// struct Scale(Var);
    ///
    /// impl MultiLayer for Scale {
    ///     const CARRIES: usize = 1;
    ///     fn forward_outputs(&self, c: &[Tensor], (): &()) -> candle_core::Result<Vec<Tensor>> {
    ///         let ys = c[0].broadcast_mul(self.0.as_tensor())?.tanh()?;
    ///         let mean = ys.mean_keepdim(1)?;
    ///         Ok(vec![ys, mean])
    ///     }
    /// }
    ///
    /// # fn main() -> checkpoint_runtime::Result<()> {
    /// let dev = Device::Cpu;
    /// let layers = [Scale(Var::new(&[0.5f32], &dev)?), Scale(Var::new(&[2.0f32], &dev)?)];
    /// let ckpt = Checkpointer::new(Policy::recompute());
    /// let x = Tensor::new(&[[1.0f32, -1.0]], &dev)?;
    /// let out = ckpt.run_stack_outputs(&[x], layers.iter().map(|l| (l, ())))?;
    /// assert_eq!(out.aux.len(), 2);
    /// let loss = (out.carry[0].sum_all()? + out.aux[0][0].sum_all()?)?;
    /// let grads = ckpt.backward(&loss)?;
    /// assert!(grads.get(layers[0].0.as_tensor()).is_some());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// A layer's error, naming it; a carry of no tensors, or of tensors that differ in dtype or
    /// device; a layer whose carry arity ([`MultiLayer::CARRIES`]) is not `carry.len()`.
    pub fn run_stack_outputs<'a, L, K, I>(&self, carry: &[Tensor], calls: I) -> Result<StackOutputs>
    where
        L: MultiLayer<K>,
        K: Kwargs,
        I: IntoIterator<Item = (&'a L, K)>,
    {
        let Some(first) = carry.first() else {
            return Err(Error::Config(
                "a stack needs a carry of at least one tensor".to_string(),
            ));
        };
        if L::CARRIES != carry.len() {
            return Err(Error::Config(format!(
                "the layers of this stack (`{}`) take a carry of {} tensor(s), but the stack \
                 was given {}: pass as many carry tensors as the layer's carry argument has",
                std::any::type_name::<L>(),
                L::CARRIES,
                carry.len()
            )));
        }
        for (i, c) in carry.iter().enumerate() {
            if c.dtype() != first.dtype() || !c.device().same_device(first.device()) {
                return Err(Error::Config(format!(
                    "carry tensor {i} is a {:?} tensor on {:?}, carry tensor 0 a {:?} one on \
                     {:?}: the carry tensors travel packed together, so they share dtype and \
                     device",
                    c.dtype(),
                    c.device().location(),
                    first.dtype(),
                    first.device().location()
                )));
            }
        }
        let shapes: Arc<[Shape]> = carry.iter().map(|c| c.shape().clone()).collect();
        let carry_len = shapes.iter().map(Shape::elem_count).sum();
        let mut layers = Vec::new();
        let mut kwargs = Vec::new();
        let mut records = Vec::new();
        for (layer, kw) in calls {
            let aux = Arc::new(Mutex::new(Vec::new()));
            records.push(Arc::clone(&aux));
            layers.push(Packed(layer.clone()));
            kwargs.push(PackedKwargs {
                kwargs: kw,
                carry: Arc::clone(&shapes),
                aux,
            });
        }
        let flat = carry
            .iter()
            .map(Tensor::flatten_all)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let packed = Tensor::cat(&flat, 0)?;
        let tap = Tap { from: carry_len };
        let ran = self.run_tapped(&packed, layers.iter().zip(kwargs), Some(tap))?;
        drop(layers);

        let carry = split(&ran.output, &shapes)?;
        let aux = records
            .iter()
            .zip(&ran.taps)
            .map(|(record, part)| match part {
                Some(part) => split(part, &lock(record)),
                // Nothing after the carry: no auxiliary outputs, or only empty ones.
                None => lock(record)
                    .iter()
                    .map(|shape| Tensor::zeros(shape, packed.dtype(), packed.device()))
                    .collect(),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(StackOutputs { carry, aux })
    }
}
