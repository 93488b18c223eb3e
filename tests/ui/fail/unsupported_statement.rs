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
}

#[checkpointable(engine = ckpt)]
fn run(layers: &[Layer], xs: &Tensor, ckpt: &Checkpointer) -> Result<Tensor> {
    let mut xs = xs.clone();
    #[checkpoint]
    for layer in layers {
        let ys = layer.forward(&xs)?;
        println!("{ys}");
        xs = ys;
    }
    Ok(xs)
}

fn main() {}
