use std::sync::Arc;

use candle_core::{Device, Result, Tensor};
use checkpoint_runtime::{Checkpointer, Policy, checkpointable};

/// A shared, cloneable struct passed by reference (like rotary tables).
#[derive(Clone)]
struct Rope {
    cos: Tensor,
}

#[checkpointable]
#[derive(Clone)]
struct Block {
    w: Tensor,
}

#[checkpointable]
impl Block {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        rope: &Rope,
        heads: usize,
        scale: f64,
        causal: bool,
        name: &str,
        weights: &[f32],
        label: Option<&str>,
        act: Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>,
    ) -> Result<Tensor> {
        let _ = (heads, causal, name, label, weights.len());
        let h = xs.broadcast_mul(&self.w)?.broadcast_mul(&rope.cos)?;
        let h = match mask {
            Some(m) => h.broadcast_mul(m)?,
            None => h,
        };
        act(&(h * scale)?)
    }
}

#[checkpointable(engine = ckpt)]
fn run(blocks: &[Block], xs: &Tensor, rope: &Rope, ckpt: &Checkpointer) -> Result<Tensor> {
    let mut xs = xs.clone();
    let act: Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync> = Arc::new(|t| t.tanh());
    #[checkpoint]
    for (i, block) in blocks.iter().enumerate() {
        xs = block.forward(&xs, None, rope, i + 1, 0.5, true, "block", &[1.0, 2.0], Some("x"), act.clone())?;
    }
    Ok(xs)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let blocks = [Block { w: Tensor::new(2f32, &dev)? }];
    let rope = Rope { cos: Tensor::new(1f32, &dev)? };
    let xs = Tensor::new(&[1f32, 2.0], &dev)?;
    let ys = run(&blocks, &xs, &rope, &Checkpointer::new(Policy::recompute()))?;
    assert_eq!(ys.dims(), [2]);
    Ok(())
}
