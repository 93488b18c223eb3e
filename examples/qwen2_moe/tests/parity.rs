//! Parity with the shared reference (`tests/fixtures/qwen2-moe-tiny`, made by Hugging Face
//! transformers) in every checkpoint mode: logits, load-balancing loss, total loss and every
//! gradient (the router's included: its logits leave the checkpointed layers as auxiliary
//! outputs), and exact equality of the checkpointed gradients with the plain graph's.

use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use checkpoint_runtime::{Checkpointer, DiskConfig, Mode, Placement, Policy};
use checkpoint_tests::compare::same_nonzero_grads;
use checkpoint_tests::temp::TempDir;
use qwen2::train::CheckpointOptions;
use qwen2::verify::{GRAD_TOLERANCE, OUTPUT_TOLERANCE};
use qwen2_moe::router_loss::total_loss;
use qwen2_moe::verify::verify;
use qwen2_moe::{Config, loader};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2-moe-tiny")
}

fn check_with(ckpt: &Checkpointer, label: &str) -> TestResult {
    let dir = fixture();
    let report = verify(&dir, &dir.join("reference.safetensors"), ckpt, &Device::Cpu)?;
    // logits, aux loss, loss; per layer 4 attention weights + 3 biases + 2 norms + router +
    // 4 experts × 3 + shared expert 3 + its gate = 26; embedding, final norm, untied head.
    assert_eq!(report.checks.len(), 3 + 2 * 26 + 3, "{report}");
    let err = |name: &str| {
        report
            .checks
            .iter()
            .find(|c| c.name == name)
            .map_or(f64::NAN, |c| c.rel_err)
    };
    let worst = report.worst_grad().ok_or("no gradient checked")?;
    println!(
        "{label}: logits {:.2e}, aux_loss {:.2e}, loss {:.2e}, worst gradient {:.2e} ({}), \
         router gradient layer 1 {:.2e}",
        err("logits"),
        err("aux_loss"),
        err("loss"),
        worst.rel_err,
        worst.name,
        err("grad.model.layers.1.mlp.gate.weight"),
    );
    for c in &report.checks {
        let tol = if c.name.starts_with("grad.") {
            GRAD_TOLERANCE
        } else {
            OUTPUT_TOLERANCE
        };
        assert!(
            c.rel_err <= tol,
            "{label}: {} off by {:.3e}\n{report}",
            c.name,
            c.rel_err
        );
    }
    report.ok()?;
    Ok(())
}

fn check_mode(policy: Policy, label: &str) -> TestResult {
    check_with(&Checkpointer::new(policy), label)
}

#[test]
fn matches_transformers_without_checkpointing() -> TestResult {
    check_mode(Policy::none(), "none")
}

#[test]
fn matches_transformers_with_recompute() -> TestResult {
    check_mode(Policy::recompute(), "recompute")
}

#[test]
fn matches_transformers_with_recompute_in_segments_of_two() -> TestResult {
    check_mode(Policy::recompute().segments(2), "recompute, segments of 2")
}

#[test]
fn matches_transformers_with_host_offload() -> TestResult {
    check_mode(Policy::new(Mode::OffloadHost), "offload-host")
}

#[test]
fn matches_transformers_with_disk_offload() -> TestResult {
    let root = TempDir::new("qwen2-moe-disk-parity")?;
    let ckpt = Checkpointer::with_disk(
        Policy::new(Mode::OffloadDisk),
        DiskConfig {
            root: root.path().to_owned(),
            prefetch: 1,
            write_queue: 1,
        },
    );
    check_with(&ckpt, "offload-disk")?;
    let stats = ckpt.take_stats();
    assert!(stats.disk_bytes > 0, "{stats}");
    Ok(())
}

