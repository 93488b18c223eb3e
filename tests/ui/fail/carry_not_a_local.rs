use candle_core::{Result, Tensor};
use checkpoint_runtime::{Checkpointer, checkpointable};

#[checkpointable]
#[derive(Clone)]
struct Layer {
    w: Tensor,
}

#[checkpointable]
impl Layer {
    fn forward(&self, xs: &Tensor, scale: f64) -> Result<Tensor> {
        (xs + &self.w)? * scale
    }
}


struct State {
    h: Tensor,
}

#[checkpointable(engine = ckpt)]
fn run(layers: &[Layer], st: &mut State, ckpt: &Checkpointer) -> Result<()> {
    #[checkpoint]
    for layer in layers {
        st.h = layer.forward(&st.h, 2.0)?;
    }
    Ok(())
}

fn main() {}
