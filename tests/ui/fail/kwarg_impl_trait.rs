use candle_core::{Result, Tensor};
use checkpoint_runtime::checkpointable;

#[checkpointable]
#[derive(Clone)]
struct Layer {
    w: Tensor,
}

#[checkpointable]
impl Layer {
    fn forward(&self, xs: &Tensor, act: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        act(&(xs + &self.w)?)
    }
}

fn main() {}
