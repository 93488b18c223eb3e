use candle_core::{Result, Tensor};
use checkpoint_runtime::checkpointable;

#[checkpointable]
#[derive(Clone)]
struct Layer {
    w: Tensor,
}

#[checkpointable(methods(forward), methods(encode))]
impl Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs + &self.w
    }

    fn encode(&self, xs: &Tensor) -> Result<Tensor> {
        xs - &self.w
    }
}

fn main() {}
