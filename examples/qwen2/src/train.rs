//! The training loop: AdamW (`checkpoint_ops`' in-place one, f32 masters for bf16/f16) with decoupled weight decay on matrices only, global-norm
//! gradient clipping, linear warmup then cosine decay of the learning rate, gradients from the
//! checkpointing engine, and a progress line with loss, tokens/s and memory.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use checkpoint_ops::AdamW;
use checkpoint_runtime::{Checkpointer, DiskConfig, GradientAudit, Mode, Policy, Stats};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::loss::causal_lm_loss;
use crate::model::Qwen2;
use crate::state;

/// How the layers are checkpointed: the CLI's `--checkpoint` and policy options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// none | recompute | offload-host | offload-disk.
    pub mode: Mode,
    /// Layers per checkpointed segment (only each segment's input is kept).
    pub segment: usize,
    /// Checkpoint only the first N layers; the rest keep their graph.
    pub first: Option<usize>,
    /// Keep the boundaries of the last N segments on the device (offload modes).
    pub keep_last: usize,
    /// Fit the bytes the stack keeps between forward and backward into this budget: the engine
    /// measures every layer on the first step and chooses graph, recompute or offload per layer.
    pub budget: Option<u64>,
    /// Where the disk engine creates its private directory (default: the system temp dir).
    pub offload_dir: Option<PathBuf>,
    /// Disk boundaries loaded ahead of the backward pass.
    pub prefetch: usize,
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        Self::new(Mode::Recompute)
    }
}

impl CheckpointOptions {
    /// Every layer in `mode`, one layer per segment, the engine's default disk settings.
    #[must_use]
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            segment: 1,
            first: None,
            keep_last: 0,
            budget: None,
            offload_dir: None,
            prefetch: DiskConfig::default().prefetch,
        }
    }

    /// The engine's policy.
    ///
    /// # Errors
    /// For options that do not apply to the mode (a budget without checkpointing, keep-last
    /// without offload, disk settings without disk offload) or that a budget replaces: a clear
    /// error rather than a silently ignored option.
    pub fn policy(&self) -> Result<Policy> {
        let mode = self.mode;
        let offload = matches!(mode, Mode::OffloadHost | Mode::OffloadDisk);
        let refuse =
            |what: &str, why: &str| Err(Error::Data(format!("--checkpoint {mode} {what}: {why}")));
        if self.budget.is_some() {
            if mode == Mode::None {
                return refuse(
                    "--budget-mib",
                    "a memory budget needs a checkpointing mode (recompute, offload-host or \
                     offload-disk); none keeps every graph",
                );
            }
            if self.segment != 1 || self.first.is_some() || self.keep_last != 0 {
                return refuse(
                    "--budget-mib",
                    "the budget planner chooses every layer's placement itself; drop --segment, \
                     --first and --keep-last, or drop --budget-mib",
                );
            }
        }
        if self.segment == 0 {
            return refuse(
                "--segment 0",
                "a segment holds at least one layer (1 checkpoints every layer)",
            );
        }
        if self.prefetch == 0 {
            return refuse(
                "--prefetch 0",
                "the reader loads at least the next boundary; give 1 or more",
            );
        }
        if self.keep_last != 0 && !offload {
            return refuse(
                "--keep-last",
                "keeping the last boundaries on the device only means something when the mode \
                 offloads (offload-host, offload-disk)",
            );
        }
        if mode != Mode::OffloadDisk
            && (self.offload_dir.is_some() || self.prefetch != DiskConfig::default().prefetch)
        {
            return refuse(
                "--offload-dir/--prefetch",
                "they configure disk offload; use --checkpoint offload-disk (or a budget in \
                 that mode)",
            );
        }
        let mut policy = Policy::new(mode).segments(self.segment);
        if let Some(n) = self.first {
            policy = policy.first(n);
        }
        if self.keep_last != 0 {
            policy = policy.keep_last(self.keep_last);
        }
        if let Some(bytes) = self.budget {
            policy = policy.budget(bytes);
        }
        Ok(policy)
    }

    /// The engine: [`policy`](Self::policy), with the disk settings for `offload-disk`.
    ///
    /// # Errors
    /// See [`policy`](Self::policy).
    pub fn checkpointer(&self) -> Result<Checkpointer> {
        let policy = self.policy()?;
        Ok(if self.mode == Mode::OffloadDisk {
            let defaults = DiskConfig::default();
            Checkpointer::with_disk(
                policy,
                DiskConfig {
                    root: self.offload_dir.clone().unwrap_or(defaults.root),
                    prefetch: self.prefetch,
                    ..defaults
                },
            )
        } else {
            Checkpointer::new(policy)
        })
    }
}

