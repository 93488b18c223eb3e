//! The glue between a checkpointed stack and candle's autograd.
//!
//! A whole stack is ONE node of candle's graph: a [`CustomOp2`] over (stack input, anchor), whose
//! forward hands out the output the engine already computed and whose backward re-runs the
//! segments from their saved boundaries. The boundaries therefore live wherever the engine put
//! them, not in candle's graph. The anchor is a one-element `Var`: without a tracked operand,
//! candle records nothing and the backward (with every parameter gradient) would never run.

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
/// draws), naming the failing layer in the error.
pub(crate) fn run_segment<L: Layer<K>, K: Kwargs>(
    calls: &[(L, K)],
    seg: Segment,
    input: &Tensor,
    key: StackKey,
    mode: Mode,
    mut outputs: Outputs<'_>,
) -> crate::Result<Tensor> {
    let phase = match outputs {
        Outputs::Verify(_) => "recompute",
        Outputs::Keep | Outputs::Record(..) => "forward",
    };
    let mut hidden = input.clone();
    for (index, (layer, kwargs)) in calls.iter().enumerate().take(seg.end).skip(seg.start) {
        let out = key
            .invoke(index, || layer.forward_checkpointed(&hidden, kwargs))
            .map_err(|source| Error::Layer {
                layer: describe::<L, K>(index),
                phase,
                mode,
                source: Box::new(source),
            })?;
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
    Ok(hidden)
}

/// The stack's node in candle's graph.
pub(crate) struct StackOp<L, K> {
    pub(crate) shared: Arc<Shared>,
    /// The precomputed output, handed out (and released) by the forward.
    pub(crate) output: Mutex<Option<Tensor>>,
    /// Taken by the first backward; a second backward finds it empty.
    pub(crate) stack: Mutex<Option<Stack<L, K>>>,
}

impl<L: Layer<K>, K: Kwargs> StackOp<L, K> {
    fn take_output(&self) -> candle_core::Result<Tensor> {
        lock(&self.output)
            .take()
            .ok_or_else(|| candle_core::Error::msg("checkpoint stack output was already taken"))
    }

    /// The output's storage, copied into a fresh buffer of the backend that asked for it.
    fn forward_copy<S>(
        &self,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let output = self.take_output()?;
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

    fn backward(&self, grad: &Tensor) -> crate::Result<Tensor> {
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
        while let Some(Kept { seg, saved, prints }) = segments.next() {
            let (input, output) = match saved {
                Saved::Graph { input, output } => (input, output),
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
                    let output = run_segment(&calls, seg, input.as_tensor(), key, mode, verify)?;
                    self.shared.stats_mut().recompute += started.elapsed();
                    (input, output)
                }
            };
            let grads = output.apply_op1(Seed(grad))?.backward()?;
            for node in output.sorted_nodes() {
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
        self.forward_copy(|s| match s {
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
        self.forward_copy(|s| match s {
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
