//! The causal language-modelling loss as transformers computes it (`ForCausalLMLoss`): the
//! labels are shifted by one inside (position `i` predicts label `i + 1`), positions whose label
//! is `-100` are ignored, and the loss is the mean token cross-entropy over the counted tokens,
//! in f32.
//!
//! Computed by the fused `checkpoint_ops::cross_entropy`, a chunk of rows at a time: no f32 copy
//! of the logits and no `(tokens, vocab)` log-softmax (with a 151,936-token vocabulary, each of
//! those is 0.6 MiB per token); the only vocabulary-sized allocation is the logits' gradient.

use candle_core::{DType, Result, Tensor};

/// The label value that is not counted (padding).
pub const IGNORE_INDEX: i64 = checkpoint_ops::IGNORE_INDEX;

/// Mean shifted cross-entropy, a scalar f32 tensor.
///
/// `logits`: `(b, t, vocab)`, f32, bf16 or f16. `labels`: `(b, t)`, integer (`-100` = ignore).
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
    // Row (i, j) of the flattened logits predicts labels[i, j + 1]; the last position of each
    // sequence predicts nothing. Shifting the targets instead of narrowing the logits keeps the
    // logits a free view (narrowing them would copy the whole tensor).
    let shifted = Tensor::cat(
        &[
            labels.narrow(1, 1, t - 1)?.to_dtype(DType::I64)?,
            Tensor::full(IGNORE_INDEX, (b, 1), labels.device())?,
        ],
        1,
    )?
    .flatten_all()?; // (b * t,)
    let logits = logits.reshape((b * t, vocab))?;
    checkpoint_ops::cross_entropy(&logits, &shifted)
}

#[cfg(test)]
mod tests {
    use candle_core::{D, DType, Device, Result, Tensor, Var};

    use super::*;

    /// The loss as this module computed it before the fused op: narrow, f32 copy, log-softmax,
    /// gather, weighted mean.
    fn composite_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let (b, t, vocab) = logits.dims3()?;
        let n = b * (t - 1);
        let targets: Vec<i64> = labels.narrow(1, 1, t - 1)?.flatten_all()?.to_vec1()?;
        let (index, weight): (Vec<u32>, Vec<f32>) = targets
            .iter()
            .map(|&y| u32::try_from(y).map_or((0, 0.0), |id| (id, 1.0)))
            .unzip();
        #[allow(clippy::cast_precision_loss)]
        let count = weight.iter().sum::<f32>() as f64;
        let device = logits.device();
        let index = Tensor::from_vec(index, (n, 1), device)?;
        let weight = Tensor::from_vec(weight, n, device)?;
        let logits = logits.narrow(1, 0, t - 1)?.reshape((n, vocab))?;
        let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let picked = log_probs.gather(&index, 1)?.squeeze(1)?;
        (picked * weight)?.sum_all()?.neg()? / count
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn fused_loss_and_gradient_equal_the_composite_loss() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, vocab) = (3, 7, 50);
        // Fixed, varied logits (not an unseeded `randn`): the tolerances below are a few f32
        // ulps of these values, and a test must not depend on the draw.
        #[allow(clippy::cast_precision_loss)]
        let values: Vec<f32> = (0..b * t * vocab)
            .map(|i| 3.0 * (i as f32 * 0.37).sin())
            .collect();
        let logits = Var::from_vec(values, (b, t, vocab), &dev)?;
        // Padding (-100) at the ends of two rows, and one in the middle.
        let labels: Vec<i64> = (0..b * t)
            .map(|i| match i {
                5 | 6 | 12 | 13 | 16 => IGNORE_INDEX,
                i => i64::try_from(i * 7 % vocab).unwrap_or(0),
            })
            .collect();
        let labels = Tensor::from_vec(labels, (b, t), &dev)?;

        let fused = causal_lm_loss(&logits, &labels)?;
        let reference = composite_loss(&logits, &labels)?;
        let (lf, lr) = (fused.to_scalar::<f32>()?, reference.to_scalar::<f32>()?);
        assert!((lf - lr).abs() <= 1e-6 * lr.abs(), "loss {lf} vs {lr}");

        let gf = fused.backward()?;
        let gr = reference.backward()?;
        let (gf, gr) = (gf.get(&logits), gr.get(&logits));
        let (Some(gf), Some(gr)) = (gf, gr) else {
            panic!("the logits received no gradient");
        };
        let diff = max_abs_diff(gf, gr)?;
        assert!(diff < 1e-7, "gradient max |diff| {diff}");
        Ok(())
    }

    #[test]
    fn a_batch_of_padding_only_is_refused() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((1, 3, 4), DType::F32, &dev)?;
        let labels = Tensor::full(IGNORE_INDEX, (1, 3), &dev)?;
        // The first line: candle appends a backtrace when RUST_BACKTRACE is set.
        let err = causal_lm_loss(&logits, &labels)
            .err()
            .map(|e| e.to_string().lines().next().unwrap_or_default().to_owned());
        assert_eq!(
            err.as_deref(),
            Some("cross_entropy: every target is -100: there is no token to predict")
        );
        Ok(())
    }
}