impl std::fmt::Display for CheckpointOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.mode)?;
        if self.mode == Mode::None {
            return Ok(());
        }
        if let Some(bytes) = self.budget {
            write!(f, ", budget {}", fmt_bytes(Some(bytes)))?;
        } else {
            write!(f, ", segments of {}", self.segment)?;
            if let Some(n) = self.first {
                write!(f, ", first {n} layers")?;
            }
            if self.keep_last != 0 {
                write!(f, ", last {} kept on the device", self.keep_last)?;
            }
        }
        if self.mode == Mode::OffloadDisk {
            let root = self.offload_dir.clone().unwrap_or_else(std::env::temp_dir);
            write!(
                f,
                ", disk under {}, prefetch {}",
                root.display(),
                self.prefetch
            )?;
        }
        Ok(())
    }
}

/// Hyper-parameters of a run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per batch.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warmup.
    pub warmup: usize,
    /// The cosine decays to `lr * min_lr_ratio` at the last step.
    pub min_lr_ratio: f64,
    /// Global gradient-norm bound (0: no clipping).
    pub clip: f64,
    /// AdamW weight decay, applied to matrices (not to norms and biases).
    pub weight_decay: f64,
    /// Evaluate on the data's held-out rows every N steps (and after the last step);
    /// `None`: after the last step only. Nothing without held-out rows.
    pub eval_every: Option<usize>,
    /// Micro-batches of `batch` rows per optimizer step: their gradients are summed in f32,
    /// each weighted by its share of the step's predicted tokens, so that the step is the step
    /// of one batch of `accumulate · batch` rows (1: no accumulation).
    pub accumulate: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 60,
            batch: 8,
            lr: 3e-3,
            warmup: 4,
            min_lr_ratio: 0.1,
            clip: 1.0,
            weight_decay: 0.1,
            eval_every: None,
            accumulate: 1,
        }
    }
}

impl TrainConfig {
    /// The learning rate of step `step` (0-based): linear warmup to `lr`, then cosine decay.
    #[must_use]
    pub fn lr_at(&self, step: usize) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let (s, warmup, total) = (step as f64, self.warmup as f64, self.steps as f64);
        if s < warmup {
            return self.lr * (s + 1.0) / (warmup + 1.0);
        }
        let span = (total - warmup - 1.0).max(1.0);
        let progress = ((s - warmup) / span).clamp(0.0, 1.0);
        let min = self.lr * self.min_lr_ratio;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The checkpoint mode.
    pub mode: Mode,
    /// Loss of every step.
    pub losses: Vec<f32>,
    /// Non-padding tokens trained on.
    pub tokens: usize,
    /// Time in forward, backward and optimizer steps.
    pub elapsed: Duration,
    /// Peak resident memory of the process (bytes), where the OS reports it.
    pub peak_rss: Option<u64>,
    /// Peak GPU memory in use (device-wide, sampled after each step), on CUDA.
    pub peak_gpu: Option<u64>,
    /// What the engine did over the run: boundary bytes per location (of the largest step),
    /// peak, and recompute time, transfer time and prefetch hits and waits summed over steps.
    pub stats: Stats,
    /// The evaluations on held-out rows, in step order.
    pub evals: Vec<Eval>,
}

