//! The training loop: gradient accumulation, save and resume of the training state, the saved
//! checkpoint's dtype and tokenizer files, and the loss curve.

use std::collections::BTreeMap;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use checkpoint_runtime::{Checkpointer, Policy};
use checkpoint_tests::compare::max_abs_diff;
use checkpoint_tests::temp::TempDir;
use qwen2::data::{BUNDLED_TEXT, Dataset};
use qwen2::train::{Summary, TrainConfig, train, train_resumable};
use qwen2::{Config, Error, loader, save, state};

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

/// Steps `0..stop` of a `steps`-step run, then a training-state save into `dir` (the run is
/// stopped there); the losses of those steps.
fn run_until_saved(
    dtype: DType,
    steps: usize,
    stop: usize,
    dir: &std::path::Path,
) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let config = Config::tiny_bytes();
    let model = loader::random(&config, SEED, dtype, &dev)?;
    let mut data = Dataset::bytes(BUNDLED_TEXT, SEQ, config.vocab_size, SEED)?;
    let ckpt = Checkpointer::new(Policy::recompute());
    let mut losses = Vec::new();
    let stopped = train_resumable(
        &model.model,
        &model.params,
        &mut data,
        &ckpt,
        &run_cfg(steps, 2, 1),
        &dev,
        None,
        |view| {
            if view.done < stop {
                return Ok(());
            }
            losses = view.losses.to_vec();
            state::save(
                dir,
                &view.meta(SEED, BTreeMap::new()),
                view.opt,
                &model.params,
            )?;
            Err(Error::Data("stopped after the save".into()))
        },
    );
    assert!(matches!(stopped, Err(Error::Data(m)) if m.contains("stopped")));
    Ok(losses)
}

