//! Checking this implementation against another one: run the batch stored in a reference file
//! and compare logits, loss and every parameter gradient by relative error ‖ours − ref‖ / ‖ref‖.
//!
//! The reference file (safetensors) holds `input_ids`, `attention_mask`, `labels` (each
//! `(b, t)` integer), `logits` `(b, t, vocab)`, `loss` `(1,)` and `grad.<parameter name>` for every
//! parameter, under Hugging Face names; a tied head's gradient is folded into
//! `grad.model.embed_tokens.weight`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use checkpoint_runtime::{Checkpointer, Mode};

use crate::error::{Error, Result};
use crate::loader;
use crate::loss::causal_lm_loss;

/// Tolerance on the relative error of the logits and the loss.
pub const OUTPUT_TOLERANCE: f64 = 1e-5;
/// Tolerance on the relative error of each gradient.
pub const GRAD_TOLERANCE: f64 = 1e-4;

/// One compared tensor.
#[derive(Debug, Clone)]
pub struct Check {
    /// `logits`, `loss`, or `grad.<parameter name>`.
    pub name: String,
    /// ‖ours − ref‖ / ‖ref‖ (infinite when we have no such tensor).
    pub rel_err: f64,
    /// The bound it must stay below.
    pub tolerance: f64,
}

impl Check {
    /// Compares `ours` with `reference` under `tolerance`, as `name`.
    ///
    /// # Errors
    /// [`Error::Data`] when the shapes differ (the reference was made for another model).
    pub fn compare(name: &str, ours: &Tensor, reference: &Tensor, tolerance: f64) -> Result<Self> {
        if ours.dims() != reference.dims() {
            return Err(Error::Data(format!(
                "`{name}`: ours has shape {:?}, the reference {:?}; the reference was made for \
                 another model or configuration",
                ours.dims(),
                reference.dims()
            )));
        }
        Ok(Self {
            name: name.to_owned(),
            rel_err: rel_err(ours, reference)?,
            tolerance,
        })
    }

    /// Whether the tensor is within its tolerance.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tolerance
    }
}

/// The comparison of one run with a reference.
#[derive(Debug, Clone)]
pub struct Report {
    /// The checkpoint mode the model ran in.
    pub mode: Mode,
    /// Logits, loss, then the gradients in the model's parameter order.
    pub checks: Vec<Check>,
}

impl Report {
    /// `Ok` when every tensor is within tolerance; otherwise [`Error::Verify`] naming the worst.
    ///
    /// # Errors
    /// See above.
    pub fn ok(&self) -> Result<()> {
        let failed: Vec<&Check> = self.checks.iter().filter(|c| !c.passed()).collect();
        let worst = failed
            .iter()
            .max_by(|a, b| (a.rel_err / a.tolerance).total_cmp(&(b.rel_err / b.tolerance)));
        match worst {
            None => Ok(()),
            Some(w) => Err(Error::Verify {
                count: failed.len(),
                worst: w.name.clone(),
                rel_err: w.rel_err,
                tolerance: w.tolerance,
            }),
        }
    }

    /// The largest relative error among the gradients.
    #[must_use]
    pub fn worst_grad(&self) -> Option<&Check> {
        self.checks
            .iter()
            .filter(|c| c.name.starts_with("grad."))
            .max_by(|a, b| a.rel_err.total_cmp(&b.rel_err))
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "mode {}", self.mode)?;
        writeln!(
            f,
            "{:<58} {:>11} {:>9}  ",
            "tensor", "rel. error", "tolerance"
        )?;
        for c in &self.checks {
            writeln!(
                f,
                "{:<58} {:>11.3e} {:>9.0e}  {}",
                c.name,
                c.rel_err,
                c.tolerance,
                if c.passed() { "ok" } else { "FAIL" }
            )?;
        }
        Ok(())
    }
}

/// Loads the checkpoint in `model_dir` in f32 on `device`, runs the reference batch through it
/// with the engine `ckpt` (any mode and policy: a budget policy probes on this, its first step),
/// and compares.
///
/// # Errors
/// Loader errors, a reference file lacking a tensor, a gradient the reference has for a
/// parameter the model lacks (or the other way round), candle or engine errors.
pub fn verify(
    model_dir: &Path,
    reference: &Path,
    ckpt: &Checkpointer,
    device: &Device,
) -> Result<Report> {
    let loaded = loader::load(model_dir, DType::F32, device)?;
    let refs = candle_core::safetensors::load(reference, device).map_err(|e| {
        Error::Data(format!(
            "{}: not a readable safetensors file: {e}",
            reference.display()
        ))
    })?;
    let get = |name: &str| {
        refs.get(name).ok_or_else(|| {
            Error::Data(format!(
                "{} has no tensor `{name}`: a reference file holds input_ids, attention_mask, \
                 labels, logits, loss and grad.<parameter> tensors",
                reference.display()
            ))
        })
    };
    let input_ids = get("input_ids")?.to_dtype(DType::U32)?;
    let attention_mask = get("attention_mask")?;
    let labels = get("labels")?;

    let logits = loaded
        .model
        .forward(&input_ids, Some(attention_mask), Some(ckpt))?;
    let loss = causal_lm_loss(&logits, labels)?;
    let grads = ckpt.backward(&loss)?;

    let mut checks = vec![
        Check::compare("logits", &logits, get("logits")?, OUTPUT_TOLERANCE)?,
        Check::compare("loss", &loss.reshape(1)?, get("loss")?, OUTPUT_TOLERANCE)?,
    ];
    let ours: HashMap<&str, _> = loaded.params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    for (name, var) in &loaded.params {
        let key = format!("grad.{name}");
        let reference_grad = get(&key)?;
        checks.push(match grads.get(var.as_tensor()) {
            Some(g) => Check::compare(&key, g, reference_grad, GRAD_TOLERANCE)?,
            // A parameter without a gradient fails its check rather than the whole run.
            None => Check {
                name: key,
                rel_err: f64::INFINITY,
                tolerance: GRAD_TOLERANCE,
            },
        });
    }
    let mut extra: Vec<&str> = refs
        .keys()
        .filter_map(|k| k.strip_prefix("grad."))
        .filter(|n| !ours.contains_key(n))
        .collect();
    if !extra.is_empty() {
        extra.sort_unstable();
        return Err(Error::Data(format!(
            "{} has gradients for parameters the model does not have: {} (tied head vs \
             tie_word_embeddings?)",
            reference.display(),
            extra.join(", ")
        )));
    }
    Ok(Report {
        mode: ckpt.mode(),
        checks,
    })
}

/// ‖a − b‖ / ‖b‖ in f64 (‖a − b‖ when `b` is zero).
///
/// # Errors
/// If the shapes differ.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let num = (a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if den == 0.0 { num } else { num / den })
}