/// The model on held-out rows after some step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eval {
    /// Steps done when it was measured.
    pub step: usize,
    /// Mean cross-entropy per predicted token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Predicted tokens it averages over.
    pub targets: usize,
}

impl std::fmt::Display for Eval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "eval after step {}: loss {:.4}, perplexity {:.2} ({} tokens)",
            self.step, self.loss, self.perplexity, self.targets
        )
    }
}

/// The loss of `model` on `data`'s held-out rows (in batches of `batch`), after `step` steps:
/// the mean over every predicted token (so independent of how the rows are batched). Forward
/// only, without the engine (nothing is differentiated); `None` without held-out rows.
///
/// # Errors
/// A candle error, or a non-finite loss.
pub fn evaluate(
    model: &Qwen2,
    data: &Dataset,
    batch: usize,
    step: usize,
    device: &Device,
) -> Result<Option<Eval>> {
    let (mut sum, mut targets) = (0.0, 0);
    for rows in data.eval_batches(batch, device) {
        let batch = rows?;
        let logits = model.forward(&batch.input_ids, Some(&batch.attention_mask), None)?;
        let loss = causal_lm_loss(&logits, &batch.labels)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        #[allow(clippy::cast_precision_loss)]
        let weight = batch.targets as f64;
        sum += f64::from(loss) * weight;
        targets += batch.targets;
    }
    if targets == 0 {
        return Ok(None);
    }
    #[allow(clippy::cast_precision_loss)]
    let loss = sum / targets as f64;
    if !loss.is_finite() {
        return Err(Error::Data(format!(
            "after step {step}: the eval loss is {loss}; lower --lr"
        )));
    }
    Ok(Some(Eval {
        step,
        loss,
        perplexity: loss.exp(),
        targets,
    }))
}

impl Summary {
    /// Tokens per second over the whole run.
    #[must_use]
    pub fn tokens_per_s(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let t = self.tokens as f64;
        t / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = self.losses.first().copied().unwrap_or(f32::NAN);
        let last = self.losses.last().copied().unwrap_or(f32::NAN);
        let tail = &self.losses[self.losses.len().saturating_sub(5)..];
        #[allow(clippy::cast_precision_loss)]
        let tail_mean = tail.iter().sum::<f32>() / tail.len().max(1) as f32;
        writeln!(
            f,
            "loss {first:.4} -> {last:.4} (mean of the last {}: {tail_mean:.4})",
            tail.len()
        )?;
        writeln!(
            f,
            "{} steps, {} tokens in {:.1} s: {:.0} tokens/s",
            self.losses.len(),
            self.tokens,
            self.elapsed.as_secs_f64(),
            self.tokens_per_s()
        )?;
        write!(f, "peak memory: host RSS {}", fmt_bytes(self.peak_rss))?;
        if self.peak_gpu.is_some() {
            write!(f, ", GPU in use {}", fmt_bytes(self.peak_gpu))?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "checkpoint mode: {} (engine stats: boundary bytes of the largest step; times and \
             counts over all {} steps)",
            self.mode,
            self.losses.len()
        )?;
        write!(f, "{}", self.stats)?;
        if let (Some(first), Some(last)) = (self.evals.first(), self.evals.last()) {
            write!(
                f,
                "\neval loss {:.4} -> {:.4}, perplexity {:.2} -> {:.2} (steps {} -> {}, {} \
                 held-out tokens)",
                first.loss,
                last.loss,
                first.perplexity,
                last.perplexity,
                first.step,
                last.step,
                last.targets
            )?;
        }
        Ok(())
    }
}

