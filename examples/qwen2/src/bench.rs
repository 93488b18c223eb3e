//! One full training step, timed phase by phase: forward, backward through the engine, global
//! gradient-norm clipping and AdamW. The step benchmark (`cargo bench -p qwen2 --bench step`)
//! and `scripts/torch_step.py` run this same work, so that their times compare.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use checkpoint_runtime::{Checkpointer, Policy};
//! use qwen2::bench::{TrainStep, bench_config, random_batch};
//!
//! # fn main() -> qwen2::Result<()> {
//! let dev = Device::Cpu;
//! let cfg = bench_config(8);
//! let loaded = qwen2::loader::random(&cfg, 1, DType::F32, &dev)?;
//! let batch = random_batch(4, 256, cfg.vocab_size, 7, &dev)?;
//! let mut step = TrainStep::new(&loaded.params, 1e-4, 0.1, 1.0)?;
//! let ckpt = Checkpointer::new(Policy::recompute());
//! let times = step.run(&loaded.model, &batch, &ckpt, || {})?;
//! println!("{:.3} s", times.total().as_secs_f64());
//! # Ok(())
//! # }
//! ```

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use checkpoint_runtime::Checkpointer;

use crate::config::Config;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::loss::causal_lm_loss;
use crate::model::Qwen2;
use crate::train::{ClippedAdamW, ClippedAdamWConfig};

/// The shape of the speed comparison with PyTorch: hidden 512, 8 query heads over 2 key/value
/// heads (head width 64), MLP 1408, vocabulary 4096, an untied output head, `layers` decoder
/// layers. `scripts/torch_step.py` builds the same model with transformers.
#[must_use]
pub fn bench_config(layers: usize) -> Config {
    Config {
        vocab_size: 4096,
        hidden_size: 512,
        intermediate_size: 1408,
        num_hidden_layers: layers,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        head_dim: 64,
        max_position_embeddings: 32768,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        tie_word_embeddings: false,
        initializer_range: 0.02,
    }
}

/// `batch` rows of `seq` token ids drawn uniformly from `0..vocab` (seeded), no padding: every
/// position is a token and a label.
///
/// # Errors
/// If `batch`, `seq` or `vocab` is zero, `seq < 2` (nothing to predict), or candle cannot
/// build the tensors.
pub fn random_batch(
    batch: usize,
    seq: usize,
    vocab: usize,
    seed: u64,
    device: &Device,
) -> Result<Batch> {
    if batch == 0 || seq < 2 || vocab == 0 {
        return Err(Error::Data(format!(
            "a random batch of {batch} x {seq} tokens from a vocabulary of {vocab}: use a batch \
             of at least 1, a sequence of at least 2 and a non-empty vocabulary"
        )));
    }
    let vocab = u64::try_from(vocab)
        .map_err(|_| Error::Data(format!("vocabulary of {vocab} entries: too large")))?;
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| {
            // xorshift64*: reproducible on every machine, no dependency.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
            #[allow(clippy::cast_possible_truncation)] // below `vocab`, itself from a usize
            let id = (r % vocab) as u32;
            id
        })
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (batch, seq), device)?,
        attention_mask: Tensor::ones((batch, seq), DType::U32, device)?,
        labels: Tensor::from_vec(labels, (batch, seq), device)?,
        tokens: batch * seq,
        // Every position but each row's first predicts the next token.
        targets: batch * (seq - 1),
    })
}

/// How long each phase of one step took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTimes {
    /// Embedding, decoder stack, head and loss.
    pub forward: Duration,
    /// [`Checkpointer::backward`]: the gradients, recomputed segments included.
    pub backward: Duration,
    /// Gradient-norm clipping and the AdamW updates.
    pub optimizer: Duration,
    /// The step's loss.
    pub loss: f32,
}

impl StepTimes {
    /// The whole step.
    #[must_use]
    pub fn total(&self) -> Duration {
        self.forward + self.backward + self.optimizer
    }
}

/// The optimizer state of a training run, and one step of it: the work of one iteration of
/// [`train::train`](crate::train::train) at a fixed learning rate (AdamW with decoupled weight
/// decay on matrices only, global-norm clipping), without data sampling or progress output.
pub struct TrainStep {
    opt: ClippedAdamW,
}

impl std::fmt::Debug for TrainStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainStep").finish_non_exhaustive()
    }
}

