//! Checking this implementation against transformers: run the batch stored in a reference file
//! and compare logits, the load-balancing loss, the total loss and every parameter gradient by
//! relative error ‖ours − ref‖ / ‖ref‖ (reusing `qwen2::verify`'s report and tolerances).
//!
//! The reference file (safetensors) holds `input_ids`, `attention_mask`, `labels`, `logits`,
//! `aux_loss`, `loss` (cross-entropy + coef · aux) and `grad.<parameter name>` for every
//! parameter, under Hugging Face names.

use std::path::Path;

use candle_core::{DType, Device};
use checkpoint_runtime::Checkpointer;
use qwen2::Result;
use qwen2::verify::{OUTPUT_TOLERANCE, Reference, Report};

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
    let refs = Reference::load(
        reference,
        device,
        "a Qwen2-MoE reference file holds input_ids, attention_mask, labels, logits, aux_loss, \
         loss and grad.<parameter> tensors",
    )?;
    let input_ids = refs.get("input_ids")?.to_dtype(DType::U32)?;
    let attention_mask = refs.get("attention_mask")?;
    let labels = refs.get("labels")?;

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
        refs.check("logits", &out.logits, OUTPUT_TOLERANCE)?,
        refs.check("aux_loss", &aux.reshape(1)?, OUTPUT_TOLERANCE)?,
        refs.check("loss", &loss.reshape(1)?, OUTPUT_TOLERANCE)?,
    ];
    checks.extend(refs.gradient_checks(
        &loaded.params,
        &grads,
        "another num_experts, mlp_only_layers or tie_word_embeddings?",
    )?);
    Ok(Report {
        mode: ckpt.mode(),
        checks,
    })
}
