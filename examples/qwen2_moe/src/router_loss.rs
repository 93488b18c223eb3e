//! The load-balancing loss of the routers, exactly as transformers' `load_balancing_loss_func`
//! computes it (Switch Transformer, eqs. 4–6), and the total training loss
//! `cross-entropy + router_aux_loss_coef · aux`.
//!
//! Over the router logits of every sparse layer (tokens of all layers pooled), with padding
//! excluded by the attention mask:
//! `aux = E · Σ_e f_e · P_e`, where `f_e` is the share of (token, slot) choices that picked
//! expert `e` (summed over the k slots, each slot's share over the unmasked tokens; no gradient)
//! and `P_e` the mean router probability of `e` over the unmasked tokens.

use candle_core::{D, DType, Result, Tensor};

use crate::router::top_k;

/// The load-balancing loss, a scalar f32 tensor.
///
/// `router_logits`: one `(b·t, experts)` tensor per sparse layer. `attention_mask`: `(b, t)`,
/// 1 for tokens and 0 for padding (any numeric dtype), `None` when every position counts.
///
/// # Errors
/// On misshapen inputs, no router logits, or a mask without a single token.
pub fn load_balancing_loss(
    router_logits: &[Tensor],
    num_experts: usize,
    top_k_experts: usize,
    attention_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let Some(first) = router_logits.first() else {
        candle_core::bail!(
            "load_balancing_loss: no router logits (the model has no sparse layer); leave the \
             router loss out"
        );
    };
    let device = first.device();
    let layers = router_logits.len();
    let logits = Tensor::cat(router_logits, 0)?.to_dtype(DType::F32)?; // (L·n, E)
    let (rows, experts) = logits.dims2()?;
    if experts != num_experts {
        candle_core::bail!(
            "load_balancing_loss: router logits have {experts} columns, the config {num_experts} \
             experts"
        );
    }
    let probs = candle_nn::ops::softmax(&logits, D::Minus1)?; // (L·n, E)
    // Which experts each row chose: a constant 0/1 matrix (no gradient, as one_hot in torch).
    let chosen = top_k(&probs, top_k_experts)?;
    let mut picked = vec![0f32; rows * experts];
    for (i, row) in chosen.iter().enumerate() {
        for &e in row {
            picked[i * experts + e as usize] = 1.0;
        }
    }
    let picked = Tensor::from_vec(picked, (rows, experts), device)?;
    // Token weights (L·n, 1): the mask repeated for every layer (layer-major, as torch.cat).
    let weight = match attention_mask {
        Some(mask) => {
            let mask = mask.to_dtype(DType::F32)?.flatten_all()?; // (n,)
            if mask.dim(0)? * layers != rows {
                candle_core::bail!(
                    "load_balancing_loss: {layers} layers of router logits have {rows} rows, but \
                     the attention mask has {} tokens per layer",
                    mask.dim(0)?
                );
            }
            Tensor::cat(&vec![mask; layers], 0)?.unsqueeze(1)? // (L·n, 1)
        }
        None => Tensor::ones((rows, 1), DType::F32, device)?,
    };
    let count = weight.sum_all()?.to_scalar::<f32>()?;
    if count == 0.0 {
        candle_core::bail!(
            "load_balancing_loss: the attention mask has no token (all padding); drop that batch"
        );
    }
    let count = f64::from(count);
    let tokens_per_expert = (picked.broadcast_mul(&weight)?.sum(0)? / count)?; // (E,)
    let prob_per_expert = (probs.broadcast_mul(&weight)?.sum(0)? / count)?; // (E,)
    #[allow(clippy::cast_precision_loss)]
    let scale = num_experts as f64;
    (tokens_per_expert * prob_per_expert)?.sum_all()? * scale
}

/// Cross-entropy (shifted, `-100` ignored; [`qwen2::loss::causal_lm_loss`]) plus
/// `coef ·` [`load_balancing_loss`]: `(total, cross-entropy, aux)`, scalar f32 tensors.
///
/// # Errors
/// As the two losses.
pub fn total_loss(
    logits: &Tensor,
    labels: &Tensor,
    router_logits: &[Tensor],
    cfg: &crate::Config,
    attention_mask: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let ce = qwen2::loss::causal_lm_loss(logits, labels)?;
    let aux = load_balancing_loss(
        router_logits,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        attention_mask,
    )?;
    let total = (&ce + (&aux * cfg.router_aux_loss_coef)?)?;
    Ok((total, ce, aux))
}
