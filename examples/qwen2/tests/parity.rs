//! Parity with the shared reference (`tests/fixtures/qwen2-tiny`, made by Hugging Face
//! transformers), for every checkpoint mode the engine implements, and exact equality of the
//! recomputed gradients with the plain graph's.

use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device};
use checkpoint_runtime::{Checkpointer, Mode, Policy};
use checkpoint_tests::compare::max_abs_diff;
use qwen2::data::{ByteDataset, collate};
use qwen2::loader::{self, Loaded};
use qwen2::loss::causal_lm_loss;
use qwen2::train::{TrainConfig, policy, train};
use qwen2::verify::{GRAD_TOLERANCE, OUTPUT_TOLERANCE, verify};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2-tiny")
}

fn check_mode(policy: Policy) -> TestResult {
    let dir = fixture();
    let report = verify(
        &dir,
        &dir.join("reference.safetensors"),
        policy,
        &Device::Cpu,
    )?;
    // logits, loss, and one gradient per parameter of the 4-layer tied model
    assert_eq!(report.checks.len(), 2 + 1 + 4 * 12 + 1, "{report}");
    for c in &report.checks {
        let tol = if c.name.starts_with("grad.") {
            GRAD_TOLERANCE
        } else {
            OUTPUT_TOLERANCE
        };
        assert!(
            c.rel_err <= tol,
            "{} off by {:.3e}\n{report}",
            c.name,
            c.rel_err
        );
    }
    report.ok()?;
    Ok(())
}

#[test]
fn matches_transformers_without_checkpointing() -> TestResult {
    check_mode(Policy::none())
}

#[test]
fn matches_transformers_with_recompute() -> TestResult {
    check_mode(Policy::recompute())
}

#[test]
fn matches_transformers_with_recompute_in_segments_of_two() -> TestResult {
    check_mode(Policy::recompute().segments(2).first(3))
}

/// Gradients of every parameter for one padded batch.
fn grads(loaded: &Loaded, policy: Policy) -> Result<GradStore, Box<dyn std::error::Error>> {
    let batch = collate(
        &[&[5, 17, 99, 3, 64, 2, 8, 120, 7], &[44, 1, 90, 12, 33]],
        &Device::Cpu,
    )?;
    let ckpt = Checkpointer::new(policy);
    let logits =
        loaded
            .model
            .forward(&batch.input_ids, Some(&batch.attention_mask), Some(&ckpt))?;
    let loss = causal_lm_loss(&logits, &batch.labels)?;
    Ok(ckpt.backward(&loss)?)
}

#[test]
fn every_parameter_gets_a_nonzero_gradient_and_recompute_is_exact() -> TestResult {
    let loaded = loader::load(&fixture(), DType::F32, &Device::Cpu)?;
    let plain = grads(&loaded, Policy::none())?;
    for policy in [
        Policy::recompute(),
        Policy::recompute().segments(2),
        Policy::recompute().first(1),
    ] {
        let recomputed = grads(&loaded, policy.clone())?;
        for (name, var) in &loaded.params {
            let a = plain
                .get(var.as_tensor())
                .ok_or(format!("no gradient for {name} (none)"))?;
            let b = recomputed
                .get(var.as_tensor())
                .ok_or(format!("no gradient for {name} ({policy:?})"))?;
            let size = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(size > 0.0, "{name}: zero gradient");
            assert_eq!(
                max_abs_diff(a, b)?,
                0.0,
                "{name}: {policy:?} differs from none"
            );
        }
    }
    Ok(())
}

#[test]
fn offload_modes_are_refused_until_the_engine_has_them() {
    for mode in [Mode::OffloadHost, Mode::OffloadDisk] {
        let err = policy(mode, 1, None).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains(mode.as_str()) && e.contains("recompute")));
    }
}

#[test]
fn a_short_training_run_lowers_the_loss() -> TestResult {
    let dev = Device::Cpu;
    let loaded = loader::load(&fixture(), DType::F32, &dev)?;
    let text = "It is a truth universally acknowledged. ".repeat(8);
    let mut data = ByteDataset::new(&text, 24, loaded.config.vocab_size, 7)?;
    let cfg = TrainConfig {
        steps: 8,
        batch: 2,
        lr: 1e-2,
        warmup: 1,
        ..TrainConfig::default()
    };
    let ckpt = Checkpointer::new(Policy::recompute());
    let summary = train(&loaded.model, &loaded.params, &mut data, &ckpt, &cfg, &dev)?;
    let (first, last) = (summary.losses[0], summary.losses[summary.losses.len() - 1]);
    assert!(last < first, "loss {first} -> {last}");
    Ok(())
}