/// Trains `model` (whose parameters are `params`) on batches from `data`, every stack through
/// `ckpt`. Prints a progress line to stderr, evaluates on `data`'s held-out rows as
/// `cfg.eval_every` says (printing each result), and calls `after_step` with the number of
/// steps done after each optimizer step (to save the model, say).
///
/// After the first step it prints the [`GradientAudit`] of every parameter (by name) to
/// stderr.
///
/// # Errors
/// A candle or engine error (naming the layer), a non-finite loss, a parameter that receives
/// no gradient (audited on the first step), `cfg.eval_every` of 0, or the error of `after_step`.
pub fn train(
    model: &Qwen2,
    params: &[(String, Var)],
    data: &mut Dataset,
    ckpt: &Checkpointer,
    cfg: &TrainConfig,
    device: &Device,
    mut after_step: impl FnMut(usize) -> Result<()>,
) -> Result<Summary> {
    train_resumable(model, params, data, ckpt, cfg, device, None, |view| {
        after_step(view.done)
    })
}

/// What [`train_resumable`] shows its callback after each optimizer step: enough to save the
/// model and its training state.
#[derive(Debug)]
pub struct StepView<'a> {
    /// Steps done, counting those before a resume.
    pub done: usize,
    /// The optimizer (its AdamW state).
    pub opt: &'a ClippedAdamW,
    /// The data (its sampler's position).
    pub data: &'a Dataset,
    /// The loss of every step done, counting those before a resume.
    pub losses: &'a [f32],
    /// `(step, loss)` of every evaluation done, counting those before a resume.
    pub evals: &'a [(usize, f64)],
}

impl StepView<'_> {
    /// The training state to save now, with the run's `args` and `seed` (see
    /// [`crate::state`]).
    #[must_use]
    pub fn meta(&self, seed: u64, args: std::collections::BTreeMap<String, String>) -> state::Meta {
        state::Meta {
            step: self.done,
            data_position: self.data.sampler_state(),
            seed,
            losses: self.losses.to_vec(),
            evals: self.evals.to_vec(),
            args,
        }
    }
}

