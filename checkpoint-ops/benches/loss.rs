//! Peak memory and time of the language-modelling loss, forward and backward: the fused, chunked
//! `cross_entropy` against the composite candle ops (f32 copy, log-softmax, gather), as Qwen2's
//! `loss.rs` computed it before.
//!
//! ```sh
//! cargo bench -p checkpoint-ops --bench loss -- --batch 8 --len 512 --vocab 151936 --reps 3
//! ```
//!
//! `--dtype bf16` gives the logits in bf16; `--unchunked no` measures the chunked loss alone
//! (the composite needs about ten times the logits' bytes).
//!
//! Peak: the most bytes the process held above what it held before the step (the logits
//! themselves excluded, their gradient included), counted by `checkpoint_tests`' counting
//! allocator. Time: the median over `--reps`.

use std::time::Instant;

use candle_core::{D, DType, Device, Result, Tensor, Var};
use checkpoint_tests::alloc::{self, CountingAlloc};

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// Today's composite: f32 copy, log-softmax, gather, weighted mean.
fn composite(logits: &Tensor, targets: &[i64]) -> Result<Tensor> {
    let n = targets.len();
    let (index, weight): (Vec<u32>, Vec<f32>) = targets
        .iter()
        .map(|&y| u32::try_from(y).map_or((0, 0.0), |id| (id, 1.0)))
        .unzip();
    let count = f64::from(weight.iter().sum::<f32>());
    let device = logits.device();
    let index = Tensor::from_vec(index, (n, 1), device)?;
    let weight = Tensor::from_vec(weight, n, device)?;
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = log_probs.gather(&index, 1)?.squeeze(1)?;
    (picked * weight)?.sum_all()?.neg()? / count
}

fn fused(logits: &Tensor, targets: &[i64]) -> Result<Tensor> {
    let targets = Tensor::from_slice(targets, targets.len(), logits.device())?;
    checkpoint_ops::cross_entropy(logits, &targets)
}

struct Args {
    batch: usize,
    len: usize,
    vocab: usize,
    reps: usize,
    dtype: DType,
    unchunked: bool,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = Args {
        batch: 8,
        len: 512,
        vocab: 151_936,
        reps: 3,
        dtype: DType::F32,
        unchunked: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            continue; // cargo bench passes it to harness = false targets
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--batch" => args.batch = number()?,
            "--len" => args.len = number()?,
            "--vocab" => args.vocab = number()?,
            "--reps" => args.reps = number()?.max(1),
            "--dtype" => {
                args.dtype = match value.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    other => return Err(format!("--dtype {other}: use f32 or bf16")),
                }
            }
            "--unchunked" => {
                args.unchunked = match value.as_str() {
                    "yes" => true,
                    "no" => false,
                    other => return Err(format!("--unchunked {other}: use yes or no")),
                }
            }
            other => {
                return Err(format!(
                    "unknown flag {other}; use --batch, --len, --vocab, --reps, --dtype, --unchunked"
                ));
            }
        }
    }
    Ok(args)
}

type Loss = fn(&Tensor, &[i64]) -> Result<Tensor>;

/// (peak bytes above the start, median seconds) of forward + backward.
fn measure(loss: Loss, logits: &Var, targets: &[i64], reps: usize) -> Result<(usize, f64)> {
    let mut peak = 0;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = alloc::held();
        alloc::reset_peak();
        let t0 = Instant::now();
        let value = loss(logits, targets)?;
        let grads = value.backward()?;
        let grad = grads
            .get(logits.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("the logits got no gradient".into()))?;
        // Make sure the work happened (and is not optimised away).
        let _ = (value.to_scalar::<f32>()?, grad.dims());
        times.push(t0.elapsed().as_secs_f64());
        drop(grads);
        peak = peak.max(alloc::peak() - start);
    }
    times.sort_by(f64::total_cmp);
    Ok((peak, times[times.len() / 2]))
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let (n, vocab) = (args.batch * args.len, args.vocab);
    let logits = Var::from_tensor(
        &Tensor::randn(0f32, 2.0, (n, vocab), &Device::Cpu)?.to_dtype(args.dtype)?,
    )?;
    // Every 10th token ignored, as padding would be.
    let targets: Vec<i64> = (0..n)
        .map(|i| {
            if i % 10 == 9 {
                checkpoint_ops::IGNORE_INDEX
            } else {
                i64::try_from(i * 7919 % vocab).unwrap_or(0)
            }
        })
        .collect();
    #[allow(clippy::cast_precision_loss)]
    let mib = |bytes: usize| bytes as f64 / f64::from(1u32 << 20);
    let logits_bytes = n * vocab * args.dtype.size_in_bytes();
    println!(
        "loss forward + backward: batch {}, length {}, vocab {vocab} ({n} tokens), {:?} logits \
         ({:.1} MiB), median of {} run(s), {} rayon threads",
        args.batch,
        args.len,
        args.dtype,
        mib(logits_bytes),
        args.reps,
        rayon::current_num_threads()
    );
    println!();
    println!(
        "| loss                           | peak above logits (MiB) | peak / logits | time (ms) |"
    );
    println!(
        "|--------------------------------|------------------------:|--------------:|----------:|"
    );
    // The chunked loss first: the composite needs about ten times the logits and may not fit
    // (`--unchunked no` leaves it out).
    let cases: [(&str, Loss); 2] = [
        ("chunked (fused cross_entropy)", fused),
        ("unchunked (composite candle ops)", composite),
    ];
    for (name, loss) in cases.into_iter().take(if args.unchunked { 2 } else { 1 }) {
        let (peak, secs) = measure(loss, &logits, &targets, args.reps)?;
        #[allow(clippy::cast_precision_loss)]
        let ratio = peak as f64 / logits_bytes as f64;
        println!(
            "| {name:<30} | {:>23.1} | {ratio:>13.2} | {:>9.1} |",
            mib(peak),
            secs * 1e3
        );
    }
    Ok(())
}
