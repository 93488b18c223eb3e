//! The recomputation check: a layer whose recomputed output differs from its forward output is
//! an error naming the layer, the invocation and what differed; a deterministic stack passes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Result, Tensor, Var};
use checkpoint_runtime::{Checkpointer, Error, Layer, Mode, Policy, RecomputeCheck};
use checkpoint_tests::block::{Block, BlockConfig, BlockKwargs};
use checkpoint_tests::init::Init;
use checkpoint_tests::mlp::MlpBlock;
use checkpoint_tests::run::{step, step_diff};
use checkpoint_tests::stochastic::Dropped;

/// What a [`Flaky`] layer changes once it has been called `after` times.
#[derive(Debug, Clone, Copy)]
enum Change {
    Value,
    Shape,
    Dtype,
}

/// A layer that is deliberately not a function of its inputs: a counter decides its output.
#[derive(Clone)]
struct Flaky {
    w: Var,
    calls: Arc<AtomicUsize>,
    after: usize,
    change: Change,
}

impl Layer for Flaky {
    fn forward_checkpointed(&self, x: &Tensor, (): &()) -> Result<Tensor> {
        let y = x.broadcast_mul(self.w.as_tensor())?.tanh()?;
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.after {
            return Ok(y);
        }
        match self.change {
            Change::Value => y + 1e-3,
            Change::Shape => Tensor::cat(&[&y, &y.narrow(1, 0, 1)?], 1),
            Change::Dtype => y.to_dtype(DType::F64),
        }
    }
}

/// A layer of either kind, so that a flaky layer can sit between deterministic ones.
#[derive(Clone)]
enum AnyLayer {
    Mlp(MlpBlock),
    Flaky(Flaky),
}

impl Layer for AnyLayer {
    fn forward_checkpointed(&self, x: &Tensor, (): &()) -> Result<Tensor> {
        match self {
            Self::Mlp(l) => l.forward_checkpointed(x, &()),
            Self::Flaky(l) => l.forward_checkpointed(x, &()),
        }
    }
}

/// `[mlp, flaky, mlp]` on a `(4, 16)` input; the flaky layer changes after `after` calls.
fn stack(change: Change, after: usize) -> Result<(Vec<AnyLayer>, Var)> {
    let mut init = Init::new(9);
    let mut mlp = || MlpBlock::new(16, &mut init, DType::F32, &Device::Cpu).map(AnyLayer::Mlp);
    let (first, last) = (mlp()?, mlp()?);
    let flaky = AnyLayer::Flaky(Flaky {
        w: Var::new(&[0.7f32], &Device::Cpu)?,
        calls: Arc::new(AtomicUsize::new(0)),
        after,
        change,
    });
    let x = Init::new(1).var((4, 16), 1.0, DType::F32, &Device::Cpu)?;
    Ok((vec![first, flaky, last], x))
}

/// The mismatch a step through `policy` reports, as (layer, invocation, mode, detail).
fn mismatch(
    policy: Policy,
    layers: &[AnyLayer],
    x: &Var,
    steps: usize,
) -> (String, String, Mode, String) {
    let ckpt = Checkpointer::new(policy);
    for _ in 1..steps {
        assert!(step(&ckpt, layers, &(), x.as_tensor()).is_ok());
    }
    match step(&ckpt, layers, &(), x.as_tensor()) {
        Err(Error::RecomputeMismatch {
            layer,
            invocation,
            mode,
            detail,
        }) => (layer, invocation, mode, detail),
        other => panic!("expected a recompute mismatch, got {other:?}"),
    }
}

const FLAKY: &str = "layer 1 (`AnyLayer::forward`)";

#[test]
fn changed_values_are_named_by_the_value_check_in_every_mode() -> Result<()> {
    for policy in [
        Policy::recompute(),
        Policy::new(Mode::OffloadHost),
        Policy::new(Mode::OffloadDisk),
        // One segment of the whole stack: the check still names the layer inside it.
        Policy::new(Mode::OffloadDisk).segments(3),
    ] {
        let (layers, x) = stack(Change::Value, 1)?;
        let mode = policy.mode();
        let policy = policy.check_recompute(RecomputeCheck::values());
        let (layer, invocation, got_mode, detail) = mismatch(policy, &layers, &x, 1);
        assert_eq!(
            (layer.as_str(), invocation.as_str(), got_mode),
            (FLAKY, "stack 0 of this engine", mode)
        );
        assert!(
            detail.starts_with("its output's values differ from the forward's (bit hash"),
            "{detail}"
        );
    }
    Ok(())
}

