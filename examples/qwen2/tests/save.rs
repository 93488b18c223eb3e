//! Saving a trained model: the checkpoint loads back exactly, in the loader's own format, and a
//! `--save` directory that cannot be written is named before any training starts.

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use checkpoint_runtime::{Checkpointer, Policy};
use checkpoint_tests::compare::max_abs_diff;
use checkpoint_tests::temp::TempDir;
use qwen2::data::{BUNDLED_TEXT, Dataset};
use qwen2::train::{TrainConfig, train};
use qwen2::{Config, Error, loader, save};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn untied() -> Config {
    Config {
        tie_word_embeddings: false,
        rope_theta: 1_000_000.0,
        ..Config::tiny_bytes()
    }
}

#[test]
fn config_json_reads_back_as_the_same_config() -> TestResult {
    for cfg in [Config::tiny_bytes(), untied()] {
        assert_eq!(Config::from_json(&cfg.to_json())?, cfg);
    }
    Ok(())
}

#[test]
fn a_saved_model_loads_back_exactly() -> TestResult {
    for cfg in [Config::tiny_bytes(), untied()] {
        let tmp = TempDir::new("qwen2-save")?;
        let model = loader::random(&cfg, 7, DType::F32, &Device::Cpu)?;
        // Stand in for training: move every weight away from its initialisation.
        for (_, var) in &model.params {
            var.set(&(var.as_tensor() * 0.5)?.affine(1.0, 0.25)?)?;
        }
        save::save(tmp.path(), &cfg, &model.varmap)?;
        // Saving again replaces the checkpoint and leaves no partial file behind.
        save::save(tmp.path(), &cfg, &model.varmap)?;
        let mut files: Vec<String> = std::fs::read_dir(tmp.path())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        files.sort();
        assert_eq!(files, save::FILES);

        let back = loader::load(tmp.path(), DType::F32, &Device::Cpu)?;
        assert_eq!(back.config, cfg);
        assert!(back.unused.is_empty(), "unused tensors: {:?}", back.unused);
        assert_eq!(back.params.len(), model.params.len());
        for ((name, saved), (name_back, loaded)) in model.params.iter().zip(&back.params) {
            assert_eq!(name, name_back);
            let diff = max_abs_diff(saved.as_tensor(), loaded.as_tensor())?;
            assert!(
                diff == 0.0,
                "{name}: differs by {diff} after a save and a load"
            );
        }
    }
    Ok(())
}

/// A run that stops after a periodic save keeps exactly the weights of that step.
#[test]
fn a_run_that_stops_keeps_its_last_periodic_save() -> TestResult {
    let tmp = TempDir::new("qwen2-save-periodic")?;
    let cfg = Config::tiny_bytes();
    let dev = Device::Cpu;
    let model = loader::random(&cfg, 3, DType::F32, &dev)?;
    let mut data = Dataset::bytes(BUNDLED_TEXT, 32, cfg.vocab_size, 3)?;
    let run = TrainConfig {
        steps: 4,
        batch: 2,
        ..TrainConfig::default()
    };
    let mut at_save: Vec<Tensor> = Vec::new();
    let stopped = train(
        &model.model,
        &model.params,
        &mut data,
        &Checkpointer::new(Policy::recompute()),
        &run,
        &dev,
        |done| match done {
            2 => {
                at_save = model
                    .params
                    .iter()
                    .map(|(_, v)| v.as_tensor().copy())
                    .collect::<candle_core::Result<_>>()?;
                save::save(tmp.path(), &cfg, &model.varmap)
            }
            3 => Err(Error::Data("stopped at step 3".into())),
            _ => Ok(()),
        },
    );
    assert!(matches!(stopped, Err(Error::Data(m)) if m.contains("step 3")));
    let back = loader::load(tmp.path(), DType::F32, &dev)?;
    assert_eq!(at_save.len(), back.params.len());
    for ((name, loaded), saved) in back.params.iter().zip(&at_save) {
        let diff = max_abs_diff(saved, loaded.as_tensor())?;
        assert!(
            diff == 0.0,
            "{name}: the checkpoint differs from step 2 by {diff}"
        );
    }
    // The run went on past the save: the model's weights moved again at step 3.
    let moved = max_abs_diff(&at_save[0], model.params[0].1.as_tensor())?;
    assert!(moved > 0.0);
    Ok(())
}

#[test]
fn an_unwritable_save_directory_is_named() -> TestResult {
    let tmp = TempDir::new("qwen2-save-bad")?;
    // A path under a regular file cannot be a directory, even for root.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"")?;
    let dir = file.join("checkpoint");
    let err = save::prepare(&dir).expect_err("a directory under a file");
    assert!(
        matches!(&err, Error::Write { path, .. } if path == &dir),
        "{err}"
    );
    assert!(err.to_string().contains("--save"), "{err}");
    Ok(())
}

/// The CLI end to end: `train --save DIR` writes a checkpoint of the trained weights, which
/// `train --model DIR --bytes` trains further; a bad `--save` fails before training.
#[test]
fn the_cli_saves_what_it_trained() -> TestResult {
    let tmp = TempDir::new("qwen2-save-cli")?;
    let dir = tmp.path().join("trained");
    let cli = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qwen2"))
            .args(["train", "--steps", "2", "--batch", "2", "--seq-len", "32"])
            .args(extra)
            .output()
    };
    let dir_arg = dir.to_str().ok_or("temp path is not UTF-8")?;
    let out = cli(&["--save", dir_arg])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("saved config.json and model.safetensors")
    );

    let init = loader::random(&Config::tiny_bytes(), 1234, DType::F32, &Device::Cpu)?;
    let trained = loader::load(&dir, DType::F32, &Device::Cpu)?;
    assert_eq!(trained.config, Config::tiny_bytes());
    let moved = init
        .params
        .iter()
        .zip(&trained.params)
        .map(|((_, a), (_, b))| max_abs_diff(a.as_tensor(), b.as_tensor()))
        .collect::<candle_core::Result<Vec<f64>>>()?;
    assert!(
        moved.iter().all(|&d| d > 0.0),
        "untrained tensors were saved: {moved:?}"
    );

    // A byte-level model has no tokenizer.json: --bytes says its ids are bytes.
    let out = cli(&["--model", dir_arg])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bytes"));
    let out = cli(&["--model", dir_arg, "--bytes"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let blocked = tmp.path().join("a-file");
    std::fs::write(&blocked, b"")?;
    let bad = blocked.join("out");
    let out = cli(&["--save", bad.to_str().ok_or("temp path is not UTF-8")?])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Refused before the first step: no progress line was printed.
    assert!(
        stderr.contains("cannot write") && !stderr.contains("] step"),
        "{stderr}"
    );
    Ok(())
}
