//! A `&'static` keyword argument outlives backward: it is kept as it is.

use candle_core::{Device, Result, Tensor};
use checkpoint_runtime::{Checkpointer, Policy, checkpointable};

#[checkpointable]
#[derive(Clone)]
struct Layer {
    w: Tensor,
}

#[checkpointable]
impl Layer {
    fn forward(
        &self,
        xs: &Tensor,
        act: &'static str,
        gate: Option<&'static f64>,
    ) -> Result<Tensor> {
        let ys = (xs * &self.w)?;
        let ys = match act {
            "tanh" => ys.tanh()?,
            _ => ys,
        };
        ys * gate.copied().unwrap_or(1.0)
    }
}

static GATE: f64 = 0.5;

#[checkpointable(engine = ckpt)]
fn run(layers: &[Layer], xs: &Tensor, ckpt: Option<&Checkpointer>) -> Result<Tensor> {
    let mut xs = xs.clone();
    #[checkpoint]
    for layer in layers {
        xs = layer.forward(&xs, "tanh", Some(&GATE))?;
    }
    Ok(xs)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let layers = vec![Layer { w: Tensor::new(&[2f32, -3.0], &dev)? }; 3];
    let xs = Tensor::new(&[0.5f32, 0.25], &dev)?;
    let plain = run(&layers, &xs, None)?.to_vec1::<f32>()?;
    let ckpt = Checkpointer::new(Policy::recompute());
    let ys = run(&layers, &xs, Some(&ckpt))?;
    assert_eq!(ys.to_vec1::<f32>()?, plain);
    ckpt.backward(&ys.sum_all()?)?;
    Ok(())
}
