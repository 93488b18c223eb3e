//! RNG replay: a layer with dropout gives the plain graph's gradients, bit for bit, in every
//! mode, because recomputation draws the forward's masks; and candle's own dropout is the trap
//! the docs say it is.

use candle_core::{DType, Device, Result, Tensor, Var};
use checkpoint_runtime::rng::{self, Rng};
use checkpoint_runtime::{Checkpointer, Error, Layer, Mode, Policy, RecomputeCheck};
use checkpoint_tests::block::{Block, BlockConfig, BlockKwargs};
use checkpoint_tests::compare::rel_err;
use checkpoint_tests::init::Init;
use checkpoint_tests::mlp::MlpBlock;
use checkpoint_tests::run::{Step, step, step_diff};
use checkpoint_tests::stochastic::Dropped;

/// Every checkpointing policy a step can take, for `depth` layers.
fn policies(depth: usize) -> Vec<Policy> {
    let mut all = Vec::new();
    for mode in [Mode::Recompute, Mode::OffloadHost, Mode::OffloadDisk] {
        all.extend([
            Policy::new(mode),
            Policy::new(mode).segments(2),
            Policy::new(mode).segments(3).first(depth - 1).keep_last(1),
        ]);
    }
    // A budget probes every layer first (inside the same invocations), then keeps some graphs.
    all.push(Policy::new(Mode::OffloadDisk).budget(1 << 14));
    all.push(Policy::recompute().budget(1 << 30));
    all
}

