//! Two engines in two threads, training two models at once, compute exactly what each computes
//! alone: engines share no state (disk directories, random streams, gradient stores).

use std::thread;

use candle_core::{DType, Device, Result, Var};
use checkpoint_runtime::{Checkpointer, Kwargs, Layer, Mode, Policy};
use checkpoint_tests::block::{Block, BlockConfig, BlockKwargs};
use checkpoint_tests::init::Init;
use checkpoint_tests::mlp::MlpBlock;
use checkpoint_tests::run::step;
use checkpoint_tests::stochastic::Dropped;

const STEPS: usize = 3;

/// What one training run saw: per step, the loss and every gradient (input last), as bits.
type Trace = Vec<(u32, Vec<Vec<u32>>)>;

/// A model: its layers, their keyword arguments, the input and the parameters it trains.
struct Model<L, K> {
    layers: Vec<L>,
    kwargs: K,
    x: Var,
    params: Vec<Var>,
}

fn mlp_model() -> Result<Model<Dropped<MlpBlock>, ()>> {
    let mut init = Init::new(31);
    let layers = (0..6)
        .map(|_| {
            Ok(Dropped::new(
                MlpBlock::new(24, &mut init, DType::F32, &Device::Cpu)?,
                0.1,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let params = layers
        .iter()
        .flat_map(|l| l.inner.vars().iter().cloned())
        .collect();
    let x = init.var((3, 5, 24), 1.0, DType::F32, &Device::Cpu)?;
    Ok(Model {
        layers,
        kwargs: (),
        x,
        params,
    })
}

fn block_model() -> Result<Model<Dropped<Block>, BlockKwargs>> {
    let cfg = BlockConfig::small(16);
    let mut init = Init::new(32);
    let layers = (0..4)
        .map(|_| {
            Ok(Dropped::new(
                Block::new(cfg, &mut init, DType::F32, &Device::Cpu)?,
                0.1,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let params = layers
        .iter()
        .flat_map(|l| l.inner.vars().iter().cloned())
        .collect();
    let kwargs = BlockKwargs::new(&cfg, 6, DType::F32, &Device::Cpu)?;
    let x = init.var((2, 6, 16), 1.0, DType::F32, &Device::Cpu)?;
    Ok(Model {
        layers,
        kwargs,
        x,
        params,
    })
}

/// Trains a fresh model from `make` for [`STEPS`] steps of plain SGD through an engine with
/// `policy`, recording every loss and gradient.
fn train<L: Layer<K>, K: Kwargs + Clone>(
    make: fn() -> Result<Model<L, K>>,
    policy: Policy,
) -> checkpoint_runtime::Result<Trace> {
    let model = make()?;
    let ckpt = Checkpointer::new(policy).with_seed(5);
    let bits = |t: &candle_core::Tensor| -> Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f32::to_bits)
            .collect())
    };
    let mut trace = Trace::new();
    for _ in 0..STEPS {
        let s = step(&ckpt, &model.layers, &model.kwargs, model.x.as_tensor())?;
        let mut grads = Vec::new();
        for var in model.params.iter().chain([&model.x]) {
            let g = s
                .grads
                .get(var.as_tensor())
                .ok_or_else(|| candle_core::Error::msg("a gradient is missing"))?;
            grads.push(bits(g)?);
            var.set(&(var.as_tensor() - (g * 0.05)?)?)?;
        }
        trace.push((s.loss.to_scalar::<f32>()?.to_bits(), grads));
    }
    Ok(trace)
}

/// The thread's result, or its panic, carried on.
fn join<T>(handle: thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Trains both models alone, then both at once in two threads, and compares bit for bit.
fn assert_alone_equals_together(mlp: Policy, block: Policy) -> checkpoint_runtime::Result<()> {
    let alone = (
        train(mlp_model, mlp.clone())?,
        train(block_model, block.clone())?,
    );
    let together = thread::scope(|s| {
        let a = s.spawn(|| train(mlp_model, mlp.clone()));
        let b = s.spawn(|| train(block_model, block.clone()));
        (join(a), join(b))
    });
    let together = (together.0?, together.1?);
    assert_eq!(alone.0.len(), STEPS);
    assert!(
        alone.0 == together.0,
        "the MLP model ({mlp:?}) differs when trained next to another"
    );
    assert!(
        alone.1 == together.1,
        "the block model ({block:?}) differs when trained next to another"
    );
    // Training moved: each step's loss is a new one.
    assert_ne!(alone.0[0].0, alone.0[STEPS - 1].0);
    Ok(())
}

#[test]
fn two_engines_in_two_threads_match_each_run_alone() -> checkpoint_runtime::Result<()> {
    assert_alone_equals_together(
        Policy::new(Mode::OffloadDisk),
        Policy::new(Mode::OffloadDisk).segments(2),
    )?;
    assert_alone_equals_together(
        Policy::recompute().segments(2),
        Policy::new(Mode::OffloadHost),
    )?;
    assert_alone_equals_together(
        Policy::none(),
        Policy::new(Mode::OffloadDisk).budget(1 << 15),
    )
}
