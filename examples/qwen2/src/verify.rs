//! Checking this implementation against another one: run the batch stored in a reference file
//! and compare logits, loss and every parameter gradient by relative error ‖ours − ref‖ / ‖ref‖.
//!
//! The reference file (safetensors) holds `input_ids`, `attention_mask`, `labels` (each
//! `(b, t)` integer), `logits` `(b, t, vocab)`, `loss` `(1,)` and `grad.<parameter name>` for every
//! parameter, under Hugging Face names; a tied head's gradient is folded into
//! `grad.model.embed_tokens.weight`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
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

/// A reference file: the batch, the outputs and the gradients another implementation computed.
#[derive(Debug)]
pub struct Reference {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    /// What a reference file of this model holds, for the error on a missing tensor.
    holds: &'static str,
}

impl Reference {
    /// Reads `path` onto `device`; `holds` lists what such a file holds (for errors).
    ///
    /// # Errors
    /// [`Error::Data`] if it is not a readable safetensors file.
    pub fn load(path: &Path, device: &Device, holds: &'static str) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, device).map_err(|e| {
            Error::Data(format!(
                "{}: not a readable safetensors file: {e}",
                path.display()
            ))
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            holds,
        })
    }

    /// The tensor `name`.
    ///
    /// # Errors
    /// [`Error::Data`] naming it and what the file should hold, if it is missing.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            Error::Data(format!(
                "{} has no tensor `{name}`: {}",
                self.path.display(),
                self.holds
            ))
        })
    }

    /// Our `ours` against the file's tensor `name`, under `tolerance`.
    ///
    /// # Errors
    /// The file lacks `name`, or its shape differs from ours.
    pub fn check(&self, name: &str, ours: &Tensor, tolerance: f64) -> Result<Check> {
        Check::compare(name, ours, self.get(name)?, tolerance)
    }

    /// One check per parameter, `grad.<name>` against ours (a parameter without a gradient
    /// fails its check rather than the whole run).
    ///
    /// # Errors
    /// A parameter missing from the file or of another shape; a gradient in the file for a
    /// parameter the model does not have (`hint` says which setting may differ).
    pub fn gradient_checks(
        &self,
        params: &[(String, Var)],
        grads: &GradStore,
        hint: &str,
    ) -> Result<Vec<Check>> {
        let mut checks = Vec::with_capacity(params.len());
        for (name, var) in params {
            let key = format!("grad.{name}");
            let reference = self.get(&key)?;
            checks.push(match grads.get(var.as_tensor()) {
                Some(g) => Check::compare(&key, g, reference, GRAD_TOLERANCE)?,
                None => Check {
                    name: key,
                    rel_err: f64::INFINITY,
                    tolerance: GRAD_TOLERANCE,
                },
            });
        }
        let ours: HashSet<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        let mut extra: Vec<&str> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix("grad."))
            .filter(|n| !ours.contains(n))
            .collect();
        if !extra.is_empty() {
            extra.sort_unstable();
            return Err(Error::Data(format!(
                "{} has gradients for parameters the model does not have: {} ({hint})",
                self.path.display(),
                extra.join(", ")
            )));
        }
        Ok(checks)
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
    let refs = Reference::load(
        reference,
        device,
        "a reference file holds input_ids, attention_mask, labels, logits, loss and \
         grad.<parameter> tensors",
    )?;
    let input_ids = refs.get("input_ids")?.to_dtype(DType::U32)?;
    let attention_mask = refs.get("attention_mask")?;
    let labels = refs.get("labels")?;

    let logits = loaded
        .model
        .forward(&input_ids, Some(attention_mask), Some(ckpt))?;
    let loss = causal_lm_loss(&logits, labels)?;
    let grads = ckpt.backward(&loss)?;

    let mut checks = vec![
        refs.check("logits", &logits, OUTPUT_TOLERANCE)?,
        refs.check("loss", &loss.reshape(1)?, OUTPUT_TOLERANCE)?,
    ];
    checks.extend(refs.gradient_checks(
        &loaded.params,
        &grads,
        "tied head vs tie_word_embeddings?",
    )?);
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
