//! A residual MLP block: `x + down(gelu(up(x)))`.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::Linear;
use checkpoint_runtime::Layer;

use crate::init::Init;

/// A residual two-layer perceptron.
#[derive(Debug, Clone)]
pub struct MlpBlock {
    up: Linear,
    down: Linear,
    vars: Vec<Var>,
}

impl MlpBlock {
    /// A block of width `hidden` with an inner width of `4 * hidden`.
    ///
    /// # Errors
    /// If candle cannot build the parameters.
    pub fn new(hidden: usize, init: &mut Init, dtype: DType, dev: &Device) -> Result<Self> {
        let inner = 4 * hidden;
        #[allow(clippy::cast_precision_loss)]
        let scale = 1.0 / (hidden as f32).sqrt();
        let vars = vec![
            init.var((inner, hidden), scale, dtype, dev)?,
            init.var(inner, scale, dtype, dev)?,
            init.var((hidden, inner), scale / 2.0, dtype, dev)?,
            init.var(hidden, scale, dtype, dev)?,
        ];
        let t = |i: usize| vars[i].as_tensor().clone();
        Ok(Self {
            up: Linear::new(t(0), Some(t(1))),
            down: Linear::new(t(2), Some(t(3))),
            vars,
        })
    }

    /// The trainable parameters.
    #[must_use]
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }
}

impl Layer for MlpBlock {
    fn forward_checkpointed(&self, x: &Tensor, (): &()) -> Result<Tensor> {
        x + self.down.forward(&self.up.forward(x)?.gelu()?)?
    }
}
