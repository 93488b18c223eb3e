use candle_core::{Result, Tensor};
use checkpoint_runtime::checkpointable;

#[checkpointable]
#[derive(Clone)]
struct Layer {
    w: Tensor,
}

#[checkpointable]
impl Layer {
    async fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs + &self.w
    }
}

fn main() {}
