use candle_core::{Result, Tensor};
use checkpoint_runtime::checkpointable;

#[checkpointable]
trait Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor>;
}

fn main() {}