#[test]
fn the_message_says_what_to_do() -> Result<()> {
    let (layers, x) = stack(Change::Value, 1)?;
    let ckpt = Checkpointer::new(Policy::recompute().check_recompute(RecomputeCheck::values()));
    let err = step(&ckpt, &layers, &(), x.as_tensor())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let (head, tail) = err.split_once(" (bit hash ").unwrap_or_default();
    assert_eq!(
        head,
        "layer 1 (`AnyLayer::forward`), in stack 0 of this engine, recomputed a different output \
         than in the forward pass (mode recompute): its output's values differ from the forward's"
    );
    assert!(tail.ends_with(
        "; compared bit for bit on CPU). A checkpointed layer must be a deterministic function of \
         its carry, its keyword arguments and its weights: draw randomness through \
         checkpoint_runtime::rng (not candle_nn::ops::dropout or Tensor::rand), and keep counters \
         and caches out of its forward"
    ), "{tail}");
    Ok(())
}

#[test]
fn the_invocation_is_the_stack_that_differed() -> Result<()> {
    // Forward and recomputation of the first step agree; the second step's recomputation not.
    let (layers, x) = stack(Change::Value, 3)?;
    let policy = Policy::recompute().check_recompute(RecomputeCheck::values());
    let (layer, invocation, ..) = mismatch(policy, &layers, &x, 2);
    assert_eq!(
        (layer.as_str(), invocation.as_str()),
        (FLAKY, "stack 1 of this engine")
    );
    Ok(())
}

#[test]
fn shapes_and_dtypes_are_always_checked() -> Result<()> {
    for (change, expected) in [
        (
            Change::Shape,
            "its output has shape [4, 16] in the forward and [4, 17] now",
        ),
        (
            Change::Dtype,
            "its output's dtype is F32 in the forward and F64 now",
        ),
    ] {
        for mode in [Mode::Recompute, Mode::OffloadDisk] {
            let (layers, x) = stack(change, 1)?;
            // The default check: no values hashed.
            let policy = Policy::new(mode);
            assert_eq!(policy.recompute_check(), RecomputeCheck::Layout);
            let (layer, invocation, got_mode, detail) = mismatch(policy, &layers, &x, 1);
            assert_eq!(
                (
                    layer.as_str(),
                    invocation.as_str(),
                    got_mode,
                    detail.as_str()
                ),
                (FLAKY, "stack 0 of this engine", mode, expected)
            );
        }
    }
    Ok(())
}

#[test]
fn a_deterministic_stack_passes_the_value_check_in_every_mode() -> checkpoint_runtime::Result<()> {
    let cfg = BlockConfig::small(16);
    let mut init = Init::new(2);
    let layers = (0..5)
        .map(|_| {
            Ok(Dropped::new(
                Block::new(cfg, &mut init, DType::F32, &Device::Cpu)?,
                0.1,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let params: Vec<Var> = layers
        .iter()
        .flat_map(|l| l.inner.vars().iter().cloned())
        .collect();
    let kwargs = BlockKwargs::new(&cfg, 4, DType::F32, &Device::Cpu)?;
    let x = init.var((2, 4, 16), 1.0, DType::F32, &Device::Cpu)?;
    let plain = step(
        &Checkpointer::new(Policy::none()),
        &layers,
        &kwargs,
        x.as_tensor(),
    )?;
    let values = RecomputeCheck::values();
    for mode in [Mode::Recompute, Mode::OffloadHost, Mode::OffloadDisk] {
        for policy in [
            Policy::new(mode),
            Policy::new(mode).segments(2).keep_last(1),
            Policy::new(mode).segments(3).first(4),
        ] {
            let policy = policy.check_recompute(values);
            let ckpt = step(
                &Checkpointer::new(policy.clone()),
                &layers,
                &kwargs,
                x.as_tensor(),
            )?;
            assert_eq!(step_diff(&plain, &ckpt, &x, &params)?, 0.0, "{policy:?}");
        }
    }
    let budget = Policy::new(Mode::OffloadDisk)
        .budget(1 << 15)
        .check_recompute(values);
    let ckpt = step(&Checkpointer::new(budget), &layers, &kwargs, x.as_tensor())?;
    assert_eq!(step_diff(&plain, &ckpt, &x, &params)?, 0.0, "budget");
    Ok(())
}
