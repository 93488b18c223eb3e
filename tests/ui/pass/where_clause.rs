//! Where clauses in rustfmt's multi-line style (one predicate a line, trailing comma) on the
//! struct, the impl and the model function.

use std::marker::PhantomData;

use candle_core::{Device, Result, Tensor};
use checkpoint_runtime::{Checkpointer, Policy, checkpointable};

trait Activation {
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
struct Dense<A>
where
    A: Activation + Clone + Send + Sync + 'static,
{
    w: Tensor,
    act: PhantomData<A>,
}

#[checkpointable(methods(forward, forward_scaled))]
impl<A> Dense<A>
where
    A: Activation + Clone + Send + Sync + 'static,
{
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        A::apply(&xs.broadcast_mul(&self.w)?)
    }

    fn forward_scaled(&self, xs: &Tensor, scale: f64) -> Result<Tensor> {
        self.forward(xs)? * scale
    }
}

#[checkpointable(engine = ckpt)]
fn run<A>(layers: &[Dense<A>], xs: &Tensor, ckpt: Option<&Checkpointer>) -> Result<Tensor>
where
    A: Activation + Clone + Send + Sync + 'static,
{
    let mut xs = xs.clone();
    #[checkpoint]
    for layer in layers {
        xs = layer.forward(&xs)?;
    }
    #[checkpoint]
    let xs = layers[0].forward_scaled(&xs, 0.5)?;
    Ok(xs)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let layer = Dense::<Tanh> {
        w: Tensor::new(0.5f32, &dev)?,
        act: PhantomData,
    };
    let layers = vec![layer.clone(), layer];
    let xs = Tensor::new(&[1f32, -2.0], &dev)?;
    let plain = run(&layers, &xs, None)?;
    let ckpt = run(&layers, &xs, Some(&Checkpointer::new(Policy::recompute())))?;
    assert_eq!(plain.to_vec1::<f32>()?, ckpt.to_vec1::<f32>()?);
    Ok(())
}
