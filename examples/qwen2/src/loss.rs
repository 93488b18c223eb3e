//! The causal language-modelling loss as transformers computes it (`ForCausalLMLoss`): the
//! labels are shifted by one inside (position `i` predicts label `i + 1`), positions whose label
//! is `-100` are ignored, and the loss is the mean token cross-entropy over the counted tokens,
//! in f32.

use candle_core::{D, DType, Result, Tensor};

/// The label value that is not counted (padding).
pub const IGNORE_INDEX: i64 = -100;

/// Mean shifted cross-entropy, a scalar f32 tensor.
///
/// `logits`: `(b, t, vocab)`, any float dtype. `labels`: `(b, t)`, integer (`-100` = ignore).
///
/// # Errors
/// On a shape mismatch, a label outside the vocabulary, or a batch without a single counted
/// token (the mean would be 0/0).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, vocab) = logits.dims3()?;
    let (lb, lt) = labels.dims2()?;
    if (lb, lt) != (b, t) {
        candle_core::bail!("labels have shape ({lb}, {lt}), the logits ({b}, {t}, {vocab})");
    }
    if t < 2 {
        candle_core::bail!("a sequence of {t} token(s) has nothing to predict: use t >= 2");
    }
    let n = b * (t - 1);
    let targets: Vec<i64> = labels
        .narrow(1, 1, t - 1)? // (b, t - 1): the label of position i is labels[i + 1]
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1()?;
    let mut index = Vec::with_capacity(n);
    let mut weight = Vec::with_capacity(n);
    for &y in &targets {
        if y == IGNORE_INDEX {
            index.push(0u32);
            weight.push(0f32);
        } else {
            match u32::try_from(y) {
                Ok(id) if (id as usize) < vocab => {
                    index.push(id);
                    weight.push(1.0);
                }
                _ => candle_core::bail!(
                    "label {y} is outside the vocabulary (0..{vocab}); use -100 for ignored positions"
                ),
            }
        }
    }
    let count = weight.iter().filter(|&&w| w > 0.0).count();
    if count == 0 {
        candle_core::bail!("every label is -100: the batch has no token to predict");
    }
    let device = logits.device();
    let index = Tensor::from_vec(index, (n, 1), device)?;
    let weight = Tensor::from_vec(weight, n, device)?;
    let logits = logits
        .narrow(1, 0, t - 1)? // (b, t - 1, vocab)
        .reshape((n, vocab))?
        .to_dtype(DType::F32)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?; // (n, vocab)
    let picked = log_probs.gather(&index, 1)?.squeeze(1)?; // (n,)
    #[allow(clippy::cast_precision_loss)]
    let count = count as f64;
    (picked * weight)?.sum_all()?.neg()? / count
}
