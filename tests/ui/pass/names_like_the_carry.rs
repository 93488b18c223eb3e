//! A field or a path segment named like the carry is not a read of the carry.

use candle_core::{Device, Result, Tensor};
use checkpoint_runtime::{Checkpointer, Policy, checkpointable};

#[checkpointable]
#[derive(Clone)]
struct Layer {
    w: Tensor,
}

#[checkpointable]
impl Layer {
    fn forward(&self, xs: &Tensor, scale: f64) -> Result<Tensor> {
        (xs * &self.w)? * scale
    }
}

struct Config {
    xs: f64,
}

mod xs {
    pub const SCALE: f64 = 0.5;
}

#[checkpointable(engine = ckpt)]
fn run(layers: &[Layer], xs: &Tensor, cfg: &Config, ckpt: &Checkpointer) -> Result<Tensor> {
    let mut xs = xs.clone();
    #[checkpoint]
    for layer in layers {
        let scale = cfg.xs * xs::SCALE;
        xs = layer.forward(&xs, scale)?;
    }
    Ok(xs)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let layers = vec![Layer { w: Tensor::new(&[2f32, 3.0], &dev)? }; 2];
    let xs = Tensor::new(&[1f32, 1.0], &dev)?;
    let cfg = Config { xs: 4.0 };
    let ys = run(&layers, &xs, &cfg, &Checkpointer::new(Policy::recompute()))?;
    assert_eq!(ys.to_vec1::<f32>()?, [16.0, 36.0]); // (1 * 2 * 2) * 2 * 2, (1 * 3 * 2) * 3 * 2
    Ok(())
}
