use std::marker::PhantomData;

use candle_core::{Device, Result, Tensor};
use checkpoint_runtime::{Checkpointer, Policy, checkpointable};

trait Activation: Clone + Send + Sync + 'static {
    fn apply(xs: &Tensor) -> Result<Tensor>;
}

#[derive(Clone)]
struct Tanh;

impl Activation for Tanh {
    fn apply(xs: &Tensor) -> Result<Tensor> {
        xs.tanh()
    }
}

#[checkpointable]
#[derive(Clone)]
struct Dense<A: Activation, const N: usize> {
    w: Tensor,
    act: PhantomData<A>,
}

#[checkpointable(methods(forward, forward_scaled))]
impl<A: Activation, const N: usize> Dense<A, N> {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        A::apply(&xs.broadcast_mul(&self.w)?)
    }

    fn forward_scaled(&self, xs: &Tensor, scale: f64) -> Result<Tensor> {
        self.forward(xs)? * scale
    }
}

#[checkpointable(engine = ckpt)]
fn run(layer: &Dense<Tanh, 4>, xs: &Tensor, ckpt: Option<&Checkpointer>) -> Result<Tensor> {
    #[checkpoint]
    let ys = layer.forward(xs)?;
    let f = layer.partial_forward_scaled(0.5);
    #[checkpoint]
    let ys = f.call(&ys)?;
    #[checkpoint]
    let ys = layer.call_kw_forward_scaled(&ys, DenseForwardScaledKwargs { scale: 2.0 })?;
    Ok(ys)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let layer = Dense::<Tanh, 4> { w: Tensor::new(0.5f32, &dev)?, act: PhantomData };
    let xs = Tensor::new(&[1f32, -2.0], &dev)?;
    let plain = run(&layer, &xs, None)?;
    let ckpt = run(&layer, &xs, Some(&Checkpointer::new(Policy::recompute())))?;
    assert_eq!(plain.to_vec1::<f32>()?, ckpt.to_vec1::<f32>()?);
    Ok(())
}
