use candle_core::{Result, Tensor};
use checkpoint_runtime::checkpointable;

#[checkpointable]
#[derive(Clone)]
struct Layer {
    w: Tensor,
}

#[checkpointable]
impl Layer {
    fn forward(&self) -> Result<Tensor> {
        Ok(self.w.clone())
    }
}

fn main() {}
