//! `qwen2`: train a Qwen2 through the checkpointing engines, or verify it against a reference.
//!
//! ```text
//! qwen2 train                                   # small random-init model on the bundled text
//! qwen2 train --model DIR --checkpoint recompute   # DIR's tokenizer.json tokenizes the data
//! qwen2 train --model DIR --data chat.jsonl --pack --eval-fraction 0.1 --eval-every 20
//! qwen2 train --checkpoint offload-disk --offload-dir DIR --prefetch 2 --keep-last 1
//! qwen2 train --checkpoint offload-disk --budget-mib 1   # per-layer plan, printed per shape
//! qwen2 train --save DIR                        # then: qwen2 train --model DIR --bytes
//! qwen2 train --steps 40 --save DIR --save-every 10   # stopped? the same args + --resume DIR
//! qwen2 train --model DIR --lora-r 16 --lora-alpha 32 --lora-targets q_proj,v_proj --save OUT
//! qwen2 train --model DIR --adapter OUT --save OUT2 --merge   # OUT2: merged, OUT2/adapter
//! qwen2 verify --model DIR --reference FILE [--checkpoint MODE]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::DType;
use clap::{Args, Parser, Subcommand};

use qwen2::cli::{self, PolicyArgs};
use qwen2::data::{self, DataOptions, Dataset};
use qwen2::loader::{Loaded, LoraInit};
use qwen2::lora::{LoraConfig, Target};
use qwen2::train::{StepView, TrainConfig};
use qwen2::{Config, Error, Result, loader};

#[derive(Debug, Parser)]
#[command(version, about = "Qwen2 trained through #[checkpointable] engines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train on a text or JSONL file (the bundled public-domain chapter by default), tokenized
    /// with the checkpoint's tokenizer (bytes for the random-init model).
    Train(Box<TrainArgs>),
    /// Compare logits, loss and every gradient with a reference file; non-zero exit above
    /// tolerance.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// A Hugging Face Qwen2 checkpoint directory (config.json, safetensors, tokenizer.json;
    /// tokenizer_config.json's chat_template for chat data); default: a small random-init
    /// byte-level model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Train on byte ids instead of the checkpoint's tokenizer (the default without --model).
    #[arg(long)]
    bytes: bool,
    /// Train on this file instead of the bundled text: plain text (paragraphs), or `.jsonl`
    /// with one {"text": ...} or {"messages": [{"role", "content"}, ...]} object per line
    /// (chat: rendered with the chat template, loss on assistant tokens only).
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// Concatenate the examples and cut them into rows of exactly --seq-len tokens, instead
    /// of truncating each longer example to --seq-len.
    #[arg(long)]
    pack: bool,
    /// Hold out this share of the examples (chosen with --seed) and report the loss and
    /// perplexity on them after the last step.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    eval_fraction: f64,
    /// With --eval-fraction: also evaluate every N steps.
    #[arg(long, value_name = "N", requires = "eval_fraction")]
    eval_every: Option<usize>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    lora: LoraArgs,
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// Longest example, in tokens; batches are right-padded to their longest example.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Micro-batches of --batch rows per optimizer step (gradient accumulation): the step is
    /// that of one batch of N·batch rows, with the memory of one micro-batch.
    #[arg(long, value_name = "N", default_value_t = 1)]
    accumulate: usize,
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
    /// model.safetensors in the --model checkpoint's dtype, its tokenizer files), loadable with
    /// --model; beside it the training state (training_state.safetensors and .json: AdamW
    /// moments and masters, step, data position) for --resume, and the loss curve loss.svg.
    /// The directory is checked before training starts.
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
    /// With --save: also save every N steps, so that a long run that stops keeps its progress.
    #[arg(long, value_name = "N", requires = "save")]
    save_every: Option<usize>,
    /// Continue the run saved in DIR by --save (its weights, AdamW state, step and data
    /// position) to --steps; give the saved run's other arguments again.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
}

