//! The training loop: `qwen2`'s data, schedule ([`TrainConfig`]) and optimizer
//! ([`ClippedAdamW`]), with the Qwen2-MoE loss (cross-entropy + coef · load balancing).

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use checkpoint_runtime::{Checkpointer, GradientAudit, Mode, Stats};
use qwen2::data::{DataOptions, Dataset, Example};
use qwen2::tokenizer::Tokenizer;
use qwen2::train::{ClippedAdamW, ClippedAdamWConfig, TrainConfig};
use qwen2::{Error, Result};

use crate::model::Qwen2Moe;
use crate::router_loss::total_loss;

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The checkpoint mode.
    pub mode: Mode,
    /// Total loss (cross-entropy + coef · aux) of every step.
    pub losses: Vec<f32>,
    /// The load-balancing loss of every step.
    pub aux_losses: Vec<f32>,
    /// Non-padding tokens trained on.
    pub tokens: usize,
    /// Time in forward, backward and optimizer steps.
    pub elapsed: Duration,
    /// What the engine did over the run.
    pub stats: Stats,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ends = |v: &[f32]| {
            (
                v.first().copied().unwrap_or(f32::NAN),
                v.last().copied().unwrap_or(f32::NAN),
            )
        };
        let (first, last) = ends(&self.losses);
        let (aux_first, aux_last) = ends(&self.aux_losses);
        writeln!(
            f,
            "loss {first:.4} -> {last:.4} (load balancing {aux_first:.4} -> {aux_last:.4})"
        )?;
        #[allow(clippy::cast_precision_loss)]
        let tps = self.tokens as f64 / self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "{} steps, {} tokens in {:.1} s: {tps:.0} tokens/s",
            self.losses.len(),
            self.tokens,
            self.elapsed.as_secs_f64(),
        )?;
        writeln!(f, "checkpoint mode: {}", self.mode)?;
        write!(f, "{}", self.stats)
    }
}

/// Trains `model` (whose parameters are `params`) on batches from `data` through `ckpt`,
/// printing one line per step to stderr and the [`GradientAudit`] after the first.
///
/// # Errors
/// A candle or engine error (naming the layer), a non-finite loss, or a parameter that
/// receives no gradient on the first step.
pub fn train(
    model: &Qwen2Moe,
    params: &[(String, Var)],
    data: &mut Dataset,
    ckpt: &Checkpointer,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<Summary> {
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
    let (mut losses, mut aux_losses) = (Vec::new(), Vec::new());
    let mut tokens = 0;
    let started = Instant::now();
    let _ = ckpt.take_stats();
    let mut stats = Stats::default();
    for step in 0..cfg.steps {
        let lr = cfg.lr_at(step);
        opt.set_learning_rate(lr);
        let batch = data.sample(cfg.batch, device)?;
        let mask = Some(&batch.attention_mask);
        let out = model.forward(&batch.input_ids, mask, Some(ckpt))?;
        let (loss, _, aux) = total_loss(
            &out.logits,
            &batch.labels,
            &out.router_logits,
            model.config(),
            mask,
        )?;
        drop(out);
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let aux = aux.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::Data(format!(
                "step {step}: the loss is {value}; lower --lr (now {lr:.2e})"
            )));
        }
        let grads = ckpt.backward_step(&mut opt, &loss)?;
        if step == 0 {
            let audit = GradientAudit::of_named(&grads, params.iter().map(|(n, v)| (n, v)))?;
            eprintln!("{audit} (mode {})", ckpt.mode());
            audit.into_result()?;
        }
        tokens += batch.tokens;
        losses.push(value);
        aux_losses.push(aux);
        stats.merge(&ckpt.take_stats());
        eprintln!(
            "step {:>4}/{}: loss {value:.4} (load balancing {aux:.4}), lr {lr:.2e}",
            step + 1,
            cfg.steps
        );
    }
    Ok(Summary {
        mode: ckpt.mode(),
        losses,
        aux_losses,
        tokens,
        elapsed: started.elapsed(),
        stats,
    })
}

/// Folds byte ids (from [`Tokenizer::bytes`](qwen2::tokenizer::Tokenizer::bytes)) into a
/// vocabulary of fewer than 256 entries, `byte % vocab_size`, labels alike (`-100` stays): for
/// the small checkpoints of the tests (a 96-token vocabulary), which have no tokenizer. Ids
/// already below `vocab_size` are kept, so a vocabulary of 256 or more changes nothing.
///
/// # Errors
/// [`Error::Data`] for an empty vocabulary.
pub fn fold_bytes(examples: &mut [Example], vocab_size: usize) -> Result<()> {
    let vocab = u32::try_from(vocab_size).unwrap_or(u32::MAX);
    if vocab == 0 {
        return Err(Error::Data(
            "byte ids cannot be folded into an empty vocabulary (vocab_size 0)".into(),
        ));
    }
    for example in examples {
        for id in &mut example.ids {
            *id %= vocab;
        }
        for label in &mut example.labels {
            if *label >= 0 {
                *label %= i64::from(vocab);
            }
        }
    }
    Ok(())
}

/// A training set from `text` for any vocabulary: its bytes, in paragraphs (blank-line
/// separated) cut into rows of at most `seq_len` tokens, folded into the vocabulary
/// ([`fold_bytes`]).
///
/// # Errors
/// As [`Dataset::new`]: an empty text, or `seq_len` below 2; an empty vocabulary.
pub fn folded_bytes(text: &str, seq_len: usize, vocab_size: usize, seed: u64) -> Result<Dataset> {
    let mut examples = qwen2::data::text_examples(text, &Tokenizer::bytes(), seq_len)?;
    fold_bytes(&mut examples, vocab_size)?;
    Dataset::new(examples, &DataOptions::rows(seq_len, vocab_size, seed))
}
