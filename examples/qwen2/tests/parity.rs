//! Parity with the shared reference (`tests/fixtures/qwen2-tiny`, made by Hugging Face
//! transformers), for every checkpoint mode and policy (segments, first, keep-last, a memory
//! budget), and exact equality of the recomputed and offloaded gradients with the plain graph's.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use checkpoint_runtime::{Checkpointer, DiskConfig, Mode, Placement, Policy};
use checkpoint_tests::compare::{max_abs_diff, same_nonzero_grads};
use checkpoint_tests::temp::TempDir;
use qwen2::data::{Dataset, collate};
use qwen2::loader::{self, Loaded};
use qwen2::loss::causal_lm_loss;
use qwen2::train::{CheckpointOptions, TrainConfig, train};
use qwen2::verify::{GRAD_TOLERANCE, OUTPUT_TOLERANCE, Report, verify};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2-tiny")
}

fn check_mode(policy: Policy) -> TestResult {
    check_with(&Checkpointer::new(policy))
}

fn check_with(ckpt: &Checkpointer) -> TestResult {
    let dir = fixture();
    let report = verify(&dir, &dir.join("reference.safetensors"), ckpt, &Device::Cpu)?;
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

#[test]
fn matches_transformers_with_host_offload() -> TestResult {
    check_mode(Policy::new(Mode::OffloadHost))
}

#[test]
fn matches_transformers_with_disk_offload() -> TestResult {
    let root = TempDir::new("qwen2-disk-parity")?;
    let ckpt = Checkpointer::with_disk(
        Policy::new(Mode::OffloadDisk).segments(2).keep_last(1),
        DiskConfig {
            root: root.path().to_owned(),
            prefetch: 1,
            write_queue: 1,
        },
    );
    check_with(&ckpt)?;
    let stats = ckpt.take_stats();
    assert!(stats.disk_bytes > 0 && stats.device_bytes > 0, "{stats}");
    assert_eq!(stats.prefetch_hits + stats.prefetch_waits, 1, "{stats}");
    let private = ckpt.disk_dir().ok_or("no private directory was created")?;
    assert!(private.starts_with(root.path()), "{}", private.display());
    drop(ckpt);
    assert!(
        !private.exists(),
        "{} outlived the engine",
        private.display()
    );
    Ok(())
}

/// The stack's per-layer costs on the fixture batch, from a budget probe that keeps everything.
fn probe_boundary_bytes() -> Result<u64, Box<dyn std::error::Error>> {
    let ckpt = Checkpointer::new(Policy::recompute().budget(u64::MAX));
    check_with(&ckpt)?;
    let plans = ckpt.budget_plans();
    let plan = plans.first().ok_or("a budget policy made no plan")?;
    assert!(
        plan.placements.iter().all(|&p| p == Placement::Graph),
        "{plan}"
    );
    Ok(plan.costs[0].boundary_bytes)
}

#[test]
fn matches_transformers_with_a_memory_budget() -> TestResult {
    // Room for two boundaries of four: the planner must recompute and offload.
    let budget = 2 * probe_boundary_bytes()?;
    // offload-host budgets are for GPUs: on the CPU the engine refuses them (tests/offload.rs).
    let ckpt = CheckpointOptions {
        budget: Some(budget),
        ..CheckpointOptions::new(Mode::OffloadDisk)
    }
    .checkpointer()?;
    check_with(&ckpt)?;
    let plans = ckpt.budget_plans();
    let plan = plans.first().ok_or("a budget policy made no plan")?;
    assert!(plan.device_bytes <= budget, "{plan}");
    let offloaded = plan
        .placements
        .iter()
        .filter(|&&p| p == Placement::Disk)
        .count();
    assert!((1..4).contains(&offloaded), "{plan}");
    Ok(())
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
fn every_parameter_gets_a_nonzero_gradient_and_checkpointing_is_exact() -> TestResult {
    let loaded = loader::load(&fixture(), DType::F32, &Device::Cpu)?;
    let plain = grads(&loaded, Policy::none())?;
    for policy in [
        Policy::recompute(),
        Policy::recompute().segments(2),
        Policy::recompute().first(1),
        Policy::new(Mode::OffloadHost),
        Policy::new(Mode::OffloadHost).segments(2).keep_last(1),
        Policy::new(Mode::OffloadDisk),
        Policy::new(Mode::OffloadDisk).segments(3).first(3),
        Policy::new(Mode::OffloadDisk).keep_last(2),
        // A boundary here is 2 × 9 × 64 f32 = 4608 bytes; four layers.
        Policy::recompute().budget(4 * 4608),
        Policy::new(Mode::OffloadDisk).budget(2 * 4608),
        Policy::new(Mode::OffloadDisk).budget(0),
    ] {
        let recomputed = grads(&loaded, policy.clone())?;
        same_nonzero_grads(&loaded.params, &plain, &recomputed, &format!("{policy:?}"))?;
    }
    Ok(())
}

#[test]
fn policy_options_that_do_not_apply_are_refused() {
    let refused = |options: CheckpointOptions, word: &str| {
        let err = options.policy().err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains(word)),
            "{options:?}: {err:?}"
        );
    };
    let budget = Some(1 << 20);
    refused(
        CheckpointOptions {
            budget,
            ..CheckpointOptions::new(Mode::None)
        },
        "--budget-mib",
    );
    refused(
        CheckpointOptions {
            budget,
            segment: 2,
            ..CheckpointOptions::new(Mode::OffloadDisk)
        },
        "--segment",
    );
    refused(
        CheckpointOptions {
            keep_last: 1,
            ..CheckpointOptions::new(Mode::Recompute)
        },
        "--keep-last",
    );
    refused(
        CheckpointOptions {
            offload_dir: Some(std::env::temp_dir()),
            ..CheckpointOptions::new(Mode::OffloadHost)
        },
        "--offload-dir",
    );
    refused(
        CheckpointOptions {
            segment: 0,
            ..CheckpointOptions::new(Mode::Recompute)
        },
        "--segment 0",
    );
    refused(
        CheckpointOptions {
            prefetch: 0,
            ..CheckpointOptions::new(Mode::OffloadDisk)
        },
        "--prefetch 0",
    );
    for mode in Mode::ALL {
        assert!(CheckpointOptions::new(mode).policy().is_ok(), "{mode}");
    }
}

