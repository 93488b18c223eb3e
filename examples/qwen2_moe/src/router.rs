//! The router (`mlp.gate`): a bias-free linear map from a token to one logit per expert, a
//! softmax in f32, and the top-k experts with their probabilities as weights
//! (Qwen2MoeTopKRouter).
//!
//! The choice of experts has no gradient; the weights do (through the softmax, to every
//! logit), exactly as `torch.topk` of the probabilities passes it.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::config::Config;

/// Qwen2MoeTopKRouter, `mlp.gate`.
#[derive(Debug, Clone)]
pub struct Router {
    gate: Linear,
    top_k: usize,
    norm_topk_prob: bool,
}

/// Where each token goes.
#[derive(Debug, Clone)]
pub struct Routing {
    /// The router logits, `(n, experts)` in the compute dtype (the load-balancing loss reads
    /// them).
    pub logits: Tensor,
    /// The weight of each chosen expert, `(n, k)` in the compute dtype.
    pub weights: Tensor,
    /// The chosen experts of each token, best first.
    pub experts: Vec<Vec<u32>>,
}

impl Router {
    /// `vb.weight`, `(num_experts, hidden)`.
    ///
    /// # Errors
    /// If the builder lacks the tensor or it is misshapen.
    pub fn new(cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            gate: qwen2::nn::linear(cfg.base.hidden_size, cfg.num_experts, false, &cfg.base, vb)?,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
        })
    }

    /// Routes the tokens `xs`, `(n, hidden)`.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn route(&self, xs: &Tensor) -> Result<Routing> {
        let logits = self.gate.forward(xs)?; // (n, E)
        // candle-nn's softmax_last_dim has no backward; this one is built of differentiable ops.
        let probs = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?; // (n, E)
        let experts = top_k(&probs, self.top_k)?;
        let index: Vec<u32> = experts.iter().flatten().copied().collect();
        let index = Tensor::from_vec(index, (experts.len(), self.top_k), xs.device())?; // (n, k)
        let mut weights = probs.gather(&index, 1)?; // (n, k) f32
        if self.norm_topk_prob {
            weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        }
        Ok(Routing {
            logits,
            weights: weights.to_dtype(xs.dtype())?,
            experts,
        })
    }
}

/// The `k` largest entries of each row of `probs` `(n, E)`, largest first; of equal values the
/// lower expert index first. Read on the host: the experts are dispatched from there anyway.
///
/// # Errors
/// If `probs` is not a matrix.
pub fn top_k(probs: &Tensor, k: usize) -> Result<Vec<Vec<u32>>> {
    let rows = probs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .map(|row| {
            let mut order: Vec<u32> = (0..row.len())
                .filter_map(|e| u32::try_from(e).ok())
                .collect();
            // Stable sort, descending: ties keep the lower index first.
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            order.truncate(k);
            order
        })
        .collect())
}
