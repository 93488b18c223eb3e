use candle_core::{Result, Tensor};
use checkpoint_runtime::{Checkpointer, checkpointable};

#[checkpointable]
#[derive(Clone)]
struct Layer {
    w: Tensor,
}

#[checkpointable]
impl Layer {
    fn forward(&self, xs: &Tensor, scale: f64) -> Result<Tensor> {
        (xs + &self.w)? * scale
    }
}


#[checkpointable(engine = ckpt)]
fn run(layers: &[Layer], xs: &Tensor, ckpt: &Checkpointer) -> Result<Tensor> {
    let mut xs = xs.clone();
    #[checkpoint]
    for layer in layers {
        xs = layer.forward(&xs, 2.0).map_err(|e| e.context("layer"))?;
    }
    #[checkpoint]
    let ys = layers[0].forward(&xs, 2.0)?.broadcast_add(&xs)?;
    Ok(ys)
}

fn main() {}
