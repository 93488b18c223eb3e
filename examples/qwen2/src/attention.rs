//! Grouped-query self-attention with q/k/v biases, as Qwen2Attention computes it in eager mode:
//! scores in the compute dtype, the additive mask and the softmax in f32, then back.
//!
//! Only differentiable ops: the fused `checkpoint_ops::masked_softmax` (scale, mask and softmax
//! in one pass, f32 inside; not candle-nn's `softmax_last_dim`, which cuts the gradient),
//! `checkpoint_ops::rope`, plain matmuls (no `sdpa`). No KV cache: this is the training path, and
//! recomputation must not mutate the layer.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::Config;
use crate::lora::{LoraConfig, LoraLinear, Target};
use crate::rope::Rope;

/// Qwen2Attention.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `vb.{q,k,v}_proj.{weight,bias}`, `vb.o_proj.weight`.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn new(cfg: &Config, vb: &VarBuilder<'_>) -> Result<Self> {
        Self::with_lora(cfg, None, vb)
    }

    /// [`Attention::new`], with LoRA updates on the projections `lora` targets.
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn with_lora(cfg: &Config, lora: Option<&LoraConfig>, vb: &VarBuilder<'_>) -> Result<Self> {
        let proj = |i, o, bias, target: Target| {
            LoraLinear::new(i, o, bias, target, cfg, lora, &vb.pp(target.name()))
        };
        let h = cfg.hidden_size;
        let (nh, nkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        Ok(Self {
            q_proj: proj(h, nh * d, true, Target::QProj)?,
            k_proj: proj(h, nkv * d, true, Target::KProj)?,
            v_proj: proj(h, nkv * d, true, Target::VProj)?,
            o_proj: proj(nh * d, h, false, Target::OProj)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        })
    }

    /// `xs`: `(b, t, hidden)`; `mask`: additive, `(b, 1, t, t)` or `(t, t)`, f32 (see
    /// [`additive_mask`]); `None` means causal only.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, rope: &Rope) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |ys: Tensor, n: usize| ys.reshape((b, t, n, d))?.transpose(1, 2); // (b, n, t, d)
        let q = rope.apply(&heads(self.q_proj.forward(xs)?, nh)?)?; // (b, nh, t, d)
        let k = rope.apply(&heads(self.k_proj.forward(xs)?, nkv)?)?; // (b, nkv, t, d)
        let v = heads(self.v_proj.forward(xs)?, nkv)?; // (b, nkv, t, d)
        // Grouped-query attention without transformers' `repeat_kv` copies: query head
        // `j * groups + g` reads key/value head `j`, so the queries of one key/value head are
        // `groups` consecutive heads, and `(b, nh, t, d)` viewed as `(b, nkv, groups * t, d)`
        // multiplies each key/value head once.
        let groups = nh / nkv;
        let (k, v) = (k.contiguous()?, v.contiguous()?); // matmul wants whole batches
        let q = q.contiguous()?.reshape((b, nkv, groups * t, d))?; // (b, nkv, groups·t, d)

        #[allow(clippy::cast_precision_loss)]
        let scale = 1.0 / (d as f64).sqrt();
        let scores = q.matmul(&k.t()?)?.reshape((b, nh, t, t))?; // (b, nh, t, t), unscaled
        let causal;
        let mask = match mask {
            Some(m) => m,
            None => {
                causal = additive_mask(None, b, t, xs.device())?;
                &causal
            }
        };
        // softmax(scores · scale + mask) in f32, returned in the compute dtype.
        let probs = checkpoint_ops::masked_softmax(&scores, Some(mask), scale)?; // (b, nh, t, t)
        let probs = probs.reshape((b, nkv, groups * t, t))?; // (b, nkv, groups·t, t)
        let out = probs.matmul(&v)?.reshape((b, nh, t, d))?; // (b, nh, t, d)
        let out = out.transpose(1, 2)?.reshape((b, t, nh * d))?; // (b, t, nh * d)
        self.o_proj.forward(&out) // (b, t, hidden)
    }
}

/// The additive attention mask, f32, `(b, 1, t, t)`: 0 where query `i` may attend key `j`
/// (`j <= i` and key `j` is not padding), `f32::MIN` elsewhere (finite, so that a fully masked
/// row gives a uniform softmax rather than NaN, as transformers does).
///
/// `padding`: `(b, t)`, 1 for tokens and 0 for padding, any numeric dtype; `None`: no padding.
///
/// # Errors
/// If `padding` is not `(b, t)`.
pub fn additive_mask(
    padding: Option<&Tensor>,
    b: usize,
    t: usize,
    device: &Device,
) -> Result<Tensor> {
    let causal: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 1.0 } else { 0.0 }))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, t, t), device)?;
    let allowed = match padding {
        Some(p) => {
            let p = p.to_dtype(DType::F32)?.reshape((b, 1, 1, t))?;
            causal.broadcast_mul(&p)? // (b, 1, t, t)
        }
        None => causal.broadcast_as((b, 1, t, t))?.contiguous()?,
    };
    // allowed ∈ {0, 1}  →  (allowed − 1) · MAX ∈ {−MAX, 0}
    (allowed - 1.0)? * f64::from(f32::MAX)
}
