use candle_core::{Result, Tensor};
use checkpoint_runtime::{Checkpointer, checkpointable};

struct Model {
    act: fn(&Tensor) -> Result<Tensor>,
}

impl Model {
    #[checkpointable(engine = ckpt)]
    fn forward(&self, xs: &Tensor, ckpt: &Checkpointer) -> Result<Tensor> {
        #[checkpoint]
        let ys = (self.act)(xs)?;
        Ok(ys)
    }
}

fn main() {}
