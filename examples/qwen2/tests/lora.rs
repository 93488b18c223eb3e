//! LoRA parity with PEFT (`tests/fixtures/qwen2-lora-tiny`, made by transformers + peft): logits,
//! loss and every LoRA gradient in every checkpoint mode, the frozen base getting no gradient;
//! PEFT adapter save → load round trip, `merge` = base + B·A·alpha/r, and the errors.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use checkpoint_runtime::{Checkpointer, DiskConfig, Mode, Placement, Policy};
use checkpoint_tests::compare::{max_abs_diff, same_nonzero_grads};
use checkpoint_tests::temp::TempDir;
use qwen2::adapter::{self, PEFT_PREFIX};
use qwen2::data::Dataset;
use qwen2::loader::{self, Loaded, LoraInit};
use qwen2::lora::{LoraConfig, Target};
use qwen2::loss::causal_lm_loss;
use qwen2::train::{CheckpointOptions, TrainConfig, train};
use qwen2::verify::{GRAD_TOLERANCE, OUTPUT_TOLERANCE, rel_err};

type TestResult = Result<(), Box<dyn std::error::Error>>;
type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2-lora-tiny")
}

/// The fixture's base with its PEFT adapter.
fn with_adapter() -> AnyResult<Loaded> {
    let adapter = adapter::load(&fixture().join("adapter"))?;
    Ok(loader::load_lora(
        &fixture(),
        &adapter.config,
        adapter.init(),
        DType::F32,
        &Device::Cpu,
    )?)
}

fn reference() -> AnyResult<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixture().join("reference.safetensors"),
        &Device::Cpu,
    )?)
}

/// Logits, loss and gradients of the reference batch through `ckpt`.
fn run(loaded: &Loaded, ckpt: &Checkpointer) -> AnyResult<(Tensor, Tensor, GradStore)> {
    let refs = reference()?;
    let get = |k: &str| refs.get(k).ok_or(format!("reference lacks `{k}`"));
    let input_ids = get("input_ids")?.to_dtype(DType::U32)?;
    let logits = loaded
        .model
        .forward(&input_ids, Some(get("attention_mask")?), Some(ckpt))?;
    let loss = causal_lm_loss(&logits, get("labels")?)?;
    let grads = ckpt.backward(&loss)?;
    Ok((logits, loss, grads))
}

/// Checks one engine against PEFT; returns (logits, loss, worst gradient) relative errors.
fn check_with(label: &str, ckpt: &Checkpointer) -> AnyResult<(f64, f64, f64)> {
    let loaded = with_adapter()?;
    let refs = reference()?;
    let (logits, loss, grads) = run(&loaded, ckpt)?;
    let get = |k: &str| refs.get(k).ok_or(format!("reference lacks `{k}`"));
    let logits_err = rel_err(&logits, get("logits")?)?;
    let loss_err = rel_err(&loss.reshape(1)?, get("loss")?)?;
    assert!(
        logits_err <= OUTPUT_TOLERANCE,
        "{label}: logits {logits_err:.3e}"
    );
    assert!(loss_err <= OUTPUT_TOLERANCE, "{label}: loss {loss_err:.3e}");

    // Only the 3 layers × {q, v} × {A, B} matrices are trainable, and each matches PEFT's.
    assert_eq!(loaded.params.len(), 12, "{label}: {loaded:?}");
    let mut worst: f64 = 0.0;
    for (name, var) in &loaded.params {
        // PEFT's in-memory name carries the adapter name: `lora_A.default.weight`.
        let peft = name
            .replace(".lora_A.weight", ".lora_A.default.weight")
            .replace(".lora_B.weight", ".lora_B.default.weight");
        let key = format!("grad.{PEFT_PREFIX}{peft}");
        let ours = grads
            .get(var.as_tensor())
            .ok_or(format!("{label}: no gradient for {name}"))?;
        let err = rel_err(ours, get(&key)?)?;
        assert!(err <= GRAD_TOLERANCE, "{label}: {key} off by {err:.3e}");
        worst = worst.max(err);
    }
    let grad_count = refs.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(grad_count, loaded.params.len(), "{label}: PEFT's gradients");

    // The frozen base: the model reads its weights as constants, so none gets a gradient.
    let base = loaded.varmap.all_vars();
    assert!(base.len() > 30, "{label}: {} base tensors", base.len());
    for var in &base {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "{label}: a base weight got a gradient"
        );
    }
    println!(
        "lora parity, {label:<40} logits {logits_err:.2e}  loss {loss_err:.2e}  \
         worst LoRA grad {worst:.2e}"
    );
    Ok((logits_err, loss_err, worst))
}

