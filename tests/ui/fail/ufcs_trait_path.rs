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

/// A layer that is not checkpointable: only the trait's method exists.
#[derive(Clone)]
struct Plain;

impl Module for Plain {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs * 3.0
    }
}

#[checkpointable(engine = ckpt)]
fn run(layer: &Block, plain: &Plain, xs: &Tensor, ckpt: &Checkpointer) -> Result<Tensor> {
    // A trait path: the plain call runs the trait's method, which the engine cannot re-run.
    #[checkpoint]
    let ys = candle_core::Module::forward(layer, xs)?;
    #[checkpoint]
    let ys = Module::forward(layer, &ys)?;
    // A type path to a type whose `forward` is the trait's.
    #[checkpoint]
    let ys = Plain::forward(plain, &ys)?;
    Ok(ys)
}

fn main() {}