#[test]
fn a_short_training_run_lowers_the_loss() -> TestResult {
    let dev = Device::Cpu;
    let loaded = loader::load(&fixture(), DType::F32, &dev)?;
    let text = "It is a truth universally acknowledged. ".repeat(8);
    let mut data = Dataset::bytes(&text, 24, loaded.config.vocab_size, 7)?;
    let cfg = TrainConfig {
        steps: 8,
        batch: 2,
        lr: 1e-2,
        warmup: 1,
        ..TrainConfig::default()
    };
    let ckpt = Checkpointer::new(Policy::recompute());
    let summary = train(
        &loaded.model,
        &loaded.params,
        &mut data,
        &ckpt,
        &cfg,
        &dev,
        |_| Ok(()),
    )?;
    let (first, last) = (summary.losses[0], summary.losses[summary.losses.len() - 1]);
    assert!(last < first, "loss {first} -> {last}");
    assert_eq!(summary.stats.stacks, 8, "{}", summary.stats);
    Ok(())
}

#[test]
fn disk_offload_trains_exactly_like_the_plain_graph() -> TestResult {
    let dev = Device::Cpu;
    let text = "It is a truth universally acknowledged. ".repeat(8);
    let cfg = TrainConfig {
        steps: 3,
        batch: 2,
        lr: 1e-2,
        warmup: 1,
        ..TrainConfig::default()
    };
    let mut runs = Vec::new();
    for options in [
        CheckpointOptions::new(Mode::None),
        CheckpointOptions {
            prefetch: 1,
            ..CheckpointOptions::new(Mode::OffloadDisk)
        },
    ] {
        let loaded = loader::load(&fixture(), DType::F32, &dev)?;
        let mut data = Dataset::bytes(&text, 24, loaded.config.vocab_size, 7)?;
        let ckpt = options.checkpointer()?;
        let summary = train(
            &loaded.model,
            &loaded.params,
            &mut data,
            &ckpt,
            &cfg,
            &dev,
            |_| Ok(()),
        )?;
        runs.push(summary);
    }
    let (plain, disk) = (&runs[0], &runs[1]);
    assert_eq!(plain.losses, disk.losses, "losses, none vs offload-disk");
    assert_eq!(plain.stats.segments, 0, "{}", plain.stats);
    assert!(disk.stats.disk_bytes > 0, "{}", disk.stats);
    assert_eq!(
        disk.stats.prefetch_hits + disk.stats.prefetch_waits,
        3 * 4,
        "{}",
        disk.stats
    );
    Ok(())
}