#[test]
fn matches_peft_in_every_checkpoint_mode() -> TestResult {
    let disk = TempDir::new("qwen2-lora-disk")?;
    let disk_config = || DiskConfig {
        root: disk.path().to_owned(),
        prefetch: 1,
        write_queue: 1,
    };
    // A boundary is 2 × 14 × 64 f32 = 7168 bytes, three layers: recompute needs every layer's
    // input (3 boundaries) and nothing more; offload-disk can do with 1 on the device.
    let boundary = 2 * 14 * 64 * 4;
    let engines: Vec<(&str, Checkpointer)> = vec![
        ("none", Checkpointer::new(Policy::none())),
        ("recompute", Checkpointer::new(Policy::recompute())),
        (
            "recompute, segments(2)",
            Checkpointer::new(Policy::recompute().segments(2)),
        ),
        (
            "recompute, budget 3 boundaries",
            Checkpointer::new(Policy::recompute().budget(3 * boundary)),
        ),
        (
            "offload-host",
            Checkpointer::new(Policy::new(Mode::OffloadHost)),
        ),
        (
            "offload-disk",
            Checkpointer::with_disk(Policy::new(Mode::OffloadDisk), disk_config()),
        ),
        (
            "offload-disk, segments(2) keep_last(1)",
            Checkpointer::with_disk(
                Policy::new(Mode::OffloadDisk).segments(2).keep_last(1),
                disk_config(),
            ),
        ),
        (
            "offload-disk, budget 1 boundary",
            CheckpointOptions {
                budget: Some(boundary),
                offload_dir: Some(disk.path().to_owned()),
                ..CheckpointOptions::new(Mode::OffloadDisk)
            }
            .checkpointer()?,
        ),
    ];
    for (label, ckpt) in &engines {
        check_with(label, ckpt)?;
        let stats = ckpt.take_stats();
        assert_eq!(stats.stacks, 1, "{label}: {stats}");
        if label.starts_with("offload-disk") {
            assert!(stats.disk_bytes > 0, "{label}: {stats}");
        }
        if label.contains("budget") {
            let plans = ckpt.budget_plans();
            let plan = plans.first().ok_or("a budget policy made no plan")?;
            assert!(
                plan.placements.iter().any(|&p| p != Placement::Graph),
                "{label}: the budget kept every graph\n{plan}"
            );
        }
    }
    Ok(())
}

/// Recomputed and offloaded LoRA gradients equal the plain graph's bit for bit.
#[test]
fn checkpointing_gives_the_plain_graphs_lora_gradients_exactly() -> TestResult {
    let loaded = with_adapter()?;
    let (_, _, plain) = run(&loaded, &Checkpointer::new(Policy::none()))?;
    for policy in [
        Policy::recompute(),
        Policy::recompute().segments(3),
        Policy::new(Mode::OffloadHost),
        Policy::new(Mode::OffloadDisk).keep_last(1),
    ] {
        let (_, _, ours) = run(&loaded, &Checkpointer::new(policy.clone()))?;
        same_nonzero_grads(&loaded.params, &plain, &ours, &format!("{policy:?}"))?;
    }
    Ok(())
}

fn q_v(r: usize, alpha: f64, seed: u64) -> AnyResult<LoraConfig> {
    Ok(LoraConfig::new(
        r,
        alpha,
        vec![Target::VProj, Target::QProj],
        seed,
    )?)
}

