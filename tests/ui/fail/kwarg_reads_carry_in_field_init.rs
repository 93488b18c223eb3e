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
        xs = layer.call_kw(&xs, LayerKwargs { scale: xs.dims()[0] as f64 })?;
    }
    Ok(xs)
}

fn main() {}