#[test]
fn without_an_engine_the_model_runs_the_plain_calls() -> TestResult {
    let dev = Device::Cpu;
    let loaded = loader::load(&fixture(), DType::F32, &dev)?;
    let batch = collate(&[&[5, 17, 99, 3, 64], &[44, 1, 90]], &dev)?;
    let mask = Some(&batch.attention_mask);
    let plain = loaded.model.forward(&batch.input_ids, mask, None)?;
    for mode in Mode::ALL {
        let ckpt = Checkpointer::new(Policy::new(mode));
        let logits = loaded.model.forward(&batch.input_ids, mask, Some(&ckpt))?;
        assert_eq!(max_abs_diff(&plain, &logits)?, 0.0, "{mode}");
        assert_eq!(ckpt.take_stats().stacks, 1, "{mode}: one stack per forward");
        let _ = ckpt.backward(&logits.sum_all()?)?;
    }
    Ok(())
}

type Tensors = HashMap<String, Tensor>;

/// Runs `verify` against the fixture's reference after `alter` changed it.
fn verify_altered(
    alter: impl FnOnce(&mut Tensors) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<qwen2::Result<Report>, Box<dyn std::error::Error>> {
    let dir = fixture();
    let mut reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)?;
    alter(&mut reference)?;
    let scratch = TempDir::new("qwen2-reference")?;
    let file = scratch.path().join("reference.safetensors");
    candle_core::safetensors::save(&reference, &file)?;
    let ckpt = Checkpointer::new(Policy::recompute());
    Ok(verify(&dir, &file, &ckpt, &Device::Cpu))
}

/// A reference that disagrees fails the check and names the worst tensor.
#[test]
fn a_disagreeing_reference_fails_naming_the_worst_tensor() -> TestResult {
    let name = "grad.model.layers.2.mlp.down_proj.weight";
    let report = verify_altered(|reference| {
        let perturbed = (reference.get(name).ok_or("fixture lacks the gradient")? * 1.01)?;
        reference.insert(name.to_owned(), perturbed);
        let logits = (reference.get("logits").ok_or("fixture lacks logits")? * (1.0 + 1e-6))?;
        reference.insert("logits".to_owned(), logits);
        Ok(())
    })??;
    match report.ok() {
        Err(qwen2::Error::Verify {
            count,
            worst,
            rel_err,
            ..
        }) => {
            // The 1% gradient error is 100x its tolerance; the 1e-6 logits error is within.
            assert_eq!((count, worst.as_str()), (1, name), "{report}");
            assert!((rel_err - 0.01 / 1.01).abs() < 1e-4, "{rel_err}");
        }
        other => panic!("expected a verify failure, got {other:?}\n{report}"),
    }
    Ok(())
}

/// A reference gradient of the wrong shape is named, with both shapes.
#[test]
fn a_misshapen_reference_gradient_is_named() -> TestResult {
    let name = "grad.model.layers.0.self_attn.q_proj.bias";
    let result = verify_altered(|reference| {
        let grad = reference.get(name).ok_or("fixture lacks the gradient")?;
        let reshaped = grad.reshape((1, grad.elem_count()))?;
        reference.insert(name.to_owned(), reshaped);
        Ok(())
    })?;
    let err = result
        .err()
        .ok_or("a misshapen reference must fail")?
        .to_string();
    assert!(err.contains(name) && err.contains("[1, "), "{err}");
    Ok(())
}
