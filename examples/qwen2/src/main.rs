//! `qwen2`: train a Qwen2 through the checkpointing engines, or verify it against a reference.
//!
//! ```text
//! qwen2 train                                   # small random-init model on the bundled text
//! qwen2 train --model DIR --checkpoint recompute
//! qwen2 train --checkpoint offload-disk --offload-dir DIR --prefetch 2 --keep-last 1
//! qwen2 train --checkpoint offload-disk --budget-mib 1   # per-layer plan, printed per shape
//! qwen2 train --save DIR                        # then: qwen2 train --model DIR
//! qwen2 verify --model DIR --reference FILE [--checkpoint MODE]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device};
use checkpoint_runtime::{DiskConfig, Mode};
use clap::{Args, Parser, Subcommand};

use qwen2::data::{BUNDLED_TEXT, ByteDataset};
use qwen2::train::{CheckpointOptions, TrainConfig};
use qwen2::{Config, Error, Result, loader};

#[derive(Debug, Parser)]
#[command(version, about = "Qwen2 trained through #[checkpointable] engines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train on a byte-level text (the bundled public-domain chapter by default).
    Train(TrainArgs),
    /// Compare logits, loss and every gradient with a reference file; non-zero exit above
    /// tolerance.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
struct PolicyArgs {
    /// none | recompute | offload-host | offload-disk
    #[arg(long, default_value = "recompute")]
    checkpoint: Mode,
    /// Layers per checkpointed segment (only each segment's input is kept).
    #[arg(long, default_value_t = 1)]
    segment: usize,
    /// Checkpoint only the first N layers; the rest keep their graph.
    #[arg(long)]
    first: Option<usize>,
    /// Offload modes: keep the boundaries of the last N segments on the device (backward needs
    /// them first).
    #[arg(long, default_value_t = 0)]
    keep_last: usize,
    /// Memory budget (MiB) for what the layer stack keeps between forward and backward: the
    /// engine measures each layer on the first step and keeps, recomputes or offloads (within
    /// the mode) per layer; prints its plan. Replaces --segment, --first and --keep-last.
    #[arg(long, value_name = "MIB")]
    budget_mib: Option<u64>,
    /// offload-disk: the directory under which the engine creates its private (0700) directory
    /// [default: the system temp dir].
    #[arg(long, value_name = "DIR")]
    offload_dir: Option<PathBuf>,
    /// offload-disk: boundaries read ahead of the backward pass.
    #[arg(long, default_value_t = DiskConfig::default().prefetch)]
    prefetch: usize,
}

