//! What each mode keeps alive, measured with a counting global allocator. One test in this
//! binary: the counters are process-wide.

use candle_core::{DType, Device, Result, Tensor, Var};
use checkpoint_runtime::{Checkpointer, Mode, Policy};
use checkpoint_tests::alloc::{self, CountingAlloc};
use checkpoint_tests::block::{Block, BlockConfig, BlockKwargs};
use checkpoint_tests::init::Init;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Bookkeeping allowed on top of the tensors: layer clones, records, the graph node.
const SLACK: usize = 64 * 1024;

struct Held {
    after_forward: usize,
    after_backward: usize,
}

fn measure(mode: Mode, layers: &[Block], kwargs: &BlockKwargs, x: &Var) -> Result<Held> {
    let ckpt = Checkpointer::new(Policy::new(mode));
    let base = alloc::held();
    let y = ckpt.run_stack(x.as_tensor(), layers.iter().map(|l| (l, kwargs.clone())))?;
    let loss = y.sqr()?.mean_all()?;
    let after_forward = alloc::held().saturating_sub(base);
    let grads = ckpt.backward(&loss)?;
    drop((y, loss));
    let after_backward = alloc::held().saturating_sub(base);
    drop(grads);
    Ok(Held {
        after_forward,
        after_backward,
    })
}

fn bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

#[test]
fn recompute_holds_boundaries_and_none_holds_the_graph() -> Result<()> {
    let (depth, cfg) = (8, BlockConfig::small(64));
    let mut init = Init::new(2);
    let layers = (0..depth)
        .map(|_| Block::new(cfg, &mut init, DType::F32, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let kwargs = BlockKwargs::new(&cfg, 64, DType::F32, &Device::Cpu)?;
    let x = init.var((2, 64, 64), 1.0, DType::F32, &Device::Cpu)?;
    let boundary = bytes(x.as_tensor());
    let params: usize = layers
        .iter()
        .flat_map(|l| l.vars())
        .map(|v| bytes(v.as_tensor()))
        .sum();

    // Warm up thread pools and allocator caches so that they do not count below.
    measure(Mode::Recompute, &layers, &kwargs, &x)?;
    measure(Mode::None, &layers, &kwargs, &x)?;

    let plain = measure(Mode::None, &layers, &kwargs, &x)?;
    let ckpt = measure(Mode::Recompute, &layers, &kwargs, &x)?;
    println!(
        "boundary {boundary} B, params {params} B; after forward: none {} B, recompute {} B; \
         after backward: none {} B, recompute {} B",
        plain.after_forward, ckpt.after_forward, plain.after_backward, ckpt.after_backward
    );

    // Boundaries of layers 1..depth plus the stack output; layer 0's boundary is the input itself.
    assert!(
        ckpt.after_forward <= depth * boundary + SLACK,
        "recompute holds {} B after forward, more than {depth} boundaries of {boundary} B",
        ckpt.after_forward
    );
    assert!(
        plain.after_forward >= 8 * depth * boundary,
        "none should hold the whole graph, held only {} B",
        plain.after_forward
    );
    // After backward: the parameter gradients and the input's, no activation.
    for (name, held) in [("none", &plain), ("recompute", &ckpt)] {
        assert!(
            held.after_backward >= params && held.after_backward <= params + boundary + SLACK,
            "{name}: {} B held after backward, expected the gradients' {} B",
            held.after_backward,
            params + boundary
        );
    }
    Ok(())
}
