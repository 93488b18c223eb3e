// The input of the expansion snapshot (`expand.rs.snap`), compiled by `macro_expand.rs` too.
// A representative layer (keyword arguments of each kind) and a model whose loop is rewritten.

use candle_core::{Result, Tensor};
use checkpoint_runtime::{Checkpointer, checkpointable};

/// Rotary tables shared by every layer: a `&Rope` keyword argument, kept as a clone.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Cosines.
    pub cos: Tensor,
}

/// A decoder layer.
#[checkpointable]
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    w: Tensor,
}

#[checkpointable]
impl DecoderLayer {
    /// The layer's forward: `hidden` is the carry, the rest are keyword arguments.
    ///
    /// # Errors
    /// candle's.
    pub fn forward(
        &self,
        hidden: &Tensor,
        attention_mask: Option<&Tensor>,
        rope: &Rope,
        scale: f64,
    ) -> Result<Tensor> {
        let h = hidden.broadcast_mul(&self.w)?.broadcast_mul(&rope.cos)?;
        let h = match attention_mask {
            Some(mask) => h.broadcast_mul(mask)?,
            None => h,
        };
        hidden + (h * scale)?
    }
}

/// A model: a stack of decoder layers.
#[derive(Debug)]
pub struct Model {
    layers: Vec<DecoderLayer>,
    rope: Rope,
}

impl Model {
    /// Runs the stack through `ckpt` (or plainly, when it is `None`).
    ///
    /// # Errors
    /// candle's, or the engine's.
    #[checkpointable(engine = ckpt)]
    pub fn forward(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        ckpt: Option<&Checkpointer>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        #[checkpoint]
        for layer in &self.layers {
            xs = layer.forward(&xs, Some(mask), &self.rope, 0.5)?;
        }
        Ok(xs)
    }
}
