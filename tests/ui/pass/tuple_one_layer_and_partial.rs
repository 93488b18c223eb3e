use candle_core::{Device, Result, Tensor};
use checkpoint_runtime::{Checkpointer, Policy, checkpointable};

#[checkpointable]
#[derive(Clone)]
struct Routed(Tensor);

#[checkpointable]
impl Routed {
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<(Tensor, Tensor)> {
        let ys = (xs.broadcast_mul(&self.0)? * scale)?;
        let ys = match mask {
            Some(m) => ys.broadcast_mul(m)?,
            None => ys,
        };
        let logits = ys.sum_keepdim(0)?;
        Ok((ys, logits))
    }
}

/// A pair carry and an auxiliary output.
#[checkpointable]
#[derive(Clone)]
struct Pair;

#[checkpointable]
impl Pair {
    /// A named lifetime on the carry: `partial(..).call` takes it all the same.
    fn forward<'a>(&self, carry: (&'a Tensor, &Tensor)) -> Result<(Tensor, Tensor, Tensor)> {
        let (h, r) = carry;
        let r = (r + h)?;
        let stat = r.sum_keepdim(0)?;
        Ok((r.tanh()?, r, stat))
    }
}

#[checkpointable(engine = ckpt)]
fn run(
    layers: &[Routed],
    pair: &Pair,
    xs: &Tensor,
    mask: &Tensor,
    ckpt: Option<&Checkpointer>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut logits = Vec::new();
    // One layer at a time, in every invocation form.
    #[checkpoint]
    let (h, l) = layers[0].forward(xs, Some(mask), 0.5)?;
    logits.push(l);
    #[checkpoint]
    let (h, l): (Tensor, Tensor) = Routed::forward(&layers[1], &h, None, 2.0)?;
    logits.push(l);
    #[checkpoint]
    let (mut h, l) = layers[0].call_kw(&h, RoutedKwargs { mask: Some(mask), scale: 1.5 })?;
    logits.push(l);
    let f = layers[1].partial(None, 0.25);
    #[checkpoint]
    let (h2, _) = f.call(&h)?;
    h = h2;
    // A pair carry: the tuple carry argument gives the number of carry tensors.
    let residual = h.zeros_like()?;
    #[checkpoint]
    let (h, residual, stat) = pair.forward((&h, &residual))?;
    logits.push(stat);
    let g = pair.partial();
    #[checkpoint]
    let (mut h, mut residual, stat) = g.call((&h, &residual))?;
    logits.push(stat);
    // Loops of curried and kwargs-bound calls.
    let partials: Vec<_> = layers.iter().map(|l| l.partial(Some(mask), 0.5)).collect();
    #[checkpoint]
    for f in &partials {
        let (next, l) = f.call(&h)?;
        h = next;
        logits.push(l);
    }
    #[checkpoint]
    for layer in layers {
        let (next, l) = layer.call_kw(&h, RoutedKwargs { mask: None, scale: 3.0 })?;
        h = next;
        logits.push(l);
    }
    #[checkpoint]
    for _ in 0..2 {
        let (next_h, next_r, stat) = g.call((&h, &residual))?;
        h = next_h;
        residual = next_r;
        logits.push(stat);
    }
    Ok(((h + residual)?, logits))
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let layers = [Routed(Tensor::new(2f32, &dev)?), Routed(Tensor::new(-1f32, &dev)?)];
    let xs = Tensor::new(&[1f32, 2.0], &dev)?;
    let mask = Tensor::new(&[1f32, 0.5], &dev)?;
    let (plain, plain_logits) = run(&layers, &Pair, &xs, &mask, None)?;
    let ckpt = Checkpointer::new(Policy::recompute());
    let (ys, logits) = run(&layers, &Pair, &xs, &mask, Some(&ckpt))?;
    assert_eq!(plain.to_vec1::<f32>()?, ys.to_vec1::<f32>()?);
    assert_eq!(plain_logits.len(), 11);
    assert_eq!(plain_logits.len(), logits.len());
    for (a, b) in plain_logits.iter().zip(&logits) {
        assert_eq!(a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
    }
    // Six stacks of one, and three loops.
    assert_eq!(ckpt.take_stats().stacks, 9);
    Ok(())
}