#[test]
fn a_resumed_run_is_the_unbroken_run() -> TestResult {
    for dtype in [DType::F32, DType::BF16] {
        let tmp = TempDir::new("qwen2-resume")?;
        let dev = Device::Cpu;
        let config = Config::tiny_bytes();
        let cfg = run_cfg(4, 2, 1);

        let whole = loader::random(&config, SEED, dtype, &dev)?;
        let mut data = Dataset::bytes(BUNDLED_TEXT, SEQ, config.vocab_size, SEED)?;
        let ckpt = Checkpointer::new(Policy::recompute());
        let unbroken = train(
            &whole.model,
            &whole.params,
            &mut data,
            &ckpt,
            &cfg,
            &dev,
            |_| Ok(()),
        )?;

        let first = run_until_saved(dtype, 4, 2, tmp.path())?;
        // Another initialisation and a fresh sampler: everything must come from the state.
        let model = loader::random(&config, SEED + 1, dtype, &dev)?;
        let mut data = Dataset::bytes(BUNDLED_TEXT, SEQ, config.vocab_size, SEED)?;
        let saved = state::load(tmp.path())?;
        assert_eq!(saved.meta.step, 2);
        assert_eq!(saved.meta.losses, first);
        let mut seen = Vec::new();
        let rest = train_resumable(
            &model.model,
            &model.params,
            &mut data,
            &ckpt,
            &cfg,
            &dev,
            Some(&saved),
            |view| {
                seen.push(view.done);
                Ok(())
            },
        )?;
        assert_eq!(seen, [3, 4], "{dtype:?}: the resumed run's steps");
        let resumed: Vec<f32> = first.iter().chain(&rest.losses).copied().collect();
        // Bit-equal on the CPU: the same operations on the same values.
        assert_eq!(resumed, unbroken.losses, "{dtype:?}: losses");
        for ((name, a), (_, b)) in whole.params.iter().zip(&model.params) {
            let diff = max_abs_diff(a.as_tensor(), b.as_tensor())?;
            assert!(
                diff == 0.0,
                "{dtype:?} {name}: final weights differ by {diff}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_resume_with_other_arguments_names_them() -> TestResult {
    let tmp = TempDir::new("qwen2-resume-args")?;
    run_until_saved(DType::F32, 4, 1, tmp.path())?;
    let saved = state::load(tmp.path())?;
    let mut args = saved.meta.args.clone();
    saved.check_args(tmp.path(), &args)?;
    args.insert("--lr".into(), "0.1".into());
    let err = saved
        .check_args(tmp.path(), &args)
        .expect_err("another --lr");
    let msg = err.to_string();
    assert!(
        msg.contains("--lr: saved (not given), now 0.1") && msg.contains("without --resume"),
        "{msg}"
    );
    // A state whose step is past --steps.
    let dev = Device::Cpu;
    let config = Config::tiny_bytes();
    let model = loader::random(&config, SEED, DType::F32, &dev)?;
    let mut data = Dataset::bytes(BUNDLED_TEXT, SEQ, config.vocab_size, SEED)?;
    let ckpt = Checkpointer::new(Policy::recompute());
    let err = train_resumable(
        &model.model,
        &model.params,
        &mut data,
        &ckpt,
        &run_cfg(0, 2, 1),
        &dev,
        Some(&saved),
        |_| Ok(()),
    )
    .expect_err("a state past --steps");
    assert!(err.to_string().contains("past --steps 0"), "{err}");
    Ok(())
}

/// The CLI end to end on a bf16 checkpoint with a tokenizer, trained in f32: the saved model is
/// bf16 (trained weights), the tokenizer files are copied, the training state and the loss
/// curve are written, and a resume with another --lr is refused, naming it.
#[test]
fn the_cli_saves_in_the_checkpoints_dtype_with_its_tokenizer_and_a_loss_curve() -> TestResult {
    let tmp = TempDir::new("qwen2-save-dtype")?;
    let fixture = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/qwen2-lora-tiny");
    let ckpt_dir = tmp.path().join("bf16");
    let source = loader::load(&fixture, DType::F32, &Device::Cpu)?;
    save::save_as(&ckpt_dir, &source.config, &source.varmap, Some(DType::BF16))?;
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(name), ckpt_dir.join(name))?;
    }
    let out_dir = tmp.path().join("out");
    let arg = |p: &std::path::Path| p.to_str().map(str::to_owned).ok_or("path is not UTF-8");
    let (ckpt_arg, out_arg) = (arg(&ckpt_dir)?, arg(&out_dir)?);
    let cli = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qwen2"))
            .args([
                "train", "--model", &ckpt_arg, "--dtype", "f32", "--steps", "3",
            ])
            .args(["--batch", "2", "--seq-len", "32", "--eval-fraction", "0.2"])
            .args(extra)
            .output()
    };
    let out = cli(&["--save", &out_arg])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let saved = candle_core::safetensors::load(out_dir.join("model.safetensors"), &Device::Cpu)?;
    assert!(!saved.is_empty());
    for (name, t) in &saved {
        assert_eq!(t.dtype(), DType::BF16, "{name}");
    }
    let before = loader::load(&ckpt_dir, DType::F32, &Device::Cpu)?;
    let after = loader::load(&out_dir, DType::F32, &Device::Cpu)?;
    let moved = max_abs_diff(
        before.params[0].1.as_tensor(),
        after.params[0].1.as_tensor(),
    )?;
    assert!(moved > 0.0, "the saved weights are the untrained ones");
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(out_dir.join(name))?,
            std::fs::read(ckpt_dir.join(name))?,
            "{name}"
        );
    }
    for name in [state::TENSORS, state::META] {
        assert!(out_dir.join(name).is_file(), "{name} missing");
    }
    let svg = std::fs::read_to_string(out_dir.join(qwen2::plot::FILE))?;
    assert!(
        svg.trim_start().starts_with("<svg"),
        "not an SVG: {}",
        &svg[..svg.len().min(80)]
    );
    // The train curve (blue) through the 3 steps' losses, the eval one (red), and the legend.
    let curve_points = |stroke: &str| {
        svg.lines()
            .filter(|l| l.starts_with("<polyline") && l.contains(stroke))
            .filter_map(|l| l.split("points=\"").nth(1)?.split('"').next())
            .map(|points| points.split_whitespace().count())
            .max()
    };
    assert_eq!(
        curve_points("stroke=\"#0000FF\""),
        Some(3),
        "no train curve in {svg}"
    );
    assert!(
        curve_points("stroke=\"#FF0000\"").is_some(),
        "no eval curve in {svg}"
    );
    assert!(
        svg.contains("\ntrain\n") && svg.contains("\neval\n"),
        "no legend in {svg}"
    );

    let out = cli(&["--resume", &out_arg, "--lr", "1e-4"])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--lr: saved 0.003, now 0.0001"), "{stderr}");
    Ok(())
}

#[test]
fn accumulate_zero_is_refused() {
    let err = run(&run_cfg(1, 2, 0)).expect_err("--accumulate 0");
    assert!(err.to_string().contains("--accumulate 0"), "{err}");
}
