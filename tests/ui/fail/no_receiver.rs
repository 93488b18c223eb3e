use candle_core::{Result, Tensor};
use checkpoint_runtime::checkpointable;

#[checkpointable]
#[derive(Clone)]
struct Layer {
    w: Tensor,
}

#[checkpointable]
impl Layer {
    fn forward(xs: &Tensor) -> Result<Tensor> {
        Ok(xs.clone())
    }
}

fn main() {}
