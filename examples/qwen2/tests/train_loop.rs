//! The training loop: gradient accumulation, save and resume of the training state, the saved
//! checkpoint's dtype and tokenizer files, and the loss curve.

use candle_core::{DType, Device, Tensor};
use checkpoint_runtime::{Checkpointer, Policy};
use checkpoint_tests::compare::max_abs_diff;
use qwen2::data::{BUNDLED_TEXT, Dataset};
use qwen2::train::{Summary, TrainConfig, train};
use qwen2::{Config, loader};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const SEED: u64 = 3;
const SEQ: usize = 32;

fn run_cfg(steps: usize, batch: usize, accumulate: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch,
        accumulate,
        lr: 1e-3,
        warmup: 1,
        ..TrainConfig::default()
    }
}

/// Trains a fresh seeded f32 model as `cfg` says; its summary and final weights.
fn run(cfg: &TrainConfig) -> Result<(Summary, Vec<Tensor>), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let config = Config::tiny_bytes();
    let model = loader::random(&config, SEED, DType::F32, &dev)?;
    let mut data = Dataset::bytes(BUNDLED_TEXT, SEQ, config.vocab_size, SEED)?;
    let ckpt = Checkpointer::new(Policy::recompute());
    let summary = train(
        &model.model,
        &model.params,
        &mut data,
        &ckpt,
        cfg,
        &dev,
        |_| Ok(()),
    )?;
    let weights = model
        .params
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<candle_core::Result<_>>()?;
    Ok((summary, weights))
}

fn max_weight_diff(a: &[Tensor], b: &[Tensor]) -> Result<f64, Box<dyn std::error::Error>> {
    let mut worst = 0f64;
    for (a, b) in a.iter().zip(b) {
        worst = worst.max(max_abs_diff(a, b)?);
    }
    Ok(worst)
}

#[test]
fn accumulating_two_micro_batches_is_one_step_of_twice_the_batch() -> TestResult {
    let (acc, acc_w) = run(&run_cfg(1, 2, 2))?;
    let (big, big_w) = run(&run_cfg(1, 4, 1))?;
    let (small, small_w) = run(&run_cfg(1, 2, 1))?;
    assert_eq!(acc.tokens, big.tokens);
    let loss_diff = (acc.losses[0] - big.losses[0]).abs();
    assert!(
        loss_diff <= 1e-5,
        "loss {} vs {}",
        acc.losses[0],
        big.losses[0]
    );
    let diff = max_weight_diff(&acc_w, &big_w)?;
    assert!(diff <= 1e-5, "weights differ by {diff}");
    // The test can tell: a step on the first micro-batch alone lands elsewhere.
    let alone = max_weight_diff(&small_w, &big_w)?;
    println!(
        "loss {} vs {} (one micro-batch: {}); weights within {diff:e}, vs {alone:e} for one \
         micro-batch",
        acc.losses[0], big.losses[0], small.losses[0]
    );
    assert!(alone > 100.0 * diff.max(1e-7), "one micro-batch: {alone}");
    Ok(())
}
