//! Mean token cross-entropy over logits, computed a chunk of rows at a time: the forward keeps one
//! log-sum-exp per row, never a `(tokens, vocab)` f32 log-softmax; the backward writes
//! `softmax − onehot` straight into the gradient, chunk by chunk.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::kernel::{Float, check_float, slice, storage, with_float};

const OP: &str = "cross_entropy";

/// The target value of a row that is not counted (padding, prompt tokens).
pub const IGNORE_INDEX: i64 = -100;

/// Rows per chunk: the unit of work of one task. Rows are independent, so the result does not
/// depend on it.
const ROWS_PER_CHUNK: usize = 4;

/// Mean cross-entropy `mean_i (logsumexp(logits[i]) − logits[i, targets[i]])` over the rows whose
/// target is not [`IGNORE_INDEX`], a scalar f32 tensor.
///
/// `logits`: `(n, vocab)`, f32, bf16 or f16 (read as f32). `targets`: `(n,)`, an integer dtype,
/// each in `0..vocab` or [`IGNORE_INDEX`]. Each row's log-sum-exp is computed in f32 (maximum,
/// then the sum of exponentials in order) and kept for the backward; the per-row losses are
/// summed in row order in f64. The result is the same for any thread count.
///
/// The gradient flows to `logits`, in their dtype: `(softmax − onehot) · g / count` for counted
/// rows, zero for ignored ones.
///
/// On a device other than the CPU this is the composite `log_softmax` and `gather`.
///
/// # Errors
/// If the shapes do not match, a target is outside the vocabulary and not `-100`, every target
/// is `-100` (the mean would be 0/0), or a dtype is not supported.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_float(OP, "logits", logits)?;
    let (n, vocab) = match logits.dims() {
        &[n, vocab] => (n, vocab),
        other => bail!(
            "{OP}: `logits` has shape {other:?}; it must be (tokens, vocab) (flatten the batch \
             with `reshape`)"
        ),
    };
    if targets.dims() != [n] {
        bail!(
            "{OP}: `targets` has shape {:?} but the logits have {n} rows; it must be ({n},)",
            targets.dims()
        )
    }
    if !targets.dtype().is_int() {
        bail!(
            "{OP}: `targets` has dtype {:?}; use an integer dtype (u32 or i64)",
            targets.dtype()
        )
    }
    let targets: Vec<i64> = targets.to_dtype(DType::I64)?.to_vec1()?;
    let mut count = 0usize;
    for (row, &y) in targets.iter().enumerate() {
        if y == IGNORE_INDEX {
            continue;
        }
        if !usize::try_from(y).is_ok_and(|y| y < vocab) {
            bail!(
                "{OP}: target {y} (row {row}) is outside the vocabulary 0..{vocab}; use \
                 {IGNORE_INDEX} for rows that are not counted"
            )
        }
        count += 1;
    }
    if count == 0 {
        bail!("{OP}: every target is {IGNORE_INDEX}: there is no token to predict")
    }
    if !logits.device().is_cpu() {
        return composite(logits, &targets, count);
    }
    logits
        .contiguous()?
        .apply_op1_arc(Arc::new(Box::new(CrossEntropy {
            targets,
            count,
            logsumexp: OnceLock::new(),
        })))
}

/// The plain candle ops (for devices without a kernel here).
fn composite(logits: &Tensor, targets: &[i64], count: usize) -> Result<Tensor> {
    let device = logits.device();
    let (index, weight): (Vec<u32>, Vec<f32>) = targets
        .iter()
        .map(|&y| match u32::try_from(y) {
            Ok(id) => (id, 1.0),
            Err(_) => (0, 0.0),
        })
        .unzip();
    let n = targets.len();
    let index = Tensor::from_vec(index, (n, 1), device)?;
    let weight = Tensor::from_vec(weight, n, device)?;
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = log_probs.gather(&index, 1)?.squeeze(1)?;
    #[allow(clippy::cast_precision_loss)]
    let count = count as f64;
    (picked * weight)?.sum_all()?.neg()? / count
}

