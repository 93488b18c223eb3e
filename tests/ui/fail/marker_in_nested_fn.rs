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
    fn inner(layers: &[Layer], xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        #[checkpoint]
        for layer in layers {
            xs = layer.forward(&xs)?;
        }
        Ok(xs)
    }
    let xs = inner(layers, xs)?;
    #[checkpoint]
    let ys = layers[0].forward(&xs)?;
    Ok(ys)
}

fn main() {}
