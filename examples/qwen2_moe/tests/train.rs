//! Training the fixture checkpoint lowers its loss; the random-init model trains too, on byte
//! ids or on a real tokenizer's; the CLI asks for `--bytes` where a checkpoint has no tokenizer.

use std::path::PathBuf;

use candle_core::{DType, Device};
use checkpoint_runtime::{Checkpointer, Policy};
use qwen2::data::{self, BUNDLED_TEXT, DataOptions, Dataset};
use qwen2::loader::Loaded;
use qwen2::tokenizer::Tokenizer;
use qwen2::train::TrainConfig;
use qwen2_moe::train::Summary;
use qwen2_moe::{Config, Qwen2Moe, loader, train};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2-moe-tiny")
}

/// Eight steps of `loaded` on `data` through an engine with `policy`.
fn short_run(
    loaded: &Loaded<Qwen2Moe>,
    data: &mut Dataset,
    policy: Policy,
) -> qwen2::Result<Summary> {
    let cfg = TrainConfig {
        steps: 8,
        batch: 4,
        lr: 3e-3,
        warmup: 1,
        ..TrainConfig::default()
    };
    let ckpt = Checkpointer::new(policy);
    train::train(
        &loaded.model,
        &loaded.params,
        data,
        &ckpt,
        &cfg,
        &Device::Cpu,
    )
}

#[test]
fn a_short_training_run_on_the_fixture_lowers_the_loss() -> TestResult {
    let dev = Device::Cpu;
    let loaded = loader::load(&fixture(), DType::F32, &dev)?;
    let vocab = loaded.model.config().base.vocab_size;
    let mut data = train::folded_bytes(BUNDLED_TEXT, 32, vocab, 7)?;
    // Through the engine: the router logits come out of recomputed layers.
    let summary = short_run(&loaded, &mut data, Policy::recompute())?;
    let (first, last) = (summary.losses[0], summary.losses[summary.losses.len() - 1]);
    assert!(last < first - 0.1, "loss {first} -> {last}");
    assert_eq!(
        summary.stats.stacks, 8,
        "one engine stack per step: {}",
        summary.stats
    );
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
    let summary = short_run(&loaded, &mut data, Policy::none())?;
    let (first, last) = (summary.losses[0], summary.losses[summary.losses.len() - 1]);
    assert!(last < first, "loss {first} -> {last}");
    Ok(())
}

#[test]
fn a_model_trains_on_a_real_tokenizers_ids() -> TestResult {
    // The Qwen2 LoRA fixture's tokenizer (384 ids): no MoE checkpoint here comes with one.
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2-lora-tiny");
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let dev = Device::Cpu;
    let mut cfg = Config::tiny_bytes();
    cfg.base.vocab_size = 384;
    tokenizer.check_vocab(cfg.base.vocab_size)?;
    let examples = data::text_examples(BUNDLED_TEXT, &tokenizer, 32)?;
    // Real tokens, not bytes: fewer ids than the text has bytes, some beyond the byte range.
    let ids: usize = examples.iter().map(|e| e.ids.len()).sum();
    assert!(
        ids < BUNDLED_TEXT.len(),
        "{ids} ids for {} bytes",
        BUNDLED_TEXT.len()
    );
    assert!(examples.iter().flat_map(|e| &e.ids).any(|&id| id >= 256));
    let options = DataOptions::rows(32, cfg.base.vocab_size, 7);
    let mut data = Dataset::new(examples, &options)?;
    let loaded = loader::random(&cfg, 3, DType::F32, &dev)?;
    let summary = short_run(&loaded, &mut data, Policy::recompute())?;
    let (first, last) = (summary.losses[0], summary.losses[summary.losses.len() - 1]);
    assert!(last < first, "loss {first} -> {last}");
    Ok(())
}

#[test]
fn folding_maps_bytes_into_a_small_vocabulary_and_keeps_ignored_labels() -> TestResult {
    let mut examples = vec![data::Example {
        ids: vec![0, 95, 96, 200, 255],
        labels: vec![-100, 95, 96, 200, 255],
    }];
    train::fold_bytes(&mut examples, 96)?;
    assert_eq!(examples[0].ids, [0, 95, 0, 8, 63]);
    assert_eq!(examples[0].labels, [-100, 95, 0, 8, 63]);
    assert!(train::fold_bytes(&mut examples, 0).is_err());
    Ok(())
}

/// The `loss A -> B` line of a `qwen2-moe train` run.
fn first_and_last_loss(stdout: &str) -> Option<(f32, f32)> {
    let line = stdout.lines().find(|l| l.starts_with("loss "))?;
    let mut words = line.split_whitespace();
    let first = words.nth(1)?.parse().ok()?;
    let last = words.nth(1)?.parse().ok()?;
    Some((first, last))
}

#[test]
fn the_cli_trains_the_fixture_and_verifies_it() -> TestResult {
    let bin = env!("CARGO_BIN_EXE_qwen2-moe");
    let dir = fixture();
    let dir = dir.to_str().ok_or("fixture path is not UTF-8")?;
    // The fixture has no tokenizer.json: its ids are nobody's, so bytes must be asked for.
    let out = std::process::Command::new(bin)
        .args(["train", "--model", dir, "--steps", "1"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("tokenizer.json"), "{stderr}");
    assert!(stderr.contains("--bytes"), "{stderr}");

    let out = std::process::Command::new(bin)
        .args([
            "train", "--model", dir, "--bytes", "--steps", "8", "--batch", "4",
        ])
        .args(["--seq-len", "32", "--warmup", "1", "--segment", "2"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("folded into the model's 96-token vocabulary"),
        "{stderr}"
    );
    let (first, last) = first_and_last_loss(&stdout).ok_or(format!("no loss line:\n{stdout}"))?;
    assert!(last < first - 0.1, "loss {first} -> {last}");

    let out = std::process::Command::new(bin)
        .args(["verify", "--model", dir])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("every mode within tolerance"), "{stdout}");
    // none, recompute, segments of 2, offload-host, offload-disk, a disk budget
    let modes = stdout.lines().filter(|l| l.ends_with(": ok")).count();
    assert_eq!(modes, 6, "{stdout}");
    Ok(())
}
