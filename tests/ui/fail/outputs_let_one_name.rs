use candle_core::{Result, Tensor};
use checkpoint_runtime::{Checkpointer, checkpointable};

#[checkpointable]
#[derive(Clone)]
struct Routed(Tensor);

#[checkpointable]
impl Routed {
    fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((xs.broadcast_mul(&self.0)?, xs.sum_keepdim(0)?))
    }
}

#[checkpointable(engine = ckpt)]
fn run(layer: &Routed, xs: &Tensor, ckpt: &Checkpointer) -> Result<(Tensor, Tensor)> {
    #[checkpoint]
    let outputs = layer.forward(xs)?;
    Ok(outputs)
}

fn main() {}
