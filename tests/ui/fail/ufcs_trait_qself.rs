use candle_core::{Module, Result, Tensor};
use checkpoint_runtime::{Checkpointer, checkpointable};

#[checkpointable]
#[derive(Clone)]
struct Block;

#[checkpointable]
impl Block {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs * 2.0
    }
}

impl Module for Block {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs * 3.0
    }
}

#[checkpointable(engine = ckpt)]
fn run(layer: &Block, xs: &Tensor, ckpt: &Checkpointer) -> Result<Tensor> {
    // The trait's method, which the engine cannot re-run.
    #[checkpoint]
    let ys = <Block as Module>::forward(layer, xs)?;
    #[checkpoint]
    let ys = <Block as candle_core::Module>::forward(layer, &ys)?;
    #[checkpoint]
    let ys = <dyn Module>::forward(layer, &ys)?;
    Ok(ys)
}

fn main() {}
