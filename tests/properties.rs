//! Property tests: random depths, segmentations, shapes, dtypes, dropout and policies give
//! exactly the plain graph's gradients on CPU (max |diff| = 0 for the output, the loss, the
//! input and every parameter).

use candle_core::{DType, Device, Var};
use checkpoint_runtime::{Checkpointer, Error, Kwargs, Layer, Mode, Policy, RecomputeCheck};
use checkpoint_tests::block::{Block, BlockConfig, BlockKwargs};
use checkpoint_tests::init::Init;
use checkpoint_tests::mlp::MlpBlock;
use checkpoint_tests::run::{step, step_diff};
use checkpoint_tests::stochastic::Dropped;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// How a stack is checkpointed: everything a [`Policy`] can say.
#[derive(Debug, Clone)]
struct Plan {
    mode: Mode,
    segments: usize,
    first: Option<usize>,
    keep_last: usize,
    /// A budget in bytes replaces the three settings above.
    budget: Option<u64>,
    check_values: bool,
}

impl Plan {
    fn policy(&self) -> Policy {
        let policy = match self.budget {
            Some(bytes) => Policy::new(self.mode).budget(bytes),
            None => {
                let p = Policy::new(self.mode)
                    .segments(self.segments)
                    .keep_last(self.keep_last);
                match self.first {
                    Some(n) => p.first(n),
                    None => p,
                }
            }
        };
        if self.check_values {
            policy.check_recompute(RecomputeCheck::values())
        } else {
            policy
        }
    }
}

fn plans(depth: usize) -> impl Strategy<Value = Plan> {
    let mode = prop_oneof![
        Just(Mode::Recompute),
        Just(Mode::OffloadHost),
        Just(Mode::OffloadDisk)
    ];
    (
        mode,
        1..=depth + 1,
        proptest::option::of(0..=depth + 1),
        0..=2usize,
        proptest::option::weighted(0.2, 1u64 << 10..=1 << 20),
        any::<bool>(),
    )
        .prop_map(
            |(mode, segments, first, keep_last, budget, check_values)| Plan {
                mode,
                segments,
                first,
                keep_last,
                // The planner refuses a budget for offload-host on a CPU (nothing to free there).
                budget: budget.filter(|_| mode != Mode::OffloadHost),
                check_values,
            },
        )
}

/// Runs `layers` through the plain graph and through `plan`; the two must agree exactly.
fn assert_plan_matches_none<L: Layer<K>, K: Kwargs + Clone>(
    layers: &[L],
    kwargs: &K,
    x: &Var,
    params: &[Var],
    plan: &Plan,
) -> Result<(), TestCaseError> {
    let fail = |e: Error| TestCaseError::fail(e.to_string());
    let plain = step(
        &Checkpointer::new(Policy::none()),
        layers,
        kwargs,
        x.as_tensor(),
    )
    .map_err(fail)?;
    let ckpt = match step(
        &Checkpointer::new(plan.policy()),
        layers,
        kwargs,
        x.as_tensor(),
    ) {
        Ok(ckpt) => ckpt,
        // A budget below the most frugal plan is refused, with the bytes it needs.
        Err(Error::Config(why)) if plan.budget.is_some() => return Err(TestCaseError::reject(why)),
        Err(e) => return Err(fail(e)),
    };
    let diff =
        step_diff(&plain, &ckpt, x, params).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(diff, 0.0);
    Ok(())
}

fn dtypes() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)]
}

fn dropout() -> impl Strategy<Value = f32> {
    prop_oneof![Just(0.0f32), Just(0.1), Just(0.5)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn mlp_stacks_match_none_exactly(
        (depth, plan) in (1..=6usize).prop_flat_map(|d| (Just(d), plans(d))),
        hidden in prop_oneof![Just(4usize), Just(8), Just(12)],
        batch in proptest::collection::vec(1..=3usize, 1..=2),
        dtype in dtypes(),
        p in dropout(),
        seed in any::<u64>(),
    ) {
        let dev = Device::Cpu;
        let mut init = Init::new(seed);
        let layers = (0..depth)
            .map(|_| Ok(Dropped::new(MlpBlock::new(hidden, &mut init, dtype, &dev)?, p)))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let params: Vec<Var> = layers.iter().flat_map(|l| l.inner.vars().iter().cloned()).collect();
        let mut shape = batch;
        shape.push(hidden);
        let x = init.var(shape, 1.0, dtype, &dev).map_err(|e| TestCaseError::fail(e.to_string()))?;
        assert_plan_matches_none(&layers, &(), &x, &params, &plan)?;
    }

    #[test]
    fn qwen2_like_stacks_match_none_exactly(
        (depth, plan) in (1..=4usize).prop_flat_map(|d| (Just(d), plans(d))),
        hidden in prop_oneof![Just(8usize), Just(16)],
        (batch, t) in (1..=2usize, 1..=5usize),
        dtype in dtypes(),
        p in dropout(),
        seed in any::<u64>(),
    ) {
        let (dev, cfg) = (Device::Cpu, BlockConfig::small(hidden));
        let build = || -> candle_core::Result<_> {
            let mut init = Init::new(seed);
            let layers = (0..depth)
                .map(|_| Ok(Dropped::new(Block::new(cfg, &mut init, dtype, &dev)?, p)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let x = init.var((batch, t, hidden), 1.0, dtype, &dev)?;
            Ok((layers, BlockKwargs::new(&cfg, t, dtype, &dev)?, x))
        };
        let (layers, kwargs, x) = build().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let params: Vec<Var> = layers.iter().flat_map(|l| l.inner.vars().iter().cloned()).collect();
        assert_plan_matches_none(&layers, &kwargs, &x, &params, &plan)?;
    }
}
