//! Memory and time of one training step of a Qwen2-like stack, per checkpoint mode.
//!
//! ```text
//! cargo bench -p checkpoint-tests --bench stack -- [--layers 8,16] [--hidden 512] [--seq 256]
//!     [--modes none,recompute] [--steps 3]
//! ```
//!
//! Prints one row per (layers, mode): bytes held after the forward (activations the step keeps
//! alive, above the weights), peak bytes during the step, and the median step time.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Var};
use checkpoint_runtime::{Checkpointer, Mode, Policy};
use checkpoint_tests::alloc::{self, CountingAlloc};
use checkpoint_tests::block::{Block, BlockConfig, BlockKwargs};
use checkpoint_tests::init::Init;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

struct Args {
    layers: Vec<usize>,
    modes: Vec<Mode>,
    hidden: usize,
    seq: usize,
    steps: usize,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = Args {
        layers: vec![8],
        modes: vec![Mode::None, Mode::Recompute],
        hidden: 512,
        seq: 256,
        steps: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue; // passed by cargo bench
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--layers" => {
                args.layers = value
                    .split(',')
                    .map(num)
                    .collect::<std::result::Result<_, _>>()?
            }
            "--modes" => {
                args.modes = value
                    .split(',')
                    .map(|m| m.parse::<Mode>().map_err(|e| e.to_string()))
                    .collect::<std::result::Result<_, _>>()?;
            }
            "--hidden" => args.hidden = num(&value)?,
            "--seq" => args.seq = num(&value)?,
            "--steps" => args.steps = num(&value)?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(args)
}

struct Row {
    after_forward: usize,
    peak: usize,
    step: Duration,
}

fn run(mode: Mode, layers: &[Block], kwargs: &BlockKwargs, x: &Var, steps: usize) -> Result<Row> {
    let ckpt = Checkpointer::new(Policy::new(mode));
    let mut times = Vec::with_capacity(steps);
    let (mut after_forward, mut peak) = (0, 0);
    for _ in 0..=steps {
        let base = alloc::held();
        alloc::reset_peak();
        let started = Instant::now();
        let y = ckpt.run_stack(x.as_tensor(), layers.iter().map(|l| (l, kwargs.clone())))?;
        let loss = y.sqr()?.mean_all()?;
        after_forward = alloc::held().saturating_sub(base);
        let grads = ckpt.backward(&loss)?;
        times.push(started.elapsed());
        peak = alloc::peak().saturating_sub(base);
        drop((grads, y, loss));
    }
    times.remove(0); // warm-up
    times.sort();
    Ok(Row {
        after_forward,
        peak,
        step: times[times.len() / 2],
    })
}

#[allow(clippy::cast_precision_loss)]
fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() -> Result<()> {
    let args = parse_args().map_err(candle_core::Error::msg)?;
    let cfg = BlockConfig {
        hidden: args.hidden,
        heads: 8,
        kv_heads: 2,
        intermediate: args.hidden * 11 / 4,
        eps: 1e-6,
    };
    let dev = Device::Cpu;
    println!(
        "Qwen2-like stack, hidden {}, seq {}, batch 1, f32, CPU; median of {} steps",
        args.hidden, args.seq, args.steps
    );
    println!(
        "| layers | mode         | held after forward (MiB) | peak (MiB) | step (ms) | step / recompute |"
    );
    println!(
        "|-------:|--------------|-------------------------:|-----------:|----------:|-----------------:|"
    );
    for &depth in &args.layers {
        let mut init = Init::new(1);
        let layers = (0..depth)
            .map(|_| Block::new(cfg, &mut init, DType::F32, &dev))
            .collect::<Result<Vec<_>>>()?;
        let kwargs = BlockKwargs::new(&cfg, args.seq, DType::F32, &dev)?;
        let x = init.var((1, args.seq, args.hidden), 1.0, DType::F32, &dev)?;
        let rows = args
            .modes
            .iter()
            .map(|&m| run(m, &layers, &kwargs, &x, args.steps.max(1)).map(|r| (m, r)))
            .collect::<Result<Vec<_>>>()?;
        let reference = rows
            .iter()
            .find(|(m, _)| *m == Mode::Recompute)
            .map(|(_, r)| r.step.as_secs_f64());
        for (mode, row) in &rows {
            let ratio = reference.map_or_else(
                || "-".to_owned(),
                |r| format!("{:.2}", row.step.as_secs_f64() / r),
            );
            println!(
                "| {depth:>6} | {:<12} | {:>24.1} | {:>10.1} | {:>9.1} | {ratio:>16} |",
                mode.as_str(),
                mib(row.after_forward),
                mib(row.peak),
                row.step.as_secs_f64() * 1e3,
            );
        }
    }
    Ok(())
}