#[derive(Debug)]
struct CrossEntropy {
    targets: Vec<i64>,
    count: usize,
    /// Each row's log-sum-exp, written by the forward and read by the backward: `n` floats.
    logsumexp: OnceLock<Vec<f32>>,
}

/// `log Σ exp(row)`, in f32, summed in order.
#[inline]
fn logsumexp<T: Float>(row: &[T]) -> f32 {
    let max = row
        .iter()
        .map(|v| v.to_f32())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|v| (v.to_f32() - max).exp()).sum();
    max + sum.ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, ls: &CpuStorage, ll: &Layout) -> Result<(CpuStorage, Shape)> {
        let vocab = *ll.dims().last().unwrap_or(&0);
        with_float!(OP, ls.dtype(), T => {
            let logits = slice::<T>(OP, ls, ll)?;
            let mut lse = vec![0f32; self.targets.len()];
            lse.par_chunks_mut(ROWS_PER_CHUNK)
                .zip(logits.par_chunks(vocab * ROWS_PER_CHUNK))
                .for_each(|(lse, rows)| {
                    for (l, row) in lse.iter_mut().zip(rows.chunks(vocab)) {
                        *l = logsumexp(row);
                    }
                });
            let mut total = 0f64;
            for (row, (&y, &l)) in self.targets.iter().zip(&lse).enumerate() {
                if let Ok(y) = usize::try_from(y) {
                    total += f64::from(l - logits[row * vocab + y].to_f32());
                }
            }
            // A second forward of the same op (never done by candle) would keep the first.
            let _ = self.logsumexp.set(lse);
            #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
            let mean = (total / self.count as f64) as f32;
            Ok((storage(vec![mean]), Shape::from(())))
        })
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(lse) = self.logsumexp.get() else {
            bail!("{OP}: internal error, the backward ran before the forward")
        };
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        #[allow(clippy::cast_precision_loss)]
        let scale = g / self.count as f32;
        let op = CrossEntropyGrad {
            targets: &self.targets,
            logsumexp: lse,
            scale,
        };
        Ok(Some(logits.apply_op1_no_bwd(&op)?))
    }
}

/// `(softmax − onehot) · scale` for counted rows, zero for ignored ones.
#[derive(Debug)]
struct CrossEntropyGrad<'a> {
    targets: &'a [i64],
    logsumexp: &'a [f32],
    scale: f32,
}

impl CustomOp1 for CrossEntropyGrad<'_> {
    fn name(&self) -> &'static str {
        "cross_entropy (backward)"
    }

    fn cpu_fwd(&self, ls: &CpuStorage, ll: &Layout) -> Result<(CpuStorage, Shape)> {
        let vocab = *ll.dims().last().unwrap_or(&0);
        with_float!(OP, ls.dtype(), T => {
            let logits = slice::<T>(OP, ls, ll)?;
            let mut out = vec![T::from_f32(0.0); logits.len()];
            out.par_chunks_mut(vocab * ROWS_PER_CHUNK)
                .zip(logits.par_chunks(vocab * ROWS_PER_CHUNK))
                .zip(self.targets.par_chunks(ROWS_PER_CHUNK))
                .zip(self.logsumexp.par_chunks(ROWS_PER_CHUNK))
                .for_each(|(((out, rows), targets), lse)| {
                    let rows = out.chunks_mut(vocab).zip(rows.chunks(vocab));
                    for ((out, row), (&y, &lse)) in rows.zip(targets.iter().zip(lse)) {
                        let Ok(y) = usize::try_from(y) else {
                            continue; // ignored: the zeros stay
                        };
                        for (o, &v) in out.iter_mut().zip(row) {
                            *o = T::from_f32((v.to_f32() - lse).exp() * self.scale);
                        }
                        out[y] = T::from_f32(((row[y].to_f32() - lse).exp() - 1.0) * self.scale);
                    }
                });
            Ok((storage(out), ll.shape().clone()))
        })
    }
}