#[test]
fn matches_transformers_with_a_memory_budget() -> TestResult {
    // A probe that keeps everything measures the boundaries ...
    let probe = Checkpointer::new(Policy::recompute().budget(u64::MAX));
    check_with(&probe, "recompute, unlimited budget")?;
    let plans = probe.budget_plans();
    let plan = plans.first().ok_or("a budget policy made no plan")?;
    assert!(
        plan.placements.iter().all(|&p| p == Placement::Graph),
        "{plan}"
    );
    // ... then room for one boundary of the two: the planner must offload.
    let budget = plan.costs[0].boundary_bytes;
    let ckpt = CheckpointOptions {
        budget: Some(budget),
        ..CheckpointOptions::new(Mode::OffloadDisk)
    }
    .checkpointer()?;
    check_with(&ckpt, "offload-disk, budget of one boundary")?;
    let plans = ckpt.budget_plans();
    let plan = plans.first().ok_or("a budget policy made no plan")?;
    assert!(plan.device_bytes <= budget, "{plan}");
    assert!(
        plan.placements.contains(&Placement::Disk),
        "nothing offloaded: {plan}"
    );
    Ok(())
}

/// Gradients of every parameter, the total loss's, for one padded batch through `ckpt`.
fn grads(
    loaded: &qwen2::loader::Loaded<qwen2_moe::Qwen2Moe>,
    ckpt: &Checkpointer,
) -> Result<GradStore, Box<dyn std::error::Error>> {
    let batch = qwen2::data::collate(
        &[&[5, 17, 90, 3, 64, 2, 8, 12, 7], &[44, 1, 90, 12, 33]],
        &Device::Cpu,
    )?;
    let mask = Some(&batch.attention_mask);
    let out = loaded.model.forward(&batch.input_ids, mask, Some(ckpt))?;
    let (loss, _, _) = total_loss(
        &out.logits,
        &batch.labels,
        &out.router_logits,
        loaded.model.config(),
        mask,
    )?;
    Ok(ckpt.backward(&loss)?)
}

#[test]
fn every_parameter_gets_a_nonzero_gradient_and_checkpointing_is_exact() -> TestResult {
    let loaded = loader::load(&fixture(), DType::F32, &Device::Cpu)?;
    let plain = grads(&loaded, &Checkpointer::new(Policy::none()))?;
    for policy in [
        Policy::recompute(),
        Policy::recompute().segments(2),
        Policy::recompute().first(1),
        Policy::new(Mode::OffloadHost),
        Policy::new(Mode::OffloadDisk),
        Policy::new(Mode::OffloadDisk).keep_last(1),
        Policy::new(Mode::OffloadDisk).budget(0),
    ] {
        let label = format!("{policy:?}");
        let other = grads(&loaded, &Checkpointer::new(policy))?;
        same_nonzero_grads(&loaded.params, &plain, &other, &label)?;
    }
    Ok(())
}

/// A stack mixing dense and sparse layers (`decoder_sparse_step`, `mlp_only_layers`): the dense
/// layers' empty router logits travel through the engine too, and the gradients stay exact.
#[test]
fn a_mixed_dense_and_sparse_stack_checkpoints_exactly() -> TestResult {
    let mut cfg = Config::tiny_bytes();
    cfg.base.num_hidden_layers = 4;
    cfg.decoder_sparse_step = 2;
    let dev = Device::Cpu;
    let loaded = loader::random(&cfg, 5, DType::F32, &dev)?;
    let plain = grads(&loaded, &Checkpointer::new(Policy::none()))?;
    for policy in [Policy::recompute(), Policy::new(Mode::OffloadDisk)] {
        let ckpt = Checkpointer::new(policy.clone());
        let ids = Tensor::new(&[[1u32, 2, 3, 4, 5]], &dev)?;
        let out = loaded.model.forward(&ids, None, Some(&ckpt))?;
        assert_eq!(out.router_logits.len(), 2, "two sparse layers of four");
        let _ = ckpt.backward(&out.logits.sum_all()?)?;
        let other = grads(&loaded, &Checkpointer::new(policy.clone()))?;
        same_nonzero_grads(&loaded.params, &plain, &other, &format!("{policy:?}"))?;
    }
    Ok(())
}
