use candle_core::{Device, Result, Tensor};
use checkpoint_runtime::{Checkpointer, Policy, checkpointable};

#[checkpointable]
#[derive(Clone)]
struct Routed(Tensor);

#[checkpointable]
impl Routed {
    fn forward(&self, xs: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
        let ys = (xs.broadcast_mul(&self.0)? * scale)?;
        let logits = ys.sum_keepdim(0)?;
        Ok((ys, logits))
    }
}

#[derive(Clone)]
struct Dense(Tensor);

/// A mixed stack's layer: an enum whose method dispatches to its variants.
#[checkpointable]
#[derive(Clone)]
enum Layer {
    Dense(Dense),
    Routed(Routed),
}

#[checkpointable]
impl Layer {
    fn forward(&self, xs: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Dense(d) => Ok((xs.broadcast_add(&d.0)?, xs.sum_keepdim(0)?)),
            Self::Routed(r) => r.forward(xs, scale),
        }
    }
}

/// A pair carry.
#[checkpointable]
#[derive(Clone)]
struct Pair;

#[checkpointable]
impl Pair {
    fn forward(&self, carry: (&Tensor, &Tensor)) -> Result<(Tensor, Tensor)> {
        let (h, r) = carry;
        let r = (r + h)?;
        Ok((r.tanh()?, r))
    }
}

#[checkpointable(engine = ckpt)]
fn run(layers: &[Layer], pairs: &[Pair], xs: &Tensor, ckpt: &Checkpointer) -> Result<(Tensor, Vec<Tensor>)> {
    let mut xs = xs.clone();
    let mut logits = Vec::new();
    #[checkpoint]
    for (i, layer) in layers.iter().enumerate() {
        let scale = 1.0 / (i + 1) as f64;
        let (h, l) = layer.forward(&xs, scale)?;
        xs = h;
        logits.push(l);
    }
    let mut residual = xs.zeros_like()?;
    #[checkpoint]
    for pair in pairs {
        let (h, r) = pair.forward((&xs, &residual))?;
        xs = h;
        residual = r;
    }
    Ok(((xs + residual)?, logits))
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let layers = [
        Layer::Dense(Dense(Tensor::new(1f32, &dev)?)),
        Layer::Routed(Routed(Tensor::new(3f32, &dev)?)),
    ];
    let xs = Tensor::new(&[1f32, 2.0], &dev)?;
    let (ys, logits) = run(&layers, &[Pair, Pair], &xs, &Checkpointer::new(Policy::recompute()))?;
    assert_eq!(logits.len(), 2);
    assert_eq!(logits[0].to_vec1::<f32>()?, [3.0]);
    assert_eq!(logits[1].to_vec1::<f32>()?, [3.0 * 5.0 / 2.0]);
    assert_eq!(ys.dims(), [2]);
    Ok(())
}