fn mlp_stack(
    depth: usize,
    hidden: usize,
    p: f32,
    dtype: DType,
) -> Result<(Vec<Dropped<MlpBlock>>, Vec<Var>)> {
    let mut init = Init::new(3);
    let layers = (0..depth)
        .map(|_| {
            Ok(Dropped::new(
                MlpBlock::new(hidden, &mut init, dtype, &Device::Cpu)?,
                p,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let params = layers
        .iter()
        .flat_map(|l| l.inner.vars().iter().cloned())
        .collect();
    Ok((layers, params))
}

/// Two steps through `ckpt` on the same input.
fn two_steps<L: Layer>(
    ckpt: &Checkpointer,
    layers: &[L],
    x: &Var,
) -> checkpoint_runtime::Result<[Step; 2]> {
    Ok([
        step(ckpt, layers, &(), x.as_tensor())?,
        step(ckpt, layers, &(), x.as_tensor())?,
    ])
}

#[test]
fn dropout_gives_the_plain_graphs_gradients_bit_for_bit_in_every_mode()
-> checkpoint_runtime::Result<()> {
    let (layers, params) = mlp_stack(5, 16, 0.1, DType::F32)?;
    let x = Init::new(4).var((3, 7, 16), 1.0, DType::F32, &Device::Cpu)?;
    let plain = two_steps(&Checkpointer::new(Policy::none()), &layers, &x)?;
    // The masks are not a no-op: the first step's output has dropped elements.
    let zeros = plain[0]
        .output
        .eq(0.0)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    assert!((0.05..0.15).contains(&zeros), "dropped fraction {zeros}");
    for policy in policies(layers.len()) {
        let ckpt = two_steps(&Checkpointer::new(policy.clone()), &layers, &x)?;
        for (i, (a, b)) in plain.iter().zip(&ckpt).enumerate() {
            assert_eq!(step_diff(a, b, &x, &params)?, 0.0, "step {i}, {policy:?}");
        }
    }
    Ok(())
}

#[test]
fn dropout_in_a_qwen2_like_stack_in_bf16_matches_none_exactly() -> checkpoint_runtime::Result<()> {
    let cfg = BlockConfig::small(16);
    let dtype = DType::BF16;
    let mut init = Init::new(8);
    let layers = (0..4)
        .map(|_| {
            Ok(Dropped::new(
                Block::new(cfg, &mut init, dtype, &Device::Cpu)?,
                0.1,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let params: Vec<Var> = layers
        .iter()
        .flat_map(|l| l.inner.vars().iter().cloned())
        .collect();
    let kwargs = BlockKwargs::new(&cfg, 6, dtype, &Device::Cpu)?;
    let x = init.var((2, 6, 16), 1.0, dtype, &Device::Cpu)?;
    let plain = step(
        &Checkpointer::new(Policy::none()),
        &layers,
        &kwargs,
        x.as_tensor(),
    )?;
    // The mask is made in the carry's dtype: nothing is promoted to f32.
    assert_eq!(plain.output.dtype(), dtype);
    for mode in [Mode::Recompute, Mode::OffloadDisk] {
        let ckpt = step(
            &Checkpointer::new(Policy::new(mode).segments(2)),
            &layers,
            &kwargs,
            x.as_tensor(),
        )?;
        assert_eq!(step_diff(&plain, &ckpt, &x, &params)?, 0.0, "{mode}");
    }
    Ok(())
}

#[test]
fn every_step_draws_new_masks_and_a_seed_replays_them() -> checkpoint_runtime::Result<()> {
    let (layers, _) = mlp_stack(2, 16, 0.5, DType::F32)?;
    let x = Init::new(4).var((4, 16), 1.0, DType::F32, &Device::Cpu)?;
    let outputs = |ckpt: Checkpointer| -> checkpoint_runtime::Result<Vec<Vec<f32>>> {
        two_steps(&ckpt, &layers, &x)?
            .iter()
            .map(|s| Ok(s.output.flatten_all()?.to_vec1::<f32>()?))
            .collect()
    };
    let first = outputs(Checkpointer::new(Policy::recompute()).with_seed(1))?;
    assert_ne!(first[0], first[1], "two steps drew the same masks");
    // The same seed, another engine and another mode: the same masks, step by step.
    assert_eq!(
        outputs(Checkpointer::new(Policy::new(Mode::OffloadDisk)).with_seed(1))?,
        first
    );
    assert_ne!(
        outputs(Checkpointer::new(Policy::recompute()).with_seed(2))?[0],
        first[0]
    );
    // Reseeding starts the count of stacks over.
    let ckpt = Checkpointer::new(Policy::recompute()).with_seed(1);
    let _ = outputs(ckpt.clone())?;
    assert_eq!(outputs(ckpt.with_seed(1))?, first);
    Ok(())
}

/// A layer running a stack of its own: the inner stack's masks are keyed by the outer layer's
/// invocation, so recomputing the outer layer replays them.
#[test]
fn a_stack_nested_in_a_layer_replays_its_masks() -> checkpoint_runtime::Result<()> {
    #[derive(Clone)]
    struct Outer {
        inner: Vec<Dropped<MlpBlock>>,
        ckpt: Checkpointer,
    }
    impl Layer for Outer {
        fn forward_checkpointed(&self, x: &Tensor, (): &()) -> Result<Tensor> {
            let y = self.ckpt.run_stack(x, self.inner.iter().map(|l| (l, ())))?;
            rng::dropout(&y, 0.2)
        }
    }
    let (inner, params) = mlp_stack(6, 8, 0.3, DType::F32)?;
    let x = Init::new(5).var((2, 8), 1.0, DType::F32, &Device::Cpu)?;
    let run = |policy: Policy| {
        let ckpt = Checkpointer::new(policy);
        let outers: Vec<_> = inner
            .chunks(2)
            .map(|c| Outer {
                inner: c.to_vec(),
                ckpt: ckpt.clone(),
            })
            .collect();
        two_steps(&ckpt, &outers, &x)
    };
    let plain = run(Policy::none())?;
    for policy in [
        Policy::recompute(),
        Policy::new(Mode::OffloadDisk).segments(2),
    ] {
        let nested = run(policy.clone())?;
        for (a, b) in plain.iter().zip(&nested) {
            assert_eq!(step_diff(a, b, &x, &params)?, 0.0, "{policy:?}");
        }
    }
    Ok(())
}

/// The trap the docs name: candle's dropout draws a new mask when the layer is recomputed, so
/// the gradients belong to no forward. The value check catches it; the replayed dropout passes.
#[test]
fn candle_nn_dropout_is_the_trap_and_the_value_check_names_it() -> checkpoint_runtime::Result<()> {
    let mut init = Init::new(3);
    let layers = (0..3)
        .map(|_| {
            Ok(Dropped::candle(
                MlpBlock::new(16, &mut init, DType::F32, &Device::Cpu)?,
                0.1,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let x = init.var((4, 16), 1.0, DType::F32, &Device::Cpu)?;
    let plain = step(
        &Checkpointer::new(Policy::none()),
        &layers,
        &(),
        x.as_tensor(),
    )?;
    let ckpt = step(
        &Checkpointer::new(Policy::recompute()),
        &layers,
        &(),
        x.as_tensor(),
    )?;
    let grad = |s: &Step| {
        s.grads
            .get(x.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::msg("no input gradient"))
    };
    // Different masks in every call: the gradient is not the one of the forward that ran.
    assert!(rel_err(&grad(&ckpt)?, &grad(&plain)?)? > 0.05);

    let checked = Checkpointer::new(Policy::recompute().check_recompute(RecomputeCheck::values()));
    match step(&checked, &layers, &(), x.as_tensor()) {
        Err(Error::RecomputeMismatch { layer, .. }) => {
            assert!(layer.starts_with("layer 2 (`Dropped<"), "{layer}");
        }
        other => panic!("expected a recompute mismatch, got {other:?}"),
    }
    Ok(())
}

#[test]
fn plain_calls_draw_from_a_generator_the_caller_owns() -> Result<()> {
    let (layers, _) = mlp_stack(3, 8, 0.5, DType::F32)?;
    let x = Init::new(2).uniform((2, 8), 1.0, DType::F32, &Device::Cpu)?;
    let plain = |x: &Tensor| {
        layers
            .iter()
            .try_fold(x.clone(), |h, l| l.forward_checkpointed(&h, &()))
    };
    // Without an engine or a scope there is nothing to draw from: an error, never a guess.
    let err = plain(&x).err().map(|e| e.to_string()).unwrap_or_default();
    // candle appends a backtrace when RUST_BACKTRACE is set.
    assert!(
        err.starts_with(
            "checkpoint_runtime::rng::dropout was called outside any engine invocation and any \
         `Rng::scope`, so nothing decides what it draws. Run the layer through a Checkpointer \
         (Mode::None included), or wrap the plain call in `Rng::new(seed).scope(|| ...)`"
        ),
        "{err}"
    );
    let (mut a, mut b) = (Rng::new(11), Rng::new(11));
    let ya = a.scope(|| plain(&x))?.flatten_all()?.to_vec1::<f32>()?;
    let yb = b.scope(|| plain(&x))?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(ya, yb);
    assert_ne!(a.scope(|| plain(&x))?.flatten_all()?.to_vec1::<f32>()?, ya);
    // Dropout 0 is the identity, and needs no source (evaluation).
    let eval: Vec<_> = layers
        .iter()
        .map(|l| Dropped::new(l.inner.clone(), 0.0))
        .collect();
    assert!(
        eval.iter()
            .try_fold(x.clone(), |h, l| l.forward_checkpointed(&h, &()))
            .is_ok()
    );
    Ok(())
}

#[test]
fn a_bad_probability_names_the_layer() -> Result<()> {
    let (mut layers, _) = mlp_stack(2, 8, 0.1, DType::F32)?;
    layers[1].p = 1.0;
    let x = Init::new(2).uniform((2, 8), 1.0, DType::F32, &Device::Cpu)?;
    let err = Checkpointer::new(Policy::recompute())
        .run_stack(&x, layers.iter().map(|l| (l, ())))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with("layer 1 (`Dropped<checkpoint_tests::mlp::MlpBlock>::forward`) failed during forward (mode recompute): dropout probability 1 is not in [0, 1)"),
        "{err}"
    );
    Ok(())
}

#[test]
fn uniform_draws_are_replayed_too() -> checkpoint_runtime::Result<()> {
    /// Adds uniform noise in the carry's dtype.
    #[derive(Clone)]
    struct Noisy(Var);
    impl Layer for Noisy {
        fn forward_checkpointed(&self, x: &Tensor, (): &()) -> Result<Tensor> {
            let noise = rng::uniform(x.shape(), x.dtype(), x.device())?;
            (x.broadcast_mul(self.0.as_tensor())?.tanh()? + noise)?.sqr()
        }
    }
    let layers: Vec<_> = (0..4)
        .map(|i| Ok(Noisy(Var::new(&[0.3f32 + 0.1 * i as f32], &Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let params: Vec<Var> = layers.iter().map(|l| l.0.clone()).collect();
    let x = Init::new(6).var((3, 5), 1.0, DType::F32, &Device::Cpu)?;
    let plain = two_steps(&Checkpointer::new(Policy::none()), &layers, &x)?;
    let ckpt = two_steps(
        &Checkpointer::new(Policy::new(Mode::OffloadDisk)),
        &layers,
        &x,
    )?;
    for (a, b) in plain.iter().zip(&ckpt) {
        assert_eq!(step_diff(a, b, &x, &params)?, 0.0);
    }
    Ok(())
}