/// [`train`], continuing from a saved training state when `resume` is given (its weights,
/// AdamW state, sampler position and step: the run goes on as if never stopped), and showing
/// `after_step` a [`StepView`]. The summary's losses and evaluations are this call's steps.
///
/// # Errors
/// As [`train`]; also a training state that does not fit the model (see
/// [`state::Saved::apply`]) or that is past `cfg.steps`.
#[allow(clippy::too_many_arguments)]
pub fn train_resumable(
    model: &Qwen2,
    params: &[(String, Var)],
    data: &mut Dataset,
    ckpt: &Checkpointer,
    cfg: &TrainConfig,
    device: &Device,
    resume: Option<&state::Saved>,
    mut after_step: impl FnMut(&StepView<'_>) -> Result<()>,
) -> Result<Summary> {
    if cfg.eval_every == Some(0) {
        return Err(Error::Data(
            "--eval-every 0: evaluate every 1 or more steps".to_owned(),
        ));
    }
    if cfg.accumulate == 0 {
        return Err(Error::Data(
            "--accumulate 0: a step takes the gradients of 1 or more micro-batches".to_owned(),
        ));
    }
    let mut opt = ClippedAdamW::new(
        params.iter().map(|(_, v)| v.clone()).collect(),
        ClippedAdamWConfig {
            adamw: ParamsAdamW {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..ParamsAdamW::default()
            },
            clip: cfg.clip,
        },
    )?;
    let (first, mut all_losses, mut all_evals) = match resume {
        Some(saved) => {
            if saved.meta.step > cfg.steps {
                return Err(Error::Data(format!(
                    "--resume: the saved run is at step {}, past --steps {}; give the saved \
                     run's --steps",
                    saved.meta.step, cfg.steps
                )));
            }
            saved.apply(params, &mut opt, data)?;
            (
                saved.meta.step,
                saved.meta.losses.clone(),
                saved.meta.evals.clone(),
            )
        }
        None => (0, Vec::new(), Vec::new()),
    };
    let mut progress = Progress::new(cfg.steps);
    let mut losses = Vec::with_capacity(cfg.steps);
    let mut tokens = 0;
    let started = Instant::now();
    let _ = ckpt.take_stats();
    let mut stats = Stats::default();
    let mut peak_gpu = None;
    let mut plans_printed = Vec::new();
    let mut evals = Vec::new();
    for step in first..cfg.steps {
        let lr = cfg.lr_at(step);
        opt.set_learning_rate(lr);
        let (value, grads, step_tokens) = accumulated_grads(model, data, ckpt, cfg, device)
            .map_err(|e| match e {
                Error::Data(msg) if msg.starts_with("the loss is") => {
                    Error::Data(format!("step {step}: {msg}; lower --lr (now {lr:.2e})"))
                }
                e => e,
            })?;
        opt.step(&grads)?;
        if step == first {
            let audit = GradientAudit::of_named(&grads, params.iter().map(|(n, v)| (n, v)))?;
            progress.clear_line();
            eprintln!("{audit} (mode {})", ckpt.mode());
            audit.into_result()?;
        }
        drop(grads);
        tokens += step_tokens;
        losses.push(value);
        all_losses.push(value);
        stats.merge(&ckpt.take_stats());
        print_new_budget_plans(ckpt, &progress, &mut plans_printed);
        let gpu = gpu_used_bytes(device);
        peak_gpu = peak_gpu.max(gpu);
        #[allow(clippy::cast_precision_loss)]
        let tps = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        progress.update(step + 1, value, lr, opt.last_norm(), tps, gpu);
        let done = step + 1;
        let eval_now = done == cfg.steps || cfg.eval_every.is_some_and(|n| done.is_multiple_of(n));
        if eval_now && let Some(eval) = evaluate(model, data, cfg.batch, done, device)? {
            progress.clear_line();
            eprintln!("{eval}");
            evals.push(eval);
            all_evals.push((eval.step, eval.loss));
        }
        after_step(&StepView {
            done,
            opt: &opt,
            data,
            losses: &all_losses,
            evals: &all_evals,
        })?;
    }
    drop(progress);
    Ok(Summary {
        mode: ckpt.mode(),
        losses,
        tokens,
        elapsed: started.elapsed(),
        peak_rss: peak_rss_bytes(),
        peak_gpu,
        stats,
        evals,
    })
}

/// The loss (mean per predicted token over the step's micro-batches) and gradients of one
/// optimizer step: `cfg.accumulate` micro-batches of `cfg.batch` rows, each through `ckpt`,
/// their gradients summed in f32 weighted by each micro-batch's share of the predicted tokens
/// (one micro-batch: its gradients as they are). Also the non-padding tokens seen.
fn accumulated_grads(
    model: &Qwen2,
    data: &mut Dataset,
    ckpt: &Checkpointer,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<(f32, GradStore, usize)> {
    let mut micro = Vec::with_capacity(cfg.accumulate);
    let mut tokens = 0;
    for _ in 0..cfg.accumulate {
        let batch = data.sample(cfg.batch, device)?;
        let logits = model.forward(&batch.input_ids, Some(&batch.attention_mask), Some(ckpt))?;
        let loss = causal_lm_loss(&logits, &batch.labels)?;
        drop(logits);
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::Data(format!("the loss is {value}")));
        }
        // One call: `loss.backward()` cannot see the checkpointed layers' gradients.
        let grads = ckpt.backward(&loss)?;
        tokens += batch.tokens;
        micro.push((value, grads, batch.targets));
    }
    if micro.len() == 1
        && let Some((value, grads, _)) = micro.pop()
    {
        return Ok((value, grads, tokens));
    }
    let targets: usize = micro.iter().map(|(_, _, t)| t).sum();
    #[allow(clippy::cast_precision_loss)]
    let total = targets.max(1) as f64;
    let (mut loss, mut sum) = (0.0f64, GradStore::default());
    for (value, grads, t) in micro {
        #[allow(clippy::cast_precision_loss)]
        let weight = t as f64 / total;
        loss += f64::from(value) * weight;
        for id in grads.get_ids().copied().collect::<Vec<_>>() {
            let Some(g) = grads.get_id(id) else { continue };
            let g = (g.to_dtype(DType::F32)? * weight)?;
            let g = match sum.get_id(id) {
                Some(acc) => (acc + g)?,
                None => g,
            };
            sum.insert_id(id, g);
        }
    }
    #[allow(clippy::cast_possible_truncation)]
    Ok((loss as f32, sum, tokens))
}

