//! A Qwen2-like decoder block from differentiable ops only: RMS norm (`rms_norm_slow`), GQA
//! attention with q/k/v biases, rotary embedding (`rope_slow`), an additive causal mask,
//! `softmax` (not the fused `softmax_last_dim`, which cuts gradients) and a SwiGLU MLP.

use candle_core::{D, DType, Device, Module, Result, Tensor, Var};
use candle_nn::Linear;
use candle_nn::ops::{rms_norm_slow, softmax};
use candle_nn::rotary_emb::rope_slow;
use checkpoint_runtime::{Kwargs, Layer};

use crate::init::Init;

/// Sizes of a block.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    /// Model width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// MLP width.
    pub intermediate: usize,
    /// RMS norm epsilon.
    pub eps: f32,
}

impl BlockConfig {
    /// A config of width `hidden` with 4 query heads over 2 key/value heads.
    #[must_use]
    pub fn small(hidden: usize) -> Self {
        Self {
            hidden,
            heads: 4,
            kv_heads: 2,
            intermediate: hidden * 11 / 4,
            eps: 1e-6,
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// What every block of a stack shares: the causal mask and the rotary tables.
#[derive(Debug, Clone)]
pub struct BlockKwargs {
    /// Additive mask, `(t, t)`: 0 where attention is allowed, −∞ elsewhere.
    pub mask: Tensor,
    /// Rotary cosines, `(t, head_dim / 2)`.
    pub cos: Tensor,
    /// Rotary sines, `(t, head_dim / 2)`.
    pub sin: Tensor,
}

impl Kwargs for BlockKwargs {}

impl BlockKwargs {
    /// The causal mask and rotary tables for sequences of length `t`.
    ///
    /// # Errors
    /// If candle cannot build the tables.
    pub fn new(cfg: &BlockConfig, t: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let half = cfg.head_dim() / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                #[allow(clippy::cast_precision_loss)]
                let e = (2 * i) as f32 / cfg.head_dim() as f32;
                1.0 / 10_000f32.powf(e)
            })
            .collect();
        let inv_freq = Tensor::new(inv_freq.as_slice(), dev)?;
        let pos = Tensor::arange(0u32, u32::try_from(t).unwrap_or(u32::MAX), dev)?
            .to_dtype(DType::F32)?;
        let freqs = pos.unsqueeze(1)?.broadcast_mul(&inv_freq.unsqueeze(0)?)?;
        Ok(Self {
            mask: Tensor::from_vec(mask, (t, t), dev)?.to_dtype(dtype)?,
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }
}

/// One decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    cfg: BlockConfig,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    vars: Vec<Var>,
}

impl Block {
    /// A block with deterministic parameters drawn from `init`.
    ///
    /// # Errors
    /// If candle cannot build the parameters.
    pub fn new(cfg: BlockConfig, init: &mut Init, dtype: DType, dev: &Device) -> Result<Self> {
        let (h, kv, i) = (cfg.hidden, cfg.kv_heads * cfg.head_dim(), cfg.intermediate);
        #[allow(clippy::cast_precision_loss)]
        let s = 1.0 / (h as f32).sqrt();
        let mut vars = Vec::new();
        let mut var = |shape: (usize, usize), scale: f32, vars: &mut Vec<Var>| -> Result<Tensor> {
            let v = init.var(shape, scale, dtype, dev)?;
            let t = v.as_tensor().clone();
            vars.push(v);
            Ok(t)
        };
        let q_w = var((h, h), s, &mut vars)?;
        let q_b = var((1, h), s, &mut vars)?.squeeze(0)?;
        let k_w = var((kv, h), s, &mut vars)?;
        let k_b = var((1, kv), s, &mut vars)?.squeeze(0)?;
        let v_w = var((kv, h), s, &mut vars)?;
        let v_b = var((1, kv), s, &mut vars)?.squeeze(0)?;
        let o_w = var((h, h), s, &mut vars)?;
        let gate_w = var((i, h), s, &mut vars)?;
        let up_w = var((i, h), s, &mut vars)?;
        #[allow(clippy::cast_precision_loss)]
        let down_w = var((h, i), 1.0 / (i as f32).sqrt(), &mut vars)?;
        let ln1 = init.var_around_one(h, 0.1, dtype, dev)?;
        let ln2 = init.var_around_one(h, 0.1, dtype, dev)?;
        let (input_layernorm, post_attention_layernorm) =
            (ln1.as_tensor().clone(), ln2.as_tensor().clone());
        vars.extend([ln1, ln2]);
        Ok(Self {
            cfg,
            q_proj: Linear::new(q_w, Some(q_b)),
            k_proj: Linear::new(k_w, Some(k_b)),
            v_proj: Linear::new(v_w, Some(v_b)),
            o_proj: Linear::new(o_w, None),
            gate_proj: Linear::new(gate_w, None),
            up_proj: Linear::new(up_w, None),
            down_proj: Linear::new(down_w, None),
            input_layernorm,
            post_attention_layernorm,
            vars,
        })
    }

    /// The trainable parameters.
    #[must_use]
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    fn attention(&self, x: &Tensor, kw: &BlockKwargs) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim());
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2); // (b, n, t, d)
        let q = rope_slow(
            &heads(self.q_proj.forward(x)?, nh)?.contiguous()?,
            &kw.cos,
            &kw.sin,
        )?;
        let k = rope_slow(
            &heads(self.k_proj.forward(x)?, nkv)?.contiguous()?,
            &kw.cos,
            &kw.sin,
        )?;
        let v = heads(self.v_proj.forward(x)?, nkv)?;
        // Grouped-query attention: each key/value head serves nh / nkv query heads.
        let repeat = |y: Tensor| -> Result<Tensor> {
            let y = y.unsqueeze(2)?.expand((b, nkv, nh / nkv, t, hd))?;
            y.reshape((b, nh, t, hd)) // (b, h, t, d)
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        #[allow(clippy::cast_precision_loss)]
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&kw.mask)?; // (b, h, t, t)
        let probs = softmax(&scores, D::Minus1)?;
        let out = probs.matmul(&v.contiguous()?)?; // (b, h, t, d)
        self.o_proj
            .forward(&out.transpose(1, 2)?.reshape((b, t, nh * hd))?)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

impl Layer<BlockKwargs> for Block {
    fn forward_checkpointed(&self, x: &Tensor, kw: &BlockKwargs) -> Result<Tensor> {
        let eps = self.cfg.eps;
        let h = (x + self.attention(&rms_norm_slow(x, &self.input_layernorm, eps)?, kw)?)?;
        &h + self.mlp(&rms_norm_slow(&h, &self.post_attention_layernorm, eps)?)?
    }
}