/// A fresh adapter is PEFT's initialisation: A uniform in ±1/√in from the seed, B zero, so the
/// model starts exactly at the base.
#[test]
fn a_fresh_adapter_starts_at_the_base_model() -> TestResult {
    let dev = Device::Cpu;
    let lora = q_v(4, 8.0, 7)?;
    let fresh = loader::load_lora(&fixture(), &lora, LoraInit::Fresh, DType::F32, &dev)?;
    let again = loader::load_lora(&fixture(), &lora, LoraInit::Fresh, DType::F32, &dev)?;
    let other = loader::load_lora(
        &fixture(),
        &q_v(4, 8.0, 8)?,
        LoraInit::Fresh,
        DType::F32,
        &dev,
    )?;
    let bound = 1.0 / 64f32.sqrt();
    for (((name, var), (_, same)), (_, different)) in
        fresh.params.iter().zip(&again.params).zip(&other.params)
    {
        let t = var.as_tensor();
        let max = t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        if name.contains("lora_B") {
            assert_eq!(max, 0.0, "{name}");
        } else {
            assert!(max > 0.5 * bound && max <= bound, "{name}: max |A| {max}");
            assert_eq!(max_abs_diff(t, same.as_tensor())?, 0.0, "{name}: same seed");
            assert!(
                max_abs_diff(t, different.as_tensor())? > 0.0,
                "{name}: seeds"
            );
        }
    }
    let plain = loader::load(&fixture(), DType::F32, &dev)?;
    let ids = Tensor::new(&[[5u32, 17, 99, 3, 64, 2]], &dev)?;
    let base = plain.model.forward(&ids, None, None)?;
    let adapted = fresh.model.forward(&ids, None, None)?;
    assert_eq!(max_abs_diff(&base, &adapted)?, 0.0);
    Ok(())
}