/// Prints the plans a budget policy made since the last call: one per stack length and batch
/// size bucket, each measured on the largest batch of its bucket (nothing without a budget).
fn print_new_budget_plans(ckpt: &Checkpointer, progress: &Progress, printed: &mut Vec<String>) {
    for plan in ckpt.budget_plans() {
        let text = plan.to_string();
        if !printed.contains(&text) {
            progress.clear_line();
            eprintln!("budget plan (measured on the largest batch of its size bucket):\n{text}");
            printed.push(text);
        }
    }
}

/// AdamW ([`checkpoint_ops::AdamW`]: in place, f32 moments, f32 master copies of bf16/f16
/// parameters) with decoupled weight decay on matrices only and global-norm gradient clipping,
/// as one [`Optimizer`], so that one `ckpt.backward_step(&mut opt, &loss)` steps every
/// parameter.
///
/// The clip is folded into the update: every gradient is multiplied by the clip factor in f32
/// inside the step, so a half-precision gradient is not rounded a second time, and no scaled
/// copy is made. Gradients may be f32 for any parameter (accumulated ones, say).
#[derive(Debug)]
pub struct ClippedAdamW {
    /// Matrices: decayed.
    decayed: AdamW,
    /// Vectors (norms, biases): not decayed.
    plain: AdamW,
    vars: Vec<Var>,
    clip: f64,
    last_norm: f64,
}

/// The settings of a [`ClippedAdamW`].
#[derive(Debug, Clone)]
pub struct ClippedAdamWConfig {
    /// AdamW's settings; `weight_decay` applies to matrices only.
    pub adamw: ParamsAdamW,
    /// Global gradient-norm bound (0: no clipping).
    pub clip: f64,
}

impl ClippedAdamW {
    /// The global gradient norm of the last step, before clipping.
    #[must_use]
    pub fn last_norm(&self) -> f64 {
        self.last_norm
    }

    /// Optimizer steps taken.
    #[must_use]
    pub fn step_count(&self) -> u32 {
        self.decayed.step_count()
    }

    /// The AdamW state of `var` (see [`AdamW::state`]): f32 rows `[m, v]`, plus the f32 master
    /// row of a half-precision parameter.
    #[must_use]
    pub fn state(&self, var: &Var) -> Option<&Tensor> {
        self.decayed.state(var).or_else(|| self.plain.state(var))
    }

    /// The f32 master copy of `var` (flattened) if it is a half-precision parameter.
    ///
    /// # Errors
    /// If candle cannot take the row.
    pub fn master(&self, var: &Var) -> candle_core::Result<Option<Tensor>> {
        match self.decayed.master(var)? {
            Some(m) => Ok(Some(m)),
            None => self.plain.master(var),
        }
    }

    /// Continues from saved states (see [`AdamW::restore`]) after `step` steps.
    ///
    /// # Errors
    /// A state of the wrong shape or dtype, or a variable not optimized here.
    pub fn restore(&mut self, step: u32, states: Vec<(&Var, Tensor)>) -> candle_core::Result<()> {
        let (matrices, vectors): (Vec<_>, Vec<_>) =
            states.into_iter().partition(|(v, _)| v.rank() >= 2);
        self.decayed.restore(step, matrices)?;
        self.plain.restore(step, vectors)
    }
}

impl Optimizer for ClippedAdamW {
    type Config = ClippedAdamWConfig;

