//! Training the fixture checkpoint lowers its loss; the random-init model trains too.

use std::path::PathBuf;

use candle_core::{DType, Device};
use checkpoint_runtime::{Checkpointer, Policy};
use qwen2::data::BUNDLED_TEXT;
use qwen2::train::TrainConfig;
use qwen2_moe::{Config, loader, train};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2-moe-tiny")
}

fn short_run() -> TrainConfig {
    TrainConfig {
        steps: 8,
        batch: 4,
        lr: 3e-3,
        warmup: 1,
        ..TrainConfig::default()
    }
}

#[test]
fn a_short_training_run_on_the_fixture_lowers_the_loss() -> TestResult {
    let dev = Device::Cpu;
    let loaded = loader::load(&fixture(), DType::F32, &dev)?;
    let vocab = loaded.model.config().base.vocab_size;
    let mut data = train::folded_bytes(BUNDLED_TEXT, 32, vocab, 7)?;
    let ckpt = Checkpointer::new(Policy::none());
    let summary = train::train(
        &loaded.model,
        &loaded.params,
        &mut data,
        &ckpt,
        &short_run(),
        &dev,
    )?;
    let (first, last) = (summary.losses[0], summary.losses[summary.losses.len() - 1]);
    assert!(last < first - 0.1, "loss {first} -> {last}");
    assert!(
        summary.aux_losses.iter().all(|a| a.is_finite() && *a > 0.0),
        "{:?}",
        summary.aux_losses
    );
    Ok(())
}

#[test]
fn the_random_init_model_trains() -> TestResult {
    let dev = Device::Cpu;
    let cfg = Config::tiny_bytes();
    let loaded = loader::random(&cfg, 3, DType::F32, &dev)?;
    let mut data = train::folded_bytes(BUNDLED_TEXT, 32, cfg.base.vocab_size, 7)?;
    let ckpt = Checkpointer::new(Policy::none());
    let summary = train::train(
        &loaded.model,
        &loaded.params,
        &mut data,
        &ckpt,
        &short_run(),
        &dev,
    )?;
    let (first, last) = (summary.losses[0], summary.losses[summary.losses.len() - 1]);
    assert!(last < first, "loss {first} -> {last}");
    Ok(())
}
