//! The sparse mixture-of-experts block (Qwen2MoeSparseMoeBlock): each token goes through its
//! top-k routed experts, weighted by the router, plus the shared expert scaled by its own
//! sigmoid gate.
//!
//! Every expert is a SwiGLU MLP ([`qwen2::mlp::Mlp`], narrower) stored as on the Hub, one
//! tensor per expert (`experts.E.{gate,up,down}_proj.weight`). An expert runs only on the
//! tokens routed to it (gathered with `index_select`, scattered back with `index_add`, both
//! differentiable), so the compute is that of `k` experts, not all of them.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use qwen2::mlp::Mlp;

use crate::config::Config;
use crate::router::Router;

/// Qwen2MoeSparseMoeBlock, `model.layers.N.mlp` of a sparse layer.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    gate: Router,
    experts: Vec<Mlp>,
    shared_expert: Mlp,
    shared_expert_gate: Linear,
}

impl SparseMoe {
    /// `vb.gate`, `vb.experts.E.*`, `vb.shared_expert.*`, `vb.shared_expert_gate.weight`.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn new(cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        let experts = (0..cfg.num_experts)
            .map(|e| {
                Mlp::with_width(
                    cfg.moe_intermediate_size,
                    &cfg.base,
                    &vb.pp("experts").pp(e),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            gate: Router::new(cfg, &vb.pp("gate"))?,
            experts,
            shared_expert: Mlp::with_width(
                cfg.shared_expert_intermediate_size,
                &cfg.base,
                &vb.pp("shared_expert"),
            )?,
            shared_expert_gate: qwen2::nn::linear(
                cfg.base.hidden_size,
                1,
                false,
                &cfg.base,
                &vb.pp("shared_expert_gate"),
            )?,
        })
    }

    /// `(b, t, hidden)` → `((b, t, hidden), router logits (b·t, experts))`.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t, h) = xs.dims3()?;
        let n = b * t;
        let flat = xs.reshape((n, h))?; // (n, h)
        let routing = self.gate.route(&flat)?;
        let k = routing.weights.dim(1)?;
        let weights = routing.weights.flatten_all()?; // (n·k,): token i, slot j at i·k + j
        let device = xs.device();
        let mut out = Tensor::zeros((n, h), xs.dtype(), device)?;
        for (e, expert) in self.experts.iter().enumerate() {
            let (mut rows, mut slots) = (Vec::new(), Vec::new());
            for (i, chosen) in routing.experts.iter().enumerate() {
                if let Some(j) = chosen.iter().position(|&c| c as usize == e) {
                    rows.push(u32::try_from(i).map_err(candle_core::Error::wrap)?);
                    slots.push(u32::try_from(i * k + j).map_err(candle_core::Error::wrap)?);
                }
            }
            if rows.is_empty() {
                continue; // no token chose it: no work, no gradient (as in transformers)
            }
            let m = rows.len();
            let rows = Tensor::from_vec(rows, m, device)?;
            let slots = Tensor::from_vec(slots, m, device)?;
            let w = weights.index_select(&slots, 0)?.unsqueeze(1)?; // (m, 1)
            let ys = expert.forward(&flat.index_select(&rows, 0)?)?; // (m, h)
            out = out.index_add(&rows, &ys.broadcast_mul(&w)?, 0)?; // (n, h)
        }
        let shared = self.shared_expert.forward(&flat)?; // (n, h)
        let gate = candle_nn::ops::sigmoid(&self.shared_expert_gate.forward(&flat)?)?; // (n, 1)
        let out = (out + shared.broadcast_mul(&gate)?)?.reshape((b, t, h))?; // (b, t, h)
        Ok((out, routing.logits))
    }
}