/// Training with LoRA moves A and B and leaves every base weight as it was.
#[test]
fn training_updates_only_the_adapter() -> TestResult {
    let dev = Device::Cpu;
    let lora = LoraConfig::new(2, 4.0, Target::ALL.to_vec(), 3)?;
    let loaded = loader::load_lora(&fixture(), &lora, LoraInit::Fresh, DType::F32, &dev)?;
    assert_eq!(loaded.params.len(), 3 * 7 * 2);
    let before: Vec<Tensor> = loaded
        .varmap
        .all_vars()
        .iter()
        .map(|v| v.as_tensor().copy())
        .collect::<candle_core::Result<_>>()?;
    let lora_before: Vec<Tensor> = loaded
        .params
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<candle_core::Result<_>>()?;
    let text = "It is a truth universally acknowledged. ".repeat(8);
    let mut data = Dataset::bytes(&text, 24, loaded.config.vocab_size, 7)?;
    let cfg = TrainConfig {
        steps: 4,
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
    for (var, old) in loaded.varmap.all_vars().iter().zip(&before) {
        assert_eq!(
            max_abs_diff(var.as_tensor(), old)?,
            0.0,
            "a base weight moved"
        );
    }
    for ((name, var), old) in loaded.params.iter().zip(&lora_before) {
        assert!(
            max_abs_diff(var.as_tensor(), old)? > 0.0,
            "{name} did not move"
        );
    }
    Ok(())
}

#[test]
fn an_adapter_saved_and_loaded_again_is_the_same() -> TestResult {
    let loaded = with_adapter()?;
    let dir = TempDir::new("qwen2-lora-save")?;
    adapter::save(dir.path(), &loaded, Some("tests/fixtures/qwen2-lora-tiny"))?;
    let read = adapter::load(dir.path())?;
    let original = adapter::load(&fixture().join("adapter"))?;
    assert_eq!(read.config, original.config);
    assert_eq!(read.tensors.len(), original.tensors.len());
    for (name, t) in &original.tensors {
        let ours = read.tensors.get(name).ok_or(format!("{name} not saved"))?;
        assert_eq!(max_abs_diff(t, ours)?, 0.0, "{name}");
    }
    // The keys PEFT's LoraConfig needs, as PEFT writes them.
    let text = std::fs::read_to_string(dir.path().join("adapter_config.json"))?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8);
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    assert_eq!(json["bias"], "none");
    assert_eq!(json["fan_in_fan_out"], false);
    assert_eq!(json["lora_dropout"], 0.0);
    assert_eq!(
        json["base_model_name_or_path"],
        "tests/fixtures/qwen2-lora-tiny"
    );
    // The same tensor names as PEFT's file, and no temporary file left behind.
    let mut names: Vec<String> =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)?
            .into_keys()
            .collect();
    names.sort();
    let mut peft_names: Vec<String> = candle_core::safetensors::load(
        fixture().join("adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )?
    .into_keys()
    .collect();
    peft_names.sort();
    assert_eq!(names, peft_names);
    let mut files: Vec<String> = std::fs::read_dir(dir.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    files.sort();
    assert_eq!(files, adapter::FILES);
    Ok(())
}

#[test]
fn merge_adds_b_a_times_alpha_over_r_to_the_base() -> TestResult {
    let dev = Device::Cpu;
    let loaded = with_adapter()?;
    let merged = adapter::merge(&loaded)?;
    let original = adapter::load(&fixture().join("adapter"))?;
    let base = candle_core::safetensors::load(fixture().join("model.safetensors"), &dev)?;
    let merged_map = merged.data().lock().map_err(|_| "poisoned")?.clone();
    assert_eq!(merged_map.len(), base.len());
    let mut adapted = 0;
    for (name, w) in &base {
        let ours = merged_map
            .get(name)
            .ok_or(format!("{name} not merged"))?
            .as_tensor();
        let module = name.trim_end_matches(".weight");
        let a = original.tensors.get(&format!("{module}.lora_A.weight"));
        let b = original.tensors.get(&format!("{module}.lora_B.weight"));
        let expected = match (a, b) {
            (Some(a), Some(b)) => {
                adapted += 1;
                (w + (b.matmul(a)? * (8.0 / 4.0))?)?
            }
            _ => w.clone(),
        };
        assert!(max_abs_diff(ours, &expected)? <= 1e-7, "{name}");
    }
    assert_eq!(adapted, 6);

    // A checkpoint saved from the merge computes what base + adapter computes.
    let dir = TempDir::new("qwen2-lora-merge")?;
    qwen2::save::save(dir.path(), &loaded.config, &merged)?;
    let plain = loader::load(dir.path(), DType::F32, &dev)?;
    let ids = Tensor::new(&[[5u32, 17, 99, 3, 64, 2, 8, 120]], &dev)?;
    let want = loaded.model.forward(&ids, None, None)?;
    let got = plain.model.forward(&ids, None, None)?;
    let err = rel_err(&got, &want)?;
    println!("merged checkpoint vs base + adapter: logits rel. error {err:.2e}");
    assert!(err <= OUTPUT_TOLERANCE, "{err:.3e}");
    Ok(())
}

#[test]
fn lora_options_are_checked() {
    let err = |r: AnyResult<LoraConfig>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let zero = err(q_v(0, 8.0, 1));
    assert!(zero.contains("--lora-r 0"), "{zero}");
    let unknown = Target::parse_list("q_proj,qkv_proj")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        unknown.contains("`qkv_proj`") && unknown.contains("gate_proj"),
        "{unknown}"
    );
    assert_eq!(
        Target::parse_list("v_proj, q_proj,v_proj").ok(),
        Some(vec![Target::QProj, Target::VProj])
    );
}

/// An adapter whose rank or targets differ from the model's configuration names its file and
/// every mismatching tensor.
#[test]
fn an_adapter_that_does_not_fit_is_named() -> TestResult {
    let adapter = adapter::load(&fixture().join("adapter"))?;
    let load = |lora: &LoraConfig| {
        loader::load_lora(&fixture(), lora, adapter.init(), DType::F32, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let rank = load(&q_v(8, 16.0, 0)?);
    assert!(
        rank.contains("adapter_model.safetensors")
            && rank.contains(
                "`base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight` has shape \
                 [32, 4], r 8"
            ),
        "{rank}"
    );
    let targets = load(&LoraConfig::new(
        4,
        8.0,
        vec![Target::QProj, Target::KProj],
        0,
    )?);
    assert!(
        targets.contains("missing tensor `base_model.model.model.layers.0.self_attn.k_proj")
            && targets.contains("`base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight`: the model has no such adapted projection"),
        "{targets}"
    );
    Ok(())
}

/// PEFT options that change the computation are refused by key.
#[test]
fn unsupported_adapter_options_are_refused_by_key() -> TestResult {
    let original = std::fs::read_to_string(fixture().join("adapter/adapter_config.json"))?;
    for (key, value, expected) in [
        ("use_dora", "true", "key `use_dora`"),
        ("target_modules", "\".*proj\"", "key `target_modules`"),
        ("target_modules", "[\"q_proj\", \"qkv\"]", "`qkv`"),
        ("r", "0", "--lora-r 0"),
        ("peft_type", "\"IA3\"", "key `peft_type`"),
    ] {
        let mut json: serde_json::Value = serde_json::from_str(&original)?;
        json[key] = serde_json::from_str(value)?;
        let dir = TempDir::new("qwen2-lora-bad")?;
        std::fs::write(dir.path().join("adapter_config.json"), json.to_string())?;
        std::fs::copy(
            fixture().join("adapter/adapter_model.safetensors"),
            dir.path().join("adapter_model.safetensors"),
        )?;
        let err = adapter::load(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("adapter_config.json") && err.contains(expected),
            "{key} = {value}: {err}"
        );
    }
    Ok(())
}

#[test]
fn merging_without_lora_is_refused() -> TestResult {
    let plain = loader::load(&fixture(), DType::F32, &Device::Cpu)?;
    let err = adapter::merge(&plain)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("--merge") && err.contains("--lora-r"), "{err}");
    Ok(())
}

fn qwen2_train(args: &[&str]) -> std::io::Result<std::process::Output> {
    std::process::Command::new(env!("CARGO_BIN_EXE_qwen2"))
        .arg("train")
        .args(args)
        .output()
}

/// `train --lora-r` saves an adapter that `--adapter` resumes from and `--merge` folds into a
/// checkpoint that computes what base + adapter does.
#[test]
fn the_cli_trains_saves_resumes_and_merges_an_adapter() -> TestResult {
    let dev = Device::Cpu;
    let model = fixture();
    let model = model.to_str().ok_or("fixture path is not UTF-8")?;
    let out = TempDir::new("qwen2-lora-cli")?;
    let adapter_dir = out.path().join("adapter");
    let merged_dir = out.path().join("merged");
    let (adapter_arg, merged_arg) = (
        adapter_dir.to_str().ok_or("temp path is not UTF-8")?,
        merged_dir.to_str().ok_or("temp path is not UTF-8")?,
    );
    let common = [
        "--steps",
        "2",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--model",
        model,
    ];
    let run = qwen2_train(
        &[
            &common[..],
            &[
                "--lora-r",
                "4",
                "--lora-alpha",
                "8",
                "--lora-targets",
                "q_proj,v_proj",
                "--save",
                adapter_arg,
            ],
        ]
        .concat(),
    )?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("lora: r 4, alpha 8, on q_proj,v_proj; 2688 trainable"),
        "{stderr}"
    );
    let trained = adapter::load(&adapter_dir)?;
    assert_eq!(trained.config, q_v(4, 8.0, 0)?);
    // Two steps moved B away from its zero start.
    let b = trained
        .tensors
        .get("model.layers.0.self_attn.q_proj.lora_B.weight")
        .ok_or("no lora_B saved")?;
    assert!(b.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);

    let run = qwen2_train(
        &[
            &common[..],
            &["--adapter", adapter_arg, "--save", merged_arg, "--merge"],
        ]
        .concat(),
    )?;
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let resumed = adapter::load(&merged_dir.join("adapter"))?;
    let plain = loader::load(&merged_dir, DType::F32, &dev)?;
    let with = loader::load_lora(
        &fixture(),
        &resumed.config,
        resumed.init(),
        DType::F32,
        &dev,
    )?;
    let ids = Tensor::new(&[[5u32, 17, 99, 3, 64, 2, 8, 120]], &dev)?;
    let err = rel_err(
        &plain.model.forward(&ids, None, None)?,
        &with.model.forward(&ids, None, None)?,
    )?;
    assert!(
        err <= OUTPUT_TOLERANCE,
        "merged vs base + adapter: {err:.3e}"
    );

    // Clear errors, before anything is trained.
    let adapter_fixture = fixture().join("adapter");
    let adapter_fixture = adapter_fixture.to_str().ok_or("not UTF-8")?;
    for (args, expected) in [
        (&["--lora-r", "0"][..], "--lora-r 0"),
        (
            &["--lora-r", "4", "--lora-targets", "q_proj,qkv"][..],
            "unknown LoRA target `qkv`",
        ),
        (
            &["--adapter", adapter_fixture, "--lora-r", "8"][..],
            "has r 4",
        ),
        (
            &["--save", merged_arg, "--merge"][..],
            "--merge folds a LoRA adapter",
        ),
        (&["--lora-targets", "q_proj"][..], "--lora-r"),
    ] {
        let run = qwen2_train(&[&common[..], args].concat())?;
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            !run.status.success() && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("step "),
            "{args:?} trained before failing: {stderr}"
        );
    }
    Ok(())
}
