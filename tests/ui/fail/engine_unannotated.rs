use candle_core::{Module, Result, Tensor};
use candle_nn::Linear;
use checkpoint_runtime::{Checkpointer, checkpointable};

struct Model {
    layers: Vec<Linear>,
}

impl Model {
    #[checkpointable(engine = ckpt)]
    fn forward(&self, xs: &Tensor, ckpt: &Checkpointer) -> Result<Tensor> {
        let mut xs = xs.clone();
        #[checkpoint]
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        Ok(xs)
    }
}

fn main() {}