    fn new(vars: Vec<Var>, config: ClippedAdamWConfig) -> candle_core::Result<Self> {
        let (matrices, vectors): (Vec<Var>, Vec<Var>) =
            vars.iter().cloned().partition(|v| v.rank() >= 2);
        let plain = ParamsAdamW {
            weight_decay: 0.0,
            ..config.adamw
        };
        Ok(Self {
            decayed: AdamW::new(matrices, config.adamw)?,
            plain: AdamW::new(vectors, plain)?,
            vars,
            clip: config.clip,
            last_norm: 0.0,
        })
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let norm = grad_norm(grads, &self.vars)?;
        self.last_norm = norm;
        let scale = clip_scale(norm, self.clip);
        self.decayed.step_scaled(grads, scale)?;
        self.plain.step_scaled(grads, scale)
    }

    fn learning_rate(&self) -> f64 {
        self.decayed.learning_rate()
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.decayed.set_learning_rate(lr);
        self.plain.set_learning_rate(lr);
    }
}

/// The global L2 norm of the gradients of `vars` (in f32), 0 without any.
///
/// # Errors
/// If candle cannot compute it.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> candle_core::Result<f64> {
    let mut squares = Vec::with_capacity(vars.len());
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            squares.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
        }
    }
    if squares.is_empty() {
        return Ok(0.0);
    }
    Ok(f64::from(Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f32>()?).sqrt())
}

/// The factor that brings a gradient of global norm `norm` within `max_norm` (`0`: no clipping).
#[must_use]
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Scales the gradients of `vars` so that their global L2 norm is at most `max_norm`
/// (`0`: no clipping), in their own dtype. Returns the norm before clipping.
/// [`ClippedAdamW`] folds the factor into its update instead.
///
/// # Errors
/// If candle cannot compute the norm.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    vars: &[Var],
    max_norm: f64,
) -> candle_core::Result<f64> {
    let norm = grad_norm(grads, vars)?;
    let scale = clip_scale(norm, max_norm);
    if scale != 1.0 {
        for var in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// The process's resident memory now, in bytes (Linux: `/proc/self/status`, `VmRSS`).
#[must_use]
pub fn rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

/// The process's peak resident memory, in bytes (Linux: `/proc/self/status`, `VmHWM`).
#[must_use]
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Memory in use on the CUDA device (device-wide: `total − free`); `None` on the CPU.
#[must_use]
pub fn gpu_used_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        let cuda = device.as_cuda_device().ok()?;
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        u64::try_from(total.saturating_sub(free)).ok()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// `123.4 MiB`, or `n/a`.
#[must_use]
pub fn fmt_bytes(bytes: Option<u64>) -> String {
    #[allow(clippy::cast_precision_loss)]
    bytes.map_or_else(
        || "n/a".to_owned(),
        |b| format!("{:.1} MiB", b as f64 / 1048576.0),
    )
}

/// A one-line progress bar on a terminal, one line per step otherwise. Dropping it ends the
/// bar's line, so that what follows (the summary, or an error) starts on a line of its own.
struct Progress {
    total: usize,
    tty: bool,
    drawn: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            total,
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    fn update(
        &mut self,
        step: usize,
        loss: f32,
        lr: f64,
        norm: f64,
        tokens_per_s: f64,
        gpu: Option<u64>,
    ) {
        const WIDTH: usize = 20;
        let filled = (step * WIDTH).checked_div(self.total).unwrap_or(WIDTH);
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(WIDTH - filled));
        let tps = tokens_per_s;
        let line = format!(
            "[{bar}] step {step:>4}/{} loss {loss:.4} lr {lr:.2e} |g| {norm:.2} {tps:.0} tok/s rss {}{}",
            self.total,
            fmt_bytes(rss_bytes()),
            gpu.map_or_else(String::new, |g| format!(" gpu {}", fmt_bytes(Some(g))))
        );
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r{line}\x1b[K")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
        self.drawn = true;
    }

    /// Clears the progress line on a terminal so that other output starts on a clean line.
    fn clear_line(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.tty && self.drawn {
            eprintln!();
        }
    }
}