impl TrainStep {
    /// AdamW over `params` at learning rate `lr`, `weight_decay` on matrices, gradients
    /// clipped to global norm `clip` (`0`: no clipping): the training loop's own optimizer.
    ///
    /// # Errors
    /// If candle cannot allocate the optimizer state.
    pub fn new(params: &[(String, Var)], lr: f64, weight_decay: f64, clip: f64) -> Result<Self> {
        let opt = ClippedAdamW::new(
            params.iter().map(|(_, v)| v.clone()).collect(),
            ClippedAdamWConfig {
                adamw: ParamsAdamW {
                    lr,
                    weight_decay,
                    ..ParamsAdamW::default()
                },
                clip,
            },
        )?;
        Ok(Self { opt })
    }

    /// One step on `batch` through `ckpt`. `after_forward` runs once the loss is computed and
    /// before backward starts: the moment at which the step holds the most activations, for a
    /// caller that measures memory.
    ///
    /// # Errors
    /// A candle or engine error (naming the layer), or a non-finite loss.
    pub fn run(
        &mut self,
        model: &Qwen2,
        batch: &Batch,
        ckpt: &Checkpointer,
        after_forward: impl FnOnce(),
    ) -> Result<StepTimes> {
        let started = Instant::now();
        let logits = model.forward(&batch.input_ids, Some(&batch.attention_mask), Some(ckpt))?;
        let loss = causal_lm_loss(&logits, &batch.labels)?;
        drop(logits);
        let forward = started.elapsed();
        after_forward();

        let started = Instant::now();
        let grads = ckpt.backward(&loss)?;
        let backward = started.elapsed();
        let loss = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !loss.is_finite() {
            return Err(Error::Data(format!(
                "the loss is {loss}: the step diverged (mode {})",
                ckpt.mode()
            )));
        }

        let started = Instant::now();
        self.opt.step(&grads)?;
        drop(grads);
        Ok(StepTimes {
            forward,
            backward,
            optimizer: started.elapsed(),
            loss,
        })
    }
}

#[cfg(test)]
mod tests {
    use checkpoint_runtime::{Mode, Policy};

    use super::*;

    fn ids(batch: &Batch) -> Result<Vec<Vec<u32>>> {
        Ok(batch.input_ids.to_vec2::<u32>()?)
    }

    #[test]
    fn random_batch_is_seeded_in_range_and_unpadded() -> Result<()> {
        let dev = Device::Cpu;
        let a = random_batch(2, 5, 7, 3, &dev)?;
        assert_eq!(ids(&a)?, ids(&random_batch(2, 5, 7, 3, &dev)?)?);
        assert_ne!(ids(&a)?, ids(&random_batch(2, 5, 7, 4, &dev)?)?);
        assert!(ids(&a)?.iter().flatten().all(|&id| id < 7));
        assert_eq!(a.tokens, 10);
        assert_eq!(a.attention_mask.sum_all()?.to_scalar::<u32>()?, 10);
        let labels = a.labels.to_vec2::<i64>()?;
        let expected: Vec<Vec<i64>> = ids(&a)?
            .iter()
            .map(|row| row.iter().map(|&id| i64::from(id)).collect())
            .collect();
        assert_eq!(labels, expected);
        Ok(())
    }

    #[test]
    fn random_batch_refuses_shapes_with_nothing_to_predict() {
        let dev = Device::Cpu;
        assert!(random_batch(0, 5, 7, 1, &dev).is_err());
        assert!(random_batch(2, 1, 7, 1, &dev).is_err());
        assert!(random_batch(2, 5, 0, 1, &dev).is_err());
    }

    /// The step really trains: repeated on one batch, the loss falls, in every mode.
    #[test]
    fn train_step_lowers_the_loss_on_a_repeated_batch() -> Result<()> {
        let dev = Device::Cpu;
        let mut cfg = Config::tiny_bytes();
        cfg.num_hidden_layers = 2;
        for mode in [Mode::None, Mode::Recompute] {
            let loaded = crate::loader::random(&cfg, 5, DType::F32, &dev)?;
            let batch = random_batch(2, 16, cfg.vocab_size, 9, &dev)?;
            let ckpt = Checkpointer::new(Policy::new(mode));
            let mut step = TrainStep::new(&loaded.params, 1e-2, 0.0, 1.0)?;
            let mut forward_done = false;
            let first = step.run(&loaded.model, &batch, &ckpt, || forward_done = true)?;
            assert!(forward_done, "{mode}: after_forward was not called");
            let mut last = first;
            for _ in 0..4 {
                last = step.run(&loaded.model, &batch, &ckpt, || {})?;
            }
            assert!(
                last.loss < first.loss - 0.1,
                "{mode}: loss {} -> {}",
                first.loss,
                last.loss
            );
            assert!(first.total() >= first.forward);
        }
        Ok(())
    }
}
