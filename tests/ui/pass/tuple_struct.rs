use candle_core::{Device, Result, Tensor};
use checkpoint_runtime::{Checkpointer, Policy, checkpointable};

#[checkpointable]
#[derive(Clone)]
struct Scale(Tensor);

#[checkpointable]
impl Scale {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.broadcast_mul(&self.0)
    }
}

#[checkpointable(engine = ckpt)]
fn run(layers: &[Scale], xs: &Tensor, ckpt: &Checkpointer) -> Result<Tensor> {
    #[checkpoint]
    let ys = layers.iter().try_fold(xs.clone(), |xs, layer| layer.forward(&xs))?;
    Ok(ys)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let layers = [Scale(Tensor::new(2f32, &dev)?), Scale(Tensor::new(3f32, &dev)?)];
    let xs = Tensor::new(&[1f32, 2.0], &dev)?;
    let ys = run(&layers, &xs, &Checkpointer::new(Policy::recompute()))?;
    assert_eq!(ys.to_vec1::<f32>()?, [6.0, 12.0]);
    Ok(())
}