impl TrainArgs {
    /// The arguments that shape a run's numbers: a resumed run must repeat them.
    fn shaping(&self, dtype: DType) -> BTreeMap<String, String> {
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or_else(|| "(none)".to_owned(), |p| p.display().to_string())
        };
        [
            ("--model", path(&self.model)),
            ("--bytes", self.bytes.to_string()),
            ("--data", path(&self.data)),
            ("--pack", self.pack.to_string()),
            ("--eval-fraction", self.eval_fraction.to_string()),
            ("--seq-len", self.seq_len.to_string()),
            ("--steps", self.steps.to_string()),
            ("--batch", self.batch.to_string()),
            ("--accumulate", self.accumulate.to_string()),
            ("--lr", self.lr.to_string()),
            ("--warmup", self.warmup.to_string()),
            ("--clip", self.clip.to_string()),
            ("--weight-decay", self.weight_decay.to_string()),
            ("--dtype", format!("{dtype:?}")),
            ("--seed", self.seed.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

#[derive(Debug, Args)]
struct LoraArgs {
    /// Train LoRA updates of this rank on a frozen base instead of the whole model; --save
    /// then writes a PEFT adapter (adapter_config.json, adapter_model.safetensors).
    #[arg(long, value_name = "R")]
    lora_r: Option<usize>,
    /// LoRA scale numerator: the update is multiplied by alpha / r [default: 2·r].
    #[arg(long, value_name = "A")]
    lora_alpha: Option<f64>,
    /// The projections that get LoRA updates, comma-separated, of q_proj, k_proj, v_proj,
    /// o_proj, gate_proj, up_proj, down_proj [default: q_proj,v_proj].
    #[arg(long, value_name = "LIST")]
    lora_targets: Option<String>,
    /// Start from this PEFT LoRA adapter directory (its r, lora_alpha and target_modules).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// With LoRA and --save DIR: write base + adapter merged as a plain checkpoint into DIR
    /// (config.json, model.safetensors) and the adapter into DIR/adapter.
    #[arg(long, requires = "save")]
    merge: bool,
}

/// How the LoRA options ask for the model to be built.
enum LoraSetup {
    /// Train every parameter.
    Off,
    /// Train LoRA updates on a frozen base.
    On(LoraConfig, LoraInit),
}

impl LoraArgs {
    /// The LoRA configuration, checked before anything is loaded.
    fn setup(&self, seed: u64) -> Result<LoraSetup> {
        if let Some(dir) = &self.adapter {
            let adapter = qwen2::adapter::load(dir)?;
            let from_file = &adapter.config;
            let differs = |flag: &str, ours: String, theirs: String| {
                Err(Error::Data(format!(
                    "{flag} {ours}, but the adapter {} has {theirs}: drop {flag} (the adapter \
                     sets it) or start a fresh adapter without --adapter",
                    dir.display()
                )))
            };
            if let Some(r) = self.lora_r
                && r != from_file.r
            {
                return differs("--lora-r", r.to_string(), format!("r {}", from_file.r));
            }
            if let Some(alpha) = self.lora_alpha
                && alpha != from_file.alpha
            {
                return differs(
                    "--lora-alpha",
                    alpha.to_string(),
                    format!("lora_alpha {}", from_file.alpha),
                );
            }
            if let Some(list) = &self.lora_targets
                && Target::parse_list(list)? != from_file.targets
            {
                let names: Vec<&str> = from_file.targets.iter().map(|t| t.name()).collect();
                return differs(
                    "--lora-targets",
                    list.clone(),
                    format!("target_modules {}", names.join(",")),
                );
            }
            let init = adapter.init();
            return Ok(LoraSetup::On(
                LoraConfig {
                    seed,
                    ..adapter.config
                },
                init,
            ));
        }
        let Some(r) = self.lora_r else {
            if self.lora_alpha.is_some() || self.lora_targets.is_some() {
                return Err(Error::Data(
                    "--lora-alpha and --lora-targets shape a LoRA update: give its rank with \
                     --lora-r (e.g. --lora-r 16), or --adapter DIR"
                        .into(),
                ));
            }
            if self.merge {
                return Err(Error::Data(
                    "--merge folds a LoRA adapter into the base, and this run has none: give \
                     --lora-r and --lora-targets, or --adapter DIR (without LoRA, --save \
                     already writes the whole model)"
                        .into(),
                ));
            }
            return Ok(LoraSetup::Off);
        };
        let targets = Target::parse_list(self.lora_targets.as_deref().unwrap_or("q_proj,v_proj"))?;
        #[allow(clippy::cast_precision_loss)]
        let alpha = self.lora_alpha.unwrap_or(2.0 * r as f64);
        Ok(LoraSetup::On(
            LoraConfig::new(r, alpha, targets, seed)?,
            LoraInit::Fresh,
        ))
    }
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
    // SAFETY: the first statement of `main`: no other thread exists yet.
    unsafe { qwen2::threads::limit_idle_spinning() };
    cli::exit_code(match Cli::parse().command {
        Command::Train(args) => run_train(&args),
        Command::Verify(args) => run_verify(&args),
    })
}

fn run_train(args: &TrainArgs) -> Result<()> {
    let options = args.policy.options()?;
    let lora = args.lora.setup(args.seed)?;
    if let Some(dir) = &args.save {
        qwen2::save::prepare(dir)?;
    }
    let device = cli::device()?;
    let dtype = cli::parse_dtype(args.dtype.as_deref(), &device)?;
    let shaping = args.shaping(dtype);
    let resume = match &args.resume {
        Some(dir) => {
            let saved = qwen2::state::load(dir)?;
            saved.check_args(dir, &shaping)?;
            eprintln!(
                "resuming {} at step {} of {}",
                dir.display(),
                saved.meta.step,
                args.steps
            );
            Some(saved)
        }
        None => None,
    };
    // The tokenizer before the weights: a checkpoint without one fails at once.
    let (tokenizer, template) = cli::tokenizer(args.model.as_deref(), args.bytes)?;
    let loaded = match (&args.model, lora) {
        (Some(dir), LoraSetup::Off) => loader::load(dir, dtype, &device)?,
        (None, LoraSetup::Off) => loader::random(&Config::tiny_bytes(), args.seed, dtype, &device)?,
        (Some(dir), LoraSetup::On(lora, init)) => {
            loader::load_lora(dir, &lora, init, dtype, &device)?
        }
        (None, LoraSetup::On(lora, LoraInit::Fresh)) => {
            loader::random_lora(&Config::tiny_bytes(), args.seed, &lora, dtype, &device)?
        }
        (None, LoraSetup::On(..)) => {
            return Err(Error::Data(
                "--adapter needs the base it was trained on: give --model DIR".into(),
            ));
        }
    };
    for name in &loaded.unused {
        eprintln!("warning: tensor `{name}` in the checkpoint is not used by the model");
    }
    let cfg = &loaded.config;
    tokenizer.check_vocab(cfg.vocab_size)?;
    let examples = data::examples_or_bundled(
        args.data.as_deref(),
        &tokenizer,
        template.as_ref(),
        args.seq_len,
    )?;
    let read = examples.len();
    let mut data = Dataset::new(
        examples,
        &DataOptions {
            seq_len: args.seq_len,
            pack: args.pack,
            eval_fraction: args.eval_fraction,
            vocab_size: cfg.vocab_size,
            seed: args.seed,
        },
    )?;
    let n_params: usize = loaded.params.iter().map(|(_, v)| v.elem_count()).sum();
    if let Some(lora) = &loaded.lora {
        let frozen: usize = loaded
            .varmap
            .all_vars()
            .iter()
            .map(|v| v.elem_count())
            .sum();
        let targets: Vec<&str> = lora.targets.iter().map(|t| t.name()).collect();
        eprintln!(
            "lora: r {}, alpha {}, on {}; {n_params} trainable, {frozen} frozen parameters",
            lora.r,
            lora.alpha,
            targets.join(",")
        );
    }
    eprintln!(
        "model: {} ({} layers, hidden {}, {n_params} trainable parameters, {dtype:?} on {})",
        args.model.as_ref().map_or_else(
            || "random init (Config::tiny_bytes)".to_owned(),
            |d| d.display().to_string()
        ),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        if device.is_cuda() { "cuda:0" } else { "cpu" },
    );
    eprintln!(
        "data: {} ({read} examples, {}); tokenizer: {}",
        args.data.as_ref().map_or_else(
            || "the bundled text".to_owned(),
            |p| p.display().to_string()
        ),
        match (&args.data, template.is_some()) {
            (Some(path), true) if data::is_jsonl(path) =>
                "jsonl; chats in the checkpoint's template, loss on assistant tokens",
            (Some(path), false) if data::is_jsonl(path) => "jsonl",
            _ => "plain text, cut at blank lines",
        },
        tokenizer
            .path()
            .map_or_else(|| "bytes".to_owned(), |p| p.display().to_string()),
    );
    eprintln!(
        "rows: {} train, {} eval, at most {} tokens{} ({} truncated, {} without a target \
         dropped); batch {}, {} steps, lr {:.1e}; checkpoint {options}",
        data.len(),
        data.eval_rows().len(),
        args.seq_len,
        if args.pack { ", packed" } else { "" },
        data.truncated(),
        data.dropped(),
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
        eval_every: args.eval_every,
        accumulate: args.accumulate,
        ..TrainConfig::default()
    };
    let ckpt = options.checkpointer()?;
    let started = Instant::now();
    let save_now = |view: &StepView<'_>| {
        let Some(dir) = &args.save else {
            return Ok(());
        };
        let last = view.done == args.steps;
        if !last && !args.save_every.is_some_and(|n| view.done.is_multiple_of(n)) {
            return Ok(());
        }
        save_model(dir, &loaded, args)?;
        if let Some(model_dir) = &args.model
            && !tokenizer.is_bytes()
        {
            qwen2::save::copy_tokenizer(model_dir, dir)?;
        }
        let meta = view.meta(args.seed, shaping.clone());
        qwen2::state::save(dir, &meta, view.opt, &loaded.params)?;
        if last {
            qwen2::plot::loss_curve(&dir.join(qwen2::plot::FILE), view.losses, view.evals)?;
        }
        Ok(())
    };
    let summary = qwen2::train::train_resumable(
        &loaded.model,
        &loaded.params,
        &mut data,
        &ckpt,
        &train_cfg,
        &device,
        resume.as_ref(),
        save_now,
    )?;
    println!("{summary}");
    println!("wall time {:.1} s", started.elapsed().as_secs_f64());
    if let Some(dir) = &args.save {
        if loaded.lora.is_none() || args.lora.merge {
            println!(
                "saved {} to {}",
                qwen2::save::FILES.join(" and "),
                dir.display()
            );
        }
        if loaded.lora.is_some() {
            println!(
                "saved the LoRA adapter ({}) to {}",
                qwen2::adapter::FILES.join(", "),
                adapter_dir(dir, args).display()
            );
        }
        println!(
            "saved the training state ({} and {}) and the loss curve ({}) to {}",
            qwen2::state::TENSORS,
            qwen2::state::META,
            qwen2::plot::FILE,
            dir.display(),
        );
        if tokenizer.is_bytes() {
            // No tokenizer.json is saved: the ids are bytes, and `--model` needs to be told.
            println!(
                "byte-level model: train it further with --model {} --bytes",
                dir.display()
            );
        }
    }
    Ok(())
}

/// With LoRA and --merge, the adapter goes next to the merged checkpoint, in `DIR/adapter`.
fn adapter_dir(dir: &std::path::Path, args: &TrainArgs) -> PathBuf {
    if args.lora.merge {
        dir.join("adapter")
    } else {
        dir.to_owned()
    }
}

/// `--save DIR`: the whole model; with LoRA the adapter, and with --merge also base + adapter.
/// Weights are saved in the dtype of the checkpoint the run started from.
fn save_model(dir: &std::path::Path, loaded: &Loaded, args: &TrainArgs) -> Result<()> {
    if loaded.lora.is_none() {
        return qwen2::save::save_as(dir, &loaded.config, &loaded.varmap, loaded.file_dtype);
    }
    let base = args.model.as_ref().map(|d| d.display().to_string());
    qwen2::adapter::save(&adapter_dir(dir, args), loaded, base.as_deref())?;
    if args.lora.merge {
        let merged = qwen2::adapter::merge(loaded)?;
        qwen2::save::save_as(dir, &loaded.config, &merged, loaded.file_dtype)?;
    }
    Ok(())
}

fn run_verify(args: &VerifyArgs) -> Result<()> {
    let options = args.policy.options()?;
    let device = cli::device()?;
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
