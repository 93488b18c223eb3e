//! `qwen2-moe`: train a Qwen2-MoE through the checkpointing engines, or verify it against a
//! reference made by transformers.
//!
//! ```text
//! qwen2-moe train                                 # small random-init model on the bundled text
//! qwen2-moe train --model DIR --data chat.jsonl   # DIR's tokenizer.json tokenizes the data
//! qwen2-moe train --model DIR --bytes --steps 20  # no tokenizer: bytes (folded into a small vocab)
//! qwen2-moe train --checkpoint offload-disk --budget-mib 1
//! qwen2-moe verify --model DIR [--reference FILE] # parity in every checkpoint mode
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::Device;
use checkpoint_runtime::Mode;
use clap::{Args, Parser, Subcommand};
use qwen2::Result;
use qwen2::cli::{self, PolicyArgs};
use qwen2::data::{self, DataOptions, Dataset};
use qwen2::train::{CheckpointOptions, TrainConfig};
use qwen2_moe::{Config, loader, train, verify};

#[derive(Debug, Parser)]
#[command(version, about = "Qwen2-MoE trained through #[checkpointable] engines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train on a text or JSONL file (the bundled public-domain chapter by default), tokenized
    /// with the checkpoint's tokenizer (bytes for the random-init model).
    Train(TrainArgs),
    /// Compare logits, load-balancing loss, loss and every gradient with a reference file in
    /// every checkpoint mode; non-zero exit above tolerance.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// A Hugging Face Qwen2-MoE checkpoint directory (config.json, safetensors, tokenizer.json;
    /// tokenizer_config.json's chat_template for chat data); default: a small random-init model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Plain text, or JSONL of {"text": ..} or {"messages": [..]} lines (chats rendered with the
    /// checkpoint's chat template, loss on the assistant's tokens) [default: the bundled text].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Train on byte ids instead of the checkpoint's tokenizer (the default without --model);
    /// folded into the vocabulary if it has fewer than 256 tokens.
    #[arg(long)]
    bytes: bool,
    /// f32 | bf16 | f16 [default: bf16 on a GPU, f32 on the CPU].
    #[arg(long)]
    dtype: Option<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Longest row, in tokens.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Peak learning rate (linear warmup, then cosine decay to a tenth).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Steps of linear warmup.
    #[arg(long, default_value_t = 4)]
    warmup: usize,
    /// Seed of the random initialisation and of the batch sampler.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The checkpoint directory (config.json + model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// The reference file [default: DIR/reference.safetensors].
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Print every tensor's relative error, not only each mode's summary.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    // SAFETY: the first statement of `main`: no other thread exists yet.
    unsafe { qwen2::threads::limit_idle_spinning() };
    cli::exit_code(match Cli::parse().command {
        Command::Train(args) => run_train(&args),
        Command::Verify(args) => run_verify(&args),
    })
}

fn run_train(args: &TrainArgs) -> Result<()> {
    let options = args.policy.options()?;
    let ckpt = options.checkpointer()?;
    let device = cli::device()?;
    let dtype = cli::parse_dtype(args.dtype.as_deref(), &device)?;
    // The tokenizer before the weights: a checkpoint without one fails at once.
    let (tokenizer, template) = cli::tokenizer(args.model.as_deref(), args.bytes)?;
    let loaded = match &args.model {
        Some(dir) => loader::load(dir, dtype, &device)?,
        None => loader::random(&Config::tiny_bytes(), args.seed, dtype, &device)?,
    };
    for name in &loaded.unused {
        eprintln!("warning: tensor `{name}` in the checkpoint is not used by the model");
    }
    let cfg = loaded.model.config();
    let vocab_size = cfg.base.vocab_size;
    tokenizer.check_vocab(vocab_size)?;
    let mut examples = data::examples_or_bundled(
        args.data.as_deref(),
        &tokenizer,
        template.as_ref(),
        args.seq_len,
    )?;
    if tokenizer.is_bytes() && vocab_size < 256 {
        eprintln!("note: byte ids folded into the model's {vocab_size}-token vocabulary");
        train::fold_bytes(&mut examples, vocab_size)?;
    }
    let mut data = Dataset::new(
        examples,
        &DataOptions::rows(args.seq_len, vocab_size, args.seed),
    )?;
    let n_params: usize = loaded.params.iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "model: {} ({} layers, {} experts, top {}, {n_params} parameters); checkpoint {options}",
        args.model.as_ref().map_or_else(
            || "random init (Config::tiny_bytes)".to_owned(),
            |d| d.display().to_string()
        ),
        cfg.base.num_hidden_layers,
        cfg.num_experts,
        cfg.num_experts_per_tok,
    );
    eprintln!(
        "device: {}, {dtype:?}; data: {} ({} rows); tokenizer: {}",
        if device.is_cuda() { "cuda:0" } else { "cpu" },
        args.data
            .as_ref()
            .map_or_else(|| "bundled text".to_owned(), |p| p.display().to_string()),
        data.len(),
        tokenizer
            .path()
            .map_or_else(|| "bytes".to_owned(), |p| p.display().to_string()),
    );
    let train_cfg = TrainConfig {
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        warmup: args.warmup,
        ..TrainConfig::default()
    };
    let summary = train::train(
        &loaded.model,
        &loaded.params,
        &mut data,
        &ckpt,
        &train_cfg,
        &device,
    )?;
    println!("{summary}");
    Ok(())
}

/// The engines `verify` runs the reference batch through: every mode, segments of two, and a
/// budget (nothing may stay on the device: the planner offloads every layer to disk).
fn verify_modes() -> Vec<CheckpointOptions> {
    vec![
        CheckpointOptions::new(Mode::None),
        CheckpointOptions::new(Mode::Recompute),
        CheckpointOptions {
            segment: 2,
            ..CheckpointOptions::new(Mode::Recompute)
        },
        CheckpointOptions::new(Mode::OffloadHost),
        CheckpointOptions::new(Mode::OffloadDisk),
        CheckpointOptions {
            budget: Some(0),
            ..CheckpointOptions::new(Mode::OffloadDisk)
        },
    ]
}

fn run_verify(args: &VerifyArgs) -> Result<()> {
    let reference = args
        .reference
        .clone()
        .unwrap_or_else(|| args.model.join("reference.safetensors"));
    let mut failed = None;
    for options in verify_modes() {
        let ckpt = options.checkpointer()?;
        let report = verify::verify(&args.model, &reference, &ckpt, &Device::Cpu)?;
        if args.verbose {
            print!("{report}");
        }
        let err = |name: &str| {
            report
                .checks
                .iter()
                .find(|c| c.name == name)
                .map_or(f64::NAN, |c| c.rel_err)
        };
        let worst = report.worst_grad();
        println!(
            "{options}: logits {:.2e}, aux_loss {:.2e}, loss {:.2e}, worst gradient {:.2e} ({}): {}",
            err("logits"),
            err("aux_loss"),
            err("loss"),
            worst.map_or(f64::NAN, |c| c.rel_err),
            worst.map_or("-", |c| c.name.as_str()),
            if report.ok().is_ok() { "ok" } else { "FAIL" },
        );
        if let Err(e) = report.ok() {
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    println!("every mode within tolerance (logits and losses 1e-5, gradients 1e-4)");
    Ok(())
}
