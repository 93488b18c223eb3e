use candle_core::{Result, Tensor};
use checkpoint_runtime::{Policy, checkpointable};

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

#[checkpointable(engine = policy)]
fn run(layer: &Layer, xs: &Tensor, policy: &Policy) -> Result<Tensor> {
    #[checkpoint]
    let ys = layer.forward(xs)?;
    Ok(ys)
}

fn main() {}
