//! What each mode keeps alive, measured with a counting global allocator. The counters are
//! process-wide, so the tests of this binary take turns.

use std::sync::{Mutex, PoisonError};

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::Linear;
use checkpoint_runtime::{Checkpointer, DiskConfig, Layer, Mode, Placement, Policy};
use checkpoint_tests::alloc::{self, CountingAlloc};
use checkpoint_tests::block::{Block, BlockConfig, BlockKwargs};
use checkpoint_tests::init::Init;
use checkpoint_tests::mlp::MlpBlock;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

static SERIAL: Mutex<()> = Mutex::new(());

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
    let _turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
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

/// Disk offload: the bytes held after the forward stay flat as the stack gets deeper.
#[test]
fn disk_offload_holds_the_same_bytes_at_every_depth() -> Result<()> {
    let _turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let cfg = BlockConfig::small(128);
    let mut init = Init::new(3);
    let layers = (0..16)
        .map(|_| Block::new(cfg, &mut init, DType::F32, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let kwargs = BlockKwargs::new(&cfg, 64, DType::F32, &Device::Cpu)?;
    let x = init.var((2, 64, 128), 1.0, DType::F32, &Device::Cpu)?;
    let boundary = bytes(x.as_tensor());
    let config = DiskConfig::default();
    let queue = config.write_queue;
    let ckpt = Checkpointer::with_disk(Policy::new(Mode::OffloadDisk), config);

    let mut rows = Vec::new();
    for depth in [2, 4, 8, 16, 2] {
        let base = alloc::held();
        let y = ckpt.run_stack(
            x.as_tensor(),
            layers[..depth].iter().map(|l| (l, kwargs.clone())),
        )?;
        let in_flight = alloc::held().saturating_sub(base);
        ckpt.flush()?;
        let written = alloc::held().saturating_sub(base);
        ckpt.backward(&y.sum_all()?)?;
        drop(y);
        rows.push((depth, in_flight, written));
    }
    println!("boundary {boundary} B; (depth, held after forward, after flush): {rows:?}");
    // The first row warms up threads and caches; the last repeats depth 2 to show it.
    let settled = &rows[1..];
    let lo = settled.iter().map(|r| r.2).min().unwrap_or(0);
    let hi = settled.iter().map(|r| r.2).max().unwrap_or(0);
    assert!(
        hi - lo < boundary / 4,
        "held after forward varies by {} B across depths 4..16 (a boundary is {boundary} B)",
        hi - lo
    );
    for &(depth, in_flight, written) in settled {
        assert!(
            written <= boundary + SLACK,
            "depth {depth}: {written} B held once written, more than the output"
        );
        assert!(
            in_flight <= (queue + 2) * boundary + SLACK,
            "depth {depth}: {in_flight} B held while writing, more than the writer queue allows"
        );
    }
    Ok(())
}

/// A budget plan on a real stack: the bytes measured after the forward fit the budget.
#[test]
fn a_budget_plan_fits_in_measured_memory() -> Result<()> {
    let _turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let (depth, cfg) = (8, BlockConfig::small(64));
    let mut init = Init::new(5);
    let layers = (0..depth)
        .map(|_| Block::new(cfg, &mut init, DType::F32, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let kwargs = BlockKwargs::new(&cfg, 64, DType::F32, &Device::Cpu)?;
    let x = init.var((2, 64, 64), 1.0, DType::F32, &Device::Cpu)?;
    let output = bytes(x.as_tensor());
    let plain = measure(Mode::None, &layers, &kwargs, &x)?.after_forward;
    for (mode, budget) in [
        (Mode::Recompute, plain / 2),
        (Mode::OffloadDisk, plain / 8),
        (Mode::OffloadDisk, 0),
    ] {
        let ckpt = Checkpointer::with_disk(
            Policy::new(mode).budget(budget as u64),
            DiskConfig::default(),
        );
        let run = |ckpt: &Checkpointer| -> Result<usize> {
            let base = alloc::held();
            let y = ckpt.run_stack(x.as_tensor(), layers.iter().map(|l| (l, kwargs.clone())))?;
            ckpt.flush()?;
            let held = alloc::held().saturating_sub(base);
            ckpt.backward(&y.sum_all()?)?;
            Ok(held)
        };
        run(&ckpt)?; // the probe step
        let held = run(&ckpt)?;
        let plan = ckpt.budget_plans().remove(0);
        println!("{mode}, budget {budget} B: held {held} B after forward\n{plan}");
        assert!(
            held <= budget + output + SLACK,
            "{mode}: {held} B held after forward, budget {budget} B (+ the {output} B output)"
        );
        // The plan uses its budget rather than recomputing everything: it stops converting
        // layers as soon as the rest fits, so it keeps more than the budget less one layer's
        // graph, and the memory measured agrees with the plan's estimate.
        let largest = plan
            .costs
            .iter()
            .map(|c| c.graph_bytes + c.boundary_bytes)
            .max()
            .unwrap_or(0);
        assert!(
            plan.device_bytes + largest >= budget as u64,
            "{mode}: the plan keeps {} B of a {budget} B budget\n{plan}",
            plan.device_bytes
        );
        assert!(
            held as u64 + largest >= plan.device_bytes,
            "{mode}: {held} B held after forward, the plan expected {} B\n{plan}",
            plan.device_bytes
        );
        if budget >= plain / 2 {
            assert!(
                plan.placements.contains(&Placement::Graph),
                "{mode}: half the plain graph's bytes leave room to keep some graphs\n{plan}"
            );
        }
    }
    Ok(())
}

/// A layer around one `Linear`.
#[derive(Clone)]
struct Dense(Linear);

impl Layer for Dense {
    fn forward_checkpointed(&self, x: &Tensor, (): &()) -> Result<Tensor> {
        self.0.forward(x)
    }
}

/// The planner charges a layer its activations, not its weights: `Linear` multiplies by
/// `weight.t()`, a view of the parameter that the graph holds but that is alive anyway.
#[test]
fn a_linear_on_a_tiny_input_is_charged_about_the_input() -> Result<()> {
    let _turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let mut init = Init::new(6);
    let weight = init.var((256, 256), 0.1, DType::F32, &Device::Cpu)?;
    let layer = Dense(Linear::new(weight.as_tensor().clone(), None));
    let x = init.var((1, 256), 1.0, DType::F32, &Device::Cpu)?;
    let ckpt = Checkpointer::new(Policy::recompute().budget(u64::MAX));
    let y = ckpt.run(&layer, x.as_tensor(), ())?;
    ckpt.backward(&y.sum_all()?)?;
    let cost = ckpt.budget_plans().remove(0).costs[0];
    let input = bytes(x.as_tensor()) as u64;
    println!(
        "input {input} B, weight {} B: graph {} B",
        bytes(weight.as_tensor()),
        cost.graph_bytes
    );
    // The graph keeps the (1, 256) product: the input's size.
    assert!(
        (input..=2 * input).contains(&cost.graph_bytes),
        "a Linear on a {input} B input is charged {} B",
        cost.graph_bytes
    );
    Ok(())
}

/// Padded batches: every length whose carry rounds up to the same power of two shares one
/// plan, made on the largest of them; a larger carry in the bucket is probed anew.
#[test]
fn lengths_in_one_bucket_reuse_one_plan() -> Result<()> {
    let _turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let mut init = Init::new(7);
    let layers = (0..3)
        .map(|_| MlpBlock::new(8, &mut init, DType::F32, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let step = |ckpt: &Checkpointer, len: usize| -> Result<()> {
        let x = Tensor::ones((1, len, 8), DType::F32, &Device::Cpu)?;
        let y = ckpt.run_stack(&x, layers.iter().map(|l| (l, ())))?;
        ckpt.backward(&y.sum_all()?)?;
        Ok(())
    };
    // A probe is recognisable by the boundary it measured: `len` rows of 8 f32.
    let probed_lengths = |ckpt: &Checkpointer| -> Vec<u64> {
        ckpt.budget_plans()
            .iter()
            .map(|p| p.costs[0].boundary_bytes / 32)
            .collect()
    };
    let ckpt = Checkpointer::new(Policy::recompute().budget(u64::MAX));
    for len in [64, 40, 50, 33, 64] {
        step(&ckpt, len)?; // 8 × len elements: all in the bucket of 512
    }
    assert_eq!(probed_lengths(&ckpt), [64]);
    step(&ckpt, 100)?;
    step(&ckpt, 65)?;
    assert_eq!(probed_lengths(&ckpt), [64, 100]);
    // Growing within a bucket: the plan follows the largest carry.
    step(&ckpt, 120)?;
    step(&ckpt, 70)?;
    assert_eq!(probed_lengths(&ckpt), [64, 120]);
    Ok(())
}
