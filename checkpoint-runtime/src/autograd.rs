//! The glue between a checkpointed stack and candle's autograd.
//!
//! A whole stack is ONE node of candle's graph: a [`CustomOp2`] over (stack input, anchor), whose
//! forward hands out the output the engine already computed and whose backward re-runs the
//! segments from their saved boundaries. The boundaries therefore live wherever the engine put
//! them, not in candle's graph. The anchor is a one-element `Var`: without a tracked operand,
//! candle records nothing and the backward (with every parameter gradient) would never run.
//!
//! A stack may also hand back part of each layer's output ([`Tap`]): a [`TapOp`] node per layer,
//! reading the stack's node, gives out that part. Being consumers of the stack's node, the tap
//! nodes run their backward before it, and leave their gradients in [`TapGrads`]; the stack's
//! backward then seeds each recomputed layer's tapped part with its gradient, beside the
//! segment's output gradient.

use std::mem;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor, Var,
};

use crate::engine::Shared;
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::layer::{Kwargs, Layer, describe};
use crate::policy::{Mode, RecomputeCheck, Segment};
use crate::rng::StackKey;
use crate::store::Saved;
use crate::sync::lock;

/// The state a checkpointed stack keeps between its forward and its backward.
pub(crate) struct Stack<L, K> {
    /// The layers (cheap clones sharing their weights) with their keyword arguments.
    pub(crate) calls: Vec<(L, K)>,
    /// One entry per segment, in forward order.
    pub(crate) saved: Vec<Kept>,
    /// The stack's random key: recomputation draws what the forward drew.
    pub(crate) key: StackKey,
}

/// What one segment keeps between its forward and its backward.
pub(crate) struct Kept {
    pub(crate) seg: Segment,
    pub(crate) saved: Saved,
    /// The forward's fingerprint of each layer output of a recomputed segment (none for a
    /// segment that keeps its graph).
    pub(crate) prints: Vec<Fingerprint>,
    /// The tapped parts of the layers' outputs of a segment that keeps its graph, in its graph
    /// (none for a recomputed segment: recomputation taps them again).
    pub(crate) taps: Vec<Option<Tensor>>,
}

/// The part of each layer's output that a stack also hands back: the elements from `from` on
/// of the layer's 1-D output. Stacks of [`MultiLayer`](crate::MultiLayer)s tap their layers'
/// auxiliary outputs this way (see `outputs.rs`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tap {
    pub(crate) from: usize,
}

impl Tap {
    /// The tapped part of `out`, a view in its graph; `None` when it is empty (a layer without
    /// auxiliary outputs), so that no empty buffer is ever allocated or copied.
    fn part(self, out: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let len = out.dim(0)?.checked_sub(self.from).ok_or_else(|| {
            candle_core::Error::msg(format!(
                "a tapped layer output has {} elements, fewer than the {} its carry takes",
                out.elem_count(),
                self.from
            ))
        })?;
        if len == 0 {
            return Ok(None);
        }
        out.narrow(0, self.from, len).map(Some)
    }
}

/// A segment's output and the tapped parts of its layers' outputs.
pub(crate) struct Ran {
    pub(crate) output: Tensor,
    /// One per layer of the segment when the stack taps its layers, else empty.
    pub(crate) taps: Vec<Option<Tensor>>,
}