impl PolicyArgs {
    fn options(&self) -> Result<CheckpointOptions> {
        let budget = self
            .budget_mib
            .map(|mib| {
                mib.checked_mul(1 << 20)
                    .ok_or_else(|| Error::Data(format!("--budget-mib {mib}: too large")))
            })
            .transpose()?;
        let options = CheckpointOptions {
            mode: self.checkpoint,
            segment: self.segment,
            first: self.first,
            keep_last: self.keep_last,
            budget,
            offload_dir: self.offload_dir.clone(),
            prefetch: self.prefetch,
        };
        options.policy()?; // reject options that do not apply before loading anything
        Ok(options)
    }
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// A Hugging Face Qwen2 checkpoint directory; default: a small random-init model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Train on this text instead of the bundled one (bytes are the tokens).
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// Longest example, in bytes; batches are right-padded to their longest example.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Peak learning rate (linear warmup, then cosine decay to a tenth).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 4)]
    warmup: usize,
    /// Global gradient-norm bound (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Training dtype: f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    dtype: Option<String>,
    /// Seed of the random initialisation and of the batch sampler.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Write the trained model here as a Hugging Face checkpoint (config.json,
    /// model.safetensors), loadable with --model. Weights only: a run from it starts AdamW and
    /// the schedule afresh. The directory is checked before training starts.
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
    /// With --save: also save every N steps, so that a long run that stops keeps its progress.
    #[arg(long, value_name = "N", requires = "save")]
    save_every: Option<usize>,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The checkpoint directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// The reference file: batch, logits, loss and grad.<name> tensors.
    #[arg(long)]
    reference: PathBuf,
    #[command(flatten)]
    policy: PolicyArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => run_train(&args),
        Command::Verify(args) => run_verify(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The GPU with `--features cuda`, the CPU otherwise.
fn device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        Device::new_cuda(0).map_err(|e| {
            Error::Data(format!(
                "built with --features cuda, but CUDA device 0 is unusable: {e}"
            ))
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(Device::Cpu)
    }
}

fn parse_dtype(arg: Option<&str>, device: &Device) -> Result<DType> {
    match arg {
        None if device.is_cuda() => Ok(DType::BF16),
        None => Ok(DType::F32),
        Some("f32") => Ok(DType::F32),
        Some("bf16") => Ok(DType::BF16),
        Some("f16") => Ok(DType::F16),
        Some(other) => Err(Error::Data(format!(
            "--dtype {other}: expected f32, bf16 or f16"
        ))),
    }
}

fn run_train(args: &TrainArgs) -> Result<()> {
    let options = args.policy.options()?;
    if let Some(dir) = &args.save {
        qwen2::save::prepare(dir)?;
    }
    let device = device()?;
    let dtype = parse_dtype(args.dtype.as_deref(), &device)?;
    let loaded = match &args.model {
        Some(dir) => loader::load(dir, dtype, &device)?,
        None => loader::random(&Config::tiny_bytes(), args.seed, dtype, &device)?,
    };
    for name in &loaded.unused {
        eprintln!("warning: tensor `{name}` in the checkpoint is not used by the model");
    }
    let text = match &args.data {
        Some(path) => std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?,
        None => BUNDLED_TEXT.to_owned(),
    };
    let cfg = &loaded.config;
    let mut data = ByteDataset::new(&text, args.seq_len, cfg.vocab_size, args.seed)?;
    let n_params: usize = loaded.params.iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "model: {} ({} layers, hidden {}, {n_params} parameters, {dtype:?} on {})",
        args.model.as_ref().map_or_else(
            || "random init (Config::tiny_bytes)".to_owned(),
            |d| d.display().to_string()
        ),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        if device.is_cuda() { "cuda:0" } else { "cpu" },
    );
    eprintln!(
        "data: {} examples of at most {} bytes; batch {}, {} steps, lr {:.1e}; checkpoint {options}",
        data.len(),
        args.seq_len,
        args.batch,
        args.steps,
        args.lr,
    );
    let train_cfg = TrainConfig {
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        warmup: args.warmup,
        clip: args.clip,
        weight_decay: args.weight_decay,
        ..TrainConfig::default()
    };
    let ckpt = options.checkpointer()?;
    let started = Instant::now();
    let save_now = |done: usize| match (&args.save, args.save_every) {
        (Some(dir), Some(every)) if done.is_multiple_of(every) && done < args.steps => {
            qwen2::save::save(dir, cfg, &loaded.varmap)
        }
        _ => Ok(()),
    };
    let summary = qwen2::train::train(
        &loaded.model,
        &loaded.params,
        &mut data,
        &ckpt,
        &train_cfg,
        &device,
        save_now,
    )?;
    println!("{summary}");
    println!("wall time {:.1} s", started.elapsed().as_secs_f64());
    if let Some(dir) = &args.save {
        qwen2::save::save(dir, cfg, &loaded.varmap)?;
        println!(
            "saved {} to {}",
            qwen2::save::FILES.join(" and "),
            dir.display()
        );
    }
    Ok(())
}

fn run_verify(args: &VerifyArgs) -> Result<()> {
    let options = args.policy.options()?;
    let device = device()?;
    let ckpt = options.checkpointer()?;
    let report = qwen2::verify::verify(&args.model, &args.reference, &ckpt, &device)?;
    println!("checkpoint {options}");
    for plan in ckpt.budget_plans() {
        println!("budget plan (measured on this step):\n{plan}");
    }
    println!("{}", ckpt.take_stats());
    print!("{report}");
    let err = |name: &str| {
        report
            .checks
            .iter()
            .find(|c| c.name == name)
            .map_or(f64::NAN, |c| c.rel_err)
    };
    if let Some(g) = report.worst_grad() {
        println!(
            "worst: {:.2e} / {:.2e} / {:.2e} ({})",
            err("logits"),
            err("loss"),
            g.rel_err,
            g.name
        );
    }
    report.ok()?;
    println!("all {} tensors within tolerance", report.checks.len());
    Ok(())
}
