//! `crate = PATH`: the generated code reaches the runtime through a re-export.

use candle_core::{Device, Result, Tensor};

mod facade {
    pub use checkpoint_runtime as ckpt;
}

use facade::ckpt::{Checkpointer, Policy, checkpointable};

#[checkpointable(crate = crate::facade::ckpt)]
#[derive(Clone)]
struct Layer {
    w: Tensor,
}

#[checkpointable(crate = crate::facade::ckpt)]
impl Layer {
    fn forward(&self, xs: &Tensor, label: &str) -> Result<Tensor> {
        assert_eq!(label, "layer");
        xs * &self.w
    }
}

#[checkpointable(crate = crate::facade::ckpt, engine = ckpt)]
fn run(layers: &[Layer], xs: &Tensor, ckpt: &Checkpointer) -> Result<Tensor> {
    let mut xs = xs.clone();
    #[checkpoint]
    for layer in layers {
        xs = layer.forward(&xs, "layer")?;
    }
    Ok(xs)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let layers = vec![Layer { w: Tensor::new(&[2f32, 3.0], &dev)? }; 2];
    let xs = Tensor::new(&[1f32, 1.0], &dev)?;
    let ys = run(&layers, &xs, &Checkpointer::new(Policy::recompute()))?;
    assert_eq!(ys.to_vec1::<f32>()?, [4.0, 9.0]);
    Ok(())
}