/// What [`run_segment`] does with each layer's output.
pub(crate) enum Outputs<'a> {
    /// Keeps its graph: the plain forward.
    Keep,
    /// Detaches it (nothing needs its graph until recomputation) and records its fingerprint:
    /// a checkpointed forward.
    Record(&'a mut Vec<Fingerprint>, RecomputeCheck),
    /// Keeps its graph and checks it against the forward's fingerprint: recomputation.
    Verify(&'a [Fingerprint]),
}

/// Runs `calls[seg]` on `input`, each layer inside its invocation of `key` (its random
/// draws), naming the failing layer in the error. With a `tap`, each layer's tapped part comes
/// back too: in the graph when the outputs keep theirs, else a detached copy (a view would keep
/// the whole output alive).
pub(crate) fn run_segment<L: Layer<K>, K: Kwargs>(
    calls: &[(L, K)],
    seg: Segment,
    input: &Tensor,
    key: StackKey,
    mode: Mode,
    mut outputs: Outputs<'_>,
    tap: Option<Tap>,
) -> crate::Result<Ran> {
    let phase = match outputs {
        Outputs::Verify(_) => "recompute",
        Outputs::Keep | Outputs::Record(..) => "forward",
    };
    let mut hidden = input.clone();
    let mut taps = Vec::new();
    for (index, (layer, kwargs)) in calls.iter().enumerate().take(seg.end).skip(seg.start) {
        let layer_error = |source| Error::Layer {
            layer: describe::<L, K>(index),
            phase,
            mode,
            source: Box::new(source),
        };
        let out = key
            .invoke(index, || layer.forward_checkpointed(&hidden, kwargs))
            .map_err(layer_error)?;
        if let Some(tap) = tap {
            let part = tap.part(&out).map_err(layer_error)?;
            taps.push(match (part, &outputs) {
                (Some(part), Outputs::Record(..)) => Some(part.force_contiguous()?.detach()),
                (part, _) => part,
            });
        }
        hidden = match &mut outputs {
            Outputs::Keep => out,
            Outputs::Record(prints, check) => {
                prints.push(Fingerprint::of(&out, *check)?);
                out.detach()
            }
            Outputs::Verify(prints) => {
                let forward = prints.get(index - seg.start);
                if let Some(detail) = forward.map(|p| p.compare(&out)).transpose()?.flatten() {
                    return Err(Error::RecomputeMismatch {
                        layer: describe::<L, K>(index),
                        invocation: key.to_string(),
                        mode,
                        detail,
                    });
                }
                out
            }
        };
    }
    Ok(Ran {
        output: hidden,
        taps,
    })
}

/// The stack's node in candle's graph.
pub(crate) struct StackOp<L, K> {
    pub(crate) shared: Arc<Shared>,
    /// The precomputed output, handed out (and released) by the forward.
    pub(crate) output: Mutex<Option<Tensor>>,
    /// Taken by the first backward; a second backward finds it empty.
    pub(crate) stack: Mutex<Option<Stack<L, K>>>,
    /// The part of each layer's output the stack hands back, and where the gradients of those
    /// parts arrive.
    pub(crate) taps: Option<(Tap, Arc<TapGrads>)>,
}

impl<L: Layer<K>, K: Kwargs> StackOp<L, K> {
    fn backward(&self, grad: &Tensor) -> crate::Result<Tensor> {
        // Every tap node of this pass ran its backward before this one (they read this node's
        // output). Taken before anything can fail, so that a refused pass leaves nothing behind
        // for the next one.
        let mut tap_grads = self
            .taps
            .as_ref()
            .map(|(_, grads)| grads.take())
            .unwrap_or_default();
        let tap = self.taps.as_ref().map(|(tap, _)| *tap);
        // Outside `Checkpointer::backward`, the parameter gradients would reach no store.
        self.shared.ensure_collecting(|| describe::<L, K>(0))?;
        let mode = self.shared.policy.mode();
        // Nested: inside another stack's backward, whose recomputed segment reaches this stack
        // through a keyword argument or runs it as a nested stack.
        let depth = self.shared.enter_backward();
        let stack = lock(&self.stack).take().ok_or_else(|| {
            let layer = describe::<L, K>(0);
            if depth.nested {
                Error::StackInKeywordArgument { layer, mode }
            } else {
                Error::BackwardTwice { layer, mode }
            }
        })?;
        let Stack { calls, saved, key } = stack;
        // The boundaries, in the order this backward takes them (disk files are loaded ahead).
        let readers = self
            .shared
            .stores
            .readers(saved.iter().rev().filter_map(|kept| match &kept.saved {
                Saved::Boundary(boundary) => Some(boundary),
                Saved::Graph { .. } => None,
            }))?;
        let mut grad = grad.clone();
        let mut segments = saved.into_iter().rev().peekable();
        while let Some(Kept {
            seg,
            saved,
            prints,
            taps,
        }) = segments.next()
        {
            let (input, Ran { output, taps }) = match saved {
                Saved::Graph { input, output } => (input, Ran { output, taps }),
                Saved::Boundary(boundary) => {
                    let layer = describe::<L, K>(seg.start);
                    let boundary = self.shared.fetch(boundary, &readers, &layer)?;
                    // Bring the next boundary back while this segment recomputes.
                    if let Some(Kept {
                        seg: next_seg,
                        saved: Saved::Boundary(next),
                        ..
                    }) = segments.peek()
                    {
                        next.prefetch(&describe::<L, K>(next_seg.start))?;
                    }
                    let started = Instant::now();
                    // A copy, so that the boundary is a leaf whose gradient nothing swallows.
                    let input = Var::from_tensor(&boundary)?;
                    drop(boundary);
                    let verify = Outputs::Verify(&prints);
                    let ran = run_segment(&calls, seg, input.as_tensor(), key, mode, verify, tap)?;
                    self.shared.stats_mut().recompute += started.elapsed();
                    (input, ran)
                }
            };
            // One backward from the segment's output and from every tapped part the loss uses.
            let mut root = output.apply_op1(Seed(grad))?;
            for (part, index) in taps.iter().zip(seg.start..) {
                if let Some(part) = part
                    && let Some(g) = tap_grads.get_mut(index).and_then(Option::take)
                {
                    root = (root + part.apply_op1(Seed(g))?)?;
                }
            }
            let grads = root.backward()?;
            for node in root.sorted_nodes() {
                if node.is_variable()
                    && node.id() != input.as_tensor().id()
                    && let Some(g) = grads.get(node)
                {
                    self.shared.collect(node, g.detach())?;
                }
            }
            grad = match grads.get(input.as_tensor()) {
                Some(g) => g.detach(),
                // The segment ignores its input: the gradient is zero, not missing.
                None => input.as_tensor().zeros_like()?,
            };
        }
        Ok(grad)
    }
}

impl<L: Layer<K>, K: Kwargs> CustomOp2 for StackOp<L, K> {
    fn name(&self) -> &'static str {
        "checkpoint-stack"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        hand_out(&self.output, |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        hand_out(&self.output, |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(
        &self,
        _input: &Tensor,
        _anchor: &Tensor,
        _output: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        match self.backward(grad) {
            // The anchor is ours: it gets no gradient, and so never shows in a store.
            Ok(input_grad) => Ok((Some(input_grad), None)),
            Err(err) => Err(self.shared.fail(err)),
        }
    }
}

/// Takes the tensor a node precomputed (a stack's output, a tapped part) out of `slot`, and
/// copies its storage into a fresh buffer of the backend that asked for it.
fn hand_out<S>(
    slot: &Mutex<Option<Tensor>>,
    pick: impl Fn(&Storage) -> Option<&S>,
) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let output = lock(slot)
        .take()
        .ok_or_else(|| candle_core::Error::msg("checkpoint stack output was already taken"))?;
    let (storage, layout) = output.storage_and_layout();
    let src = pick(&storage).ok_or_else(|| {
        candle_core::Error::msg(
            "the output of a checkpointed stack lives on another device than its input: \
             every layer of a stack must keep the carry on the device it came in on; move \
             it between devices outside the stack",
        )
    })?;
    Ok((copy_contiguous(src, layout)?, layout.shape().clone()))
}

/// Where the gradients of a stack's tapped parts wait for the stack's backward.
pub(crate) struct TapGrads {
    /// Per layer, the gradient of its tapped part, if the loss reaches it.
    grads: Mutex<Vec<Option<Tensor>>>,
    /// Whether a tap node gave the stack's output its (zero) gradient in this pass already.
    zero_given: AtomicBool,
}

impl TapGrads {
    pub(crate) fn new(layers: usize) -> Self {
        Self {
            grads: Mutex::new(vec![None; layers]),
            zero_given: AtomicBool::new(false),
        }
    }

    /// The gradients of one backward pass, leaving the slots empty for the next pass.
    fn take(&self) -> Vec<Option<Tensor>> {
        let mut grads = lock(&self.grads);
        let empty = vec![None; grads.len()];
        self.zero_given.store(false, Ordering::SeqCst);
        mem::replace(&mut *grads, empty)
    }
}

/// A stack's node in candle's graph for the tapped part of layer `index`'s output: it reads the
/// stack's output (so that its backward runs first) and hands out the part the forward tapped.
pub(crate) struct TapOp {
    pub(crate) index: usize,
    pub(crate) part: Mutex<Option<Tensor>>,
    pub(crate) grads: Arc<TapGrads>,
}

impl CustomOp1 for TapOp {
    fn name(&self) -> &'static str {
        "checkpoint-tap"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        hand_out(&self.part, |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        hand_out(&self.part, |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(
        &self,
        stack_output: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if let Some(slot) = lock(&self.grads.grads).get_mut(self.index) {
            *slot = Some(grad.detach());
        }
        // candle requires a gradient for every node it visits, the stack's output included,
        // even if the loss reaches it only through taps: the first tap gives a zero one, as a
        // broadcast scalar rather than a buffer the size of the output.
        if self.grads.zero_given.swap(true, Ordering::SeqCst) {
            Ok(None)
        } else {
            let zero = Tensor::zeros((), stack_output.dtype(), stack_output.device())?;
            Ok(Some(zero.broadcast_as(stack_output.shape())?))
        }
    }
}

/// Seeds a backward pass with a given output gradient: `backward()` has no seed argument, and
/// `(y * g).sum_all()` would allocate a tensor the size of `y` for the same bits.
struct Seed(Tensor);

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "checkpoint-seed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        scalar_zero(s)
    }

    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        scalar_zero(s)
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

fn scalar_zero<S>(s: &S) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let shape = Shape::from(1);
    Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
}

/// Copies the elements `layout` addresses in `src` into a fresh contiguous buffer.
pub(crate) fn copy_contiguous<S>(src: &S, layout: &Layout) -> candle_core::Result<S>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // No zero-fill: the copy below writes every element (an output per stack, per step).
    // SAFETY: `copy_strided_src` writes all `layout.shape().elem_count()` elements of `dst`,
    // from offset 0, before anything reads it; on error `dst` is dropped unread.
    let mut dst = unsafe { src.device().alloc_uninit(layout.shape(), src.dtype())? };
    src.copy_strided_src(&mut dst, 0, layout)?;
    Ok(dst)
}
