//! Path calls that name the layer's own type (`Block::forward`, `<Block>::forward`) or `Self`
//! run the layer's inherent method, with an engine and without, even where the layer also
//! implements a trait with a method of the same name that computes something else.

use candle_core::{Device, Module, Result, Tensor, Var};
use checkpoint_runtime::{Checkpointer, Policy, checkpointable};

#[checkpointable]
#[derive(Clone)]
struct Block {
    w: Var,
}

#[checkpointable]
impl Block {
    /// The layer's own method: `2 w xs`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        (xs.broadcast_mul(self.w.as_tensor())? * 2.0)?.tanh()
    }
}

/// The trait's method computes something else: `3 w xs`.
impl Module for Block {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        (xs.broadcast_mul(self.w.as_tensor())? * 3.0)?.tanh()
    }
}

impl Block {
    #[checkpointable(engine = ckpt)]
    fn through_self(&self, xs: &Tensor, ckpt: Option<&Checkpointer>) -> Result<Tensor> {
        #[checkpoint]
        let ys = Self::forward(self, xs)?;
        #[checkpoint]
        let ys = <Self>::forward(self, &ys)?;
        Ok(ys)
    }
}

#[checkpointable(engine = ckpt)]
fn through_type(layers: &[Block], xs: &Tensor, ckpt: Option<&Checkpointer>) -> Result<Tensor> {
    #[checkpoint]
    let ys = Block::forward(&layers[0], xs)?;
    #[checkpoint]
    let ys = <Block>::forward(&layers[1], &ys)?;
    let mut ys = ys;
    #[checkpoint]
    for layer in layers {
        ys = Block::forward(layer, &ys)?;
    }
    Ok(ys)
}

/// The reference: the inherent method, called plainly.
fn own(layers: &[Block], xs: &Tensor) -> Result<Tensor> {
    let mut ys = layers[1].forward(&layers[0].forward(xs)?)?;
    for layer in layers {
        ys = layer.forward(&ys)?;
    }
    Ok(ys)
}

/// The output of `f`.
fn run(_layers: &[Block], f: impl Fn(&Tensor) -> Result<Tensor>, xs: &Tensor) -> Result<Vec<f32>> {
    f(xs)?.to_vec1::<f32>()
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let layers: Vec<Block> = [0.3f32, -0.4]
        .into_iter()
        .map(|w| {
            Ok(Block {
                w: Var::new(w, &dev)?,
            })
        })
        .collect::<Result<_>>()?;
    let xs = Tensor::new(&[0.5f32, -1.5], &dev)?;
    let engine = Checkpointer::new(Policy::recompute());

    let reference = run(&layers, |xs| own(&layers, xs), &xs)?;
    let plain = run(&layers, |xs| through_type(&layers, xs, None), &xs)?;
    let ckpt = run(&layers, |xs| through_type(&layers, xs, Some(&engine)), &xs)?;
    assert_eq!(
        plain, reference,
        "the plain path calls run the inherent method"
    );
    assert_eq!(ckpt, plain, "the engine runs what the plain path calls run");

    let block = &layers[0];
    let reference = run(&layers[..1], |xs| block.forward(&block.forward(xs)?), &xs)?;
    let plain = run(&layers[..1], |xs| block.through_self(xs, None), &xs)?;
    let ckpt = run(
        &layers[..1],
        |xs| block.through_self(xs, Some(&engine)),
        &xs,
    )?;
    assert_eq!(plain, reference, "`Self::forward` runs the inherent method");
    assert_eq!(ckpt, plain, "the engine runs what `Self::forward` runs");

    // The trait's method differs, so the comparisons above can tell the two apart.
    assert_ne!(
        Module::forward(block, &xs)?.to_vec1::<f32>()?,
        block.forward(&xs)?.to_vec1::<f32>()?
    );
    Ok(())
}
