use candle_core::{Result, Tensor};
use checkpoint_runtime::checkpointable;

#[checkpointable]
#[derive(Clone)]
struct Layer {
    w: Tensor,
}

#[checkpointable(methods = forward)]
impl Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs + &self.w
    }
}

fn main() {}
