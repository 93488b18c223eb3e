//! Checking this implementation against transformers: run the batch stored in a reference file
//! and compare logits, the load-balancing loss, the total loss and every parameter gradient by
//! relative error ‖ours − ref‖ / ‖ref‖ (reusing `qwen2::verify`'s report and tolerances).
//!
//! The reference file (safetensors) holds `input_ids`, `attention_mask`, `labels`, `logits`,
//! `aux_loss`, `loss` (cross-entropy + coef · aux) and `grad.<parameter name>` for every
//! parameter, under Hugging Face names.

use std::collections::HashSet;
use std::path::Path;

use candle_core::{DType, Device};
use checkpoint_runtime::Checkpointer;
use qwen2::verify::{Check, GRAD_TOLERANCE, OUTPUT_TOLERANCE, Report};
use qwen2::{Error, Result};

use crate::loader;
use crate::router_loss::total_loss;

/// Loads the checkpoint in `model_dir` in f32 on `device`, runs the reference batch through
/// it with the engine `ckpt` (any mode and policy), and compares.
///
/// # Errors
/// Loader errors, a reference file lacking a tensor or holding one of another shape, a
/// gradient the reference has for a parameter the model lacks, candle errors.
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
                "{} has no tensor `{name}`: a Qwen2-MoE reference file holds input_ids, \
                 attention_mask, labels, logits, aux_loss, loss and grad.<parameter> tensors",
                reference.display()
            ))
        })
    };
    let input_ids = get("input_ids")?.to_dtype(DType::U32)?;
    let attention_mask = get("attention_mask")?;
    let labels = get("labels")?;

    let model = &loaded.model;
    let out = model.forward(&input_ids, Some(attention_mask), Some(ckpt))?;
    let (loss, _, aux) = total_loss(
        &out.logits,
        labels,
        &out.router_logits,
        model.config(),
        Some(attention_mask),
    )?;
    let grads = ckpt.backward(&loss)?; // not loss.backward(): see Checkpointer

    let mut checks = vec![
        Check::compare("logits", &out.logits, get("logits")?, OUTPUT_TOLERANCE)?,
        Check::compare(
            "aux_loss",
            &aux.reshape(1)?,
            get("aux_loss")?,
            OUTPUT_TOLERANCE,
        )?,
        Check::compare("loss", &loss.reshape(1)?, get("loss")?, OUTPUT_TOLERANCE)?,
    ];
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
    let ours: HashSet<&str> = loaded.params.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<&str> = refs
        .keys()
        .filter_map(|k| k.strip_prefix("grad."))
        .filter(|n| !ours.contains(n))
        .collect();
    if !extra.is_empty() {
        extra.sort_unstable();
        return Err(Error::Data(format!(
            "{} has gradients for parameters the model does not have: {} (another \
             num_experts, mlp_only_layers or tie_word_embeddings?)",
            reference.display(),
            extra.join(", ")
        )));
    }
    Ok(Report {
        mode: ckpt.mode(),
        checks,
    })
}
