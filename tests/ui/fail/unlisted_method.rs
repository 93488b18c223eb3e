use candle_core::{Result, Tensor};
use checkpoint_runtime::{Checkpointer, checkpointable};

#[checkpointable]
#[derive(Clone)]
struct Layer {
    w: Tensor,
}

#[checkpointable]
impl Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs + &self.w
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if train { xs - &self.w } else { xs + &self.w }
    }
}

#[checkpointable(engine = ckpt)]
fn run(layers: &[Layer], xs: &Tensor, ckpt: &Checkpointer) -> Result<Tensor> {
    let mut xs = xs.clone();
    #[checkpoint]
    for layer in layers {
        xs = layer.forward_t(&xs, true)?;
    }
    Ok(xs)
}

fn main() {}
