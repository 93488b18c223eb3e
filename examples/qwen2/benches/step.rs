//! Time and memory of one full Qwen2 training step (forward, backward, gradient clipping,
//! AdamW) per checkpoint mode, segment length, depth and sequence length: the work that
//! `scripts/torch_step.py` does in PyTorch.
//!
//! ```text
//! cargo bench -p qwen2 --bench step -- [--layers 4,8] [--modes none,recompute,offload-disk]
//!     [--segments 1,2] [--seq 128] [--batch 4] [--steps 3] [--warmup 1]
//!     [--csv FILE] [--svg FILE]
//! ```
//!
//! The shape is [`qwen2::bench::bench_config`] (hidden 512, 8 heads over 2 key/value heads,
//! MLP 1408, vocabulary 4096), f32, random init and random tokens. Every configuration runs in
//! a child process of its own (this binary with `--child`), so that its peak resident memory is
//! its own. Per configuration it reports the median over the measured steps of the step time
//! and of its phases, the bytes the step holds when the forward is done (above what it held
//! before the step), the peak bytes held during a step (weights, gradients and AdamW state
//! included; counted by the global allocator) and the process's peak RSS.
//!
//! Beside each checkpointed row it prints the row's floor. Time: the plain step plus one more
//! forward of the decoder stack (the plain forward minus that of the embedding, head and loss,
//! measured on a model without layers): what recomputing every layer once must cost. Memory:
//! what must be held at once in any checkpointed step: the weights and AdamW state (held
//! before the step), the gradients (as many bytes as the parameters), the row's boundaries and
//! one layer's activations (those of the plain forward without the head's, divided by the
//! depth).
//!
//! It writes the rows as CSV (default `target/bench/step.csv`) and draws step time and peak
//! memory against depth, one line per mode (default `target/bench/step.svg`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use candle_core::{DType, Device};
use checkpoint_runtime::{Mode, Stats};
use checkpoint_tests::alloc::{self, CountingAlloc};
use clap::Parser;
use plotters::prelude::*;
use qwen2::bench::{TrainStep, bench_config, random_batch};
use qwen2::cli;
use qwen2::train::{CheckpointOptions, peak_rss_bytes};
use qwen2::{Error, Result, loader};
use serde::{Deserialize, Serialize};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Seeds: the same model and batch in every configuration.
const MODEL_SEED: u64 = 1234;
const BATCH_SEED: u64 = 7;
/// The learning rate is irrelevant to the cost of a step; a small one keeps the loss finite.
const LR: f64 = 1e-4;
const WEIGHT_DECAY: f64 = 0.1;
const CLIP: f64 = 1.0;

#[derive(Debug, Parser)]
#[command(about = "Time and memory of one Qwen2 training step per checkpoint mode")]
struct Args {
    /// Decoder depths.
    #[arg(long, value_delimiter = ',', default_value = "4,8")]
    layers: Vec<usize>,
    /// none | recompute | offload-disk (offload-host: with --features cuda only).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,recompute,offload-disk"
    )]
    modes: Vec<Mode>,
    /// Layers per checkpointed segment (each value: one row per checkpointing mode).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    segments: Vec<usize>,
    /// Sequence lengths (tokens per example).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    seq: Vec<usize>,
    /// Examples per batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Measured steps per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Steps run before measuring (allocator and thread-pool warm-up).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Where to write the rows as CSV [default: target/bench/step.csv]; a relative path is
    /// relative to examples/qwen2, where cargo runs the bench.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Where to draw step time and peak memory against depth [default: target/bench/step.svg];
    /// relative as --csv.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// offload-disk: the directory under which the engine creates its own.
    #[arg(long, value_name = "DIR")]
    offload_dir: Option<PathBuf>,
    /// Run one configuration (the first of each list) and print its row as JSON.
    #[arg(long, hide = true)]
    child: bool,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One configuration's measurements.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    layers: usize,
    seq: usize,
    batch: usize,
    mode: String,
    /// Layers per segment; 0 for `none`.
    segment: usize,
    step_ms: f64,
    forward_ms: f64,
    backward_ms: f64,
    optimizer_ms: f64,
    /// Time the engine spent re-running layers, per step.
    recompute_ms: f64,
    /// Bytes held when the loss is computed, above those held before the step.
    held_after_forward: u64,
    /// Boundary bytes kept in memory (device and host) between forward and backward.
    boundary_bytes: u64,
    /// Boundary bytes written to disk.
    disk_bytes: u64,
    /// The most bytes held at once during a measured step.
    peak_bytes: u64,
    /// The child process's peak resident memory.
    peak_rss: Option<u64>,
    /// Bytes held before a step: weights, AdamW state, the engine's and the allocator's own.
    #[serde(default)]
    base_bytes: u64,
    /// Bytes of the parameters (and so of their gradients).
    #[serde(default)]
    param_bytes: u64,
    /// `none` rows: the forward and the bytes held after it of the same model without layers.
    head_forward_ms: Option<f64>,
    head_held_after_forward: Option<u64>,
    final_loss: f32,
}

/// A row's floor, from the plain row of the same depth and sequence length.
#[derive(Debug, Clone, Copy)]
struct Floor {
    step_ms: f64,
    peak_bytes: u64,
}

fn main() -> ExitCode {
    // SAFETY: the first statement of `main`: no other thread exists yet. Child processes
    // inherit the setting through the environment.
    unsafe { qwen2::threads::limit_idle_spinning() };
    let args = Args::parse();
    let result = if args.child {
        child(&args).map(|row| match serde_json::to_string(&row) {
            Ok(json) => println!("ROW {json}"),
            Err(e) => eprintln!("error: {e}"),
        })
    } else {
        parent(&args)
    };
    cli::exit_code(result)
}

fn check_args(args: &Args, device: &Device) -> Result<()> {
    let refuse = |what: &str, why: &str| Err(Error::Data(format!("{what}: {why}")));
    if args.layers.is_empty() || args.layers.contains(&0) {
        return refuse(
            "--layers",
            "give one or more depths of at least 1 (e.g. 4,8)",
        );
    }
    if args.seq.is_empty() || args.seq.iter().any(|&s| s < 2) {
        return refuse(
            "--seq",
            "give one or more sequence lengths of at least 2 (e.g. 128,256)",
        );
    }
    if args.segments.is_empty() || args.segments.contains(&0) {
        return refuse(
            "--segments",
            "a segment holds at least one layer (1 checkpoints every layer)",
        );
    }
    if args.batch == 0 || args.steps == 0 {
        return refuse("--batch/--steps", "both must be at least 1");
    }
    if args.modes.is_empty() {
        return refuse("--modes", "give one or more of none,recompute,offload-disk");
    }
    if args.modes.contains(&Mode::OffloadHost) && !device.is_cuda() {
        return refuse(
            "--modes offload-host",
            "on a CPU device host memory is the device's memory: offload-host keeps every \
             boundary in place and measures what recompute does. Benchmark it on a GPU \
             (cargo bench -p qwen2 --features cuda --bench step) or drop it",
        );
    }
    if args.offload_dir.is_some() && !args.modes.contains(&Mode::OffloadDisk) {
        return refuse(
            "--offload-dir",
            "it configures disk offload; add offload-disk to --modes",
        );
    }
    Ok(())
}

/// Runs every configuration in a child process, then prints, writes and draws the rows.
fn parent(args: &Args) -> Result<()> {
    let device = cli::device()?;
    check_args(args, &device)?;
    let exe = std::env::current_exe().map_err(|source| io_error("the benchmark binary", source))?;
    let mut configs = Vec::new();
    for &seq in &args.seq {
        for &layers in &args.layers {
            for &mode in &args.modes {
                let segments: &[usize] = if mode == Mode::None {
                    &[0]
                } else {
                    &args.segments
                };
                configs.extend(segments.iter().map(|&segment| (seq, layers, mode, segment)));
            }
        }
    }
    eprintln!(
        "{} configurations, each in its own process: {} warm-up + {} measured steps, batch {}, \
         f32 on {}",
        configs.len(),
        args.warmup,
        args.steps,
        args.batch,
        if device.is_cuda() { "cuda:0" } else { "cpu" }
    );
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (i, &(seq, layers, mode, segment)) in configs.iter().enumerate() {
        let name = format!("{layers} layers, seq {seq}, {mode}, segments of {segment}");
        eprintln!("[{}/{}] {name}", i + 1, configs.len());
        let mut cmd = Command::new(&exe);
        cmd.arg("--child")
            .args(["--layers", &layers.to_string()])
            .args(["--modes", mode.as_str()])
            .args(["--segments", &segment.max(1).to_string()])
            .args(["--seq", &seq.to_string()])
            .args(["--batch", &args.batch.to_string()])
            .args(["--steps", &args.steps.to_string()])
            .args(["--warmup", &args.warmup.to_string()]);
        if let Some(dir) = &args.offload_dir {
            cmd.arg("--offload-dir").arg(dir);
        }
        let out = cmd
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| io_error(&exe, e))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let row = stdout
            .lines()
            .find_map(|l| l.strip_prefix("ROW "))
            .and_then(|json| serde_json::from_str::<Row>(json).ok());
        match (out.status.success(), row) {
            (true, Some(row)) => rows.push(row),
            _ => {
                eprintln!("  failed ({}): no row", out.status);
                failed.push(name);
            }
        }
    }
    let floors = floors(&rows);
    print!("{}", table(&rows, &floors, args));
    let csv = args
        .csv
        .clone()
        .unwrap_or_else(|| default_output("step.csv"));
    write_csv(&csv, &rows, &floors)?;
    let svg = args
        .svg
        .clone()
        .unwrap_or_else(|| default_output("step.svg"));
    draw(&svg, &rows, args.batch)?;
    eprintln!("wrote {} and {}", csv.display(), svg.display());
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Data(format!(
            "{} configuration(s) failed (see their errors above): {}",
            failed.len(),
            failed.join("; ")
        )))
    }
}

/// `target/bench/NAME` of this workspace (`CARGO_TARGET_DIR` when set).
fn default_output(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        PathBuf::from,
    );
    target.join("bench").join(name)
}

fn io_error(path: impl AsRef<Path>, source: std::io::Error) -> Error {
    Error::Io {
        path: path.as_ref().to_owned(),
        source,
    }
}

#[allow(clippy::cast_precision_loss)]
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One configuration, in this process.
fn child(args: &Args) -> Result<Row> {
    let device = cli::device()?;
    check_args(args, &device)?;
    let (layers, seq, mode, segment) =
        (args.layers[0], args.seq[0], args.modes[0], args.segments[0]);
    let cfg = bench_config(layers);
    let loaded = loader::random(&cfg, MODEL_SEED, DType::F32, &device)?;
    let batch = random_batch(args.batch, seq, cfg.vocab_size, BATCH_SEED, &device)?;
    let mut options = CheckpointOptions::new(mode);
    options.segment = segment;
    options.offload_dir.clone_from(&args.offload_dir);
    let ckpt = options.checkpointer()?;
    let mut step = TrainStep::new(&loaded.params, LR, WEIGHT_DECAY, CLIP)?;

    let (mut total, mut forward, mut backward, mut optimizer, mut recompute) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut held_after_forward, mut peak, mut base, mut loss) = (0, 0, 0, f32::NAN);
    let mut stats = Stats::default();
    for i in 0..args.warmup + args.steps {
        let _ = ckpt.take_stats();
        let before = alloc::held();
        alloc::reset_peak();
        let mut after_forward = 0;
        let times = step.run(&loaded.model, &batch, &ckpt, || {
            after_forward = alloc::held().saturating_sub(before);
        })?;
        stats = ckpt.take_stats();
        if i < args.warmup {
            continue;
        }
        total.push(ms(times.total()));
        forward.push(ms(times.forward));
        backward.push(ms(times.backward));
        optimizer.push(ms(times.optimizer));
        recompute.push(ms(stats.recompute));
        held_after_forward = held_after_forward.max(after_forward);
        peak = peak.max(alloc::peak());
        base = base.max(before);
        loss = times.loss;
    }
    let peak_rss = peak_rss_bytes();
    let (head_forward_ms, head_held_after_forward) = if mode == Mode::None {
        let (ms, held) = head_forward(args, seq, &device)?;
        (Some(ms), Some(u64::try_from(held).unwrap_or(u64::MAX)))
    } else {
        (None, None)
    };
    let as_u64 = |b: usize| u64::try_from(b).unwrap_or(u64::MAX);
    Ok(Row {
        layers,
        seq,
        batch: args.batch,
        mode: mode.as_str().to_owned(),
        segment: if mode == Mode::None { 0 } else { segment },
        step_ms: median(total),
        forward_ms: median(forward),
        backward_ms: median(backward),
        optimizer_ms: median(optimizer),
        recompute_ms: median(recompute),
        held_after_forward: as_u64(held_after_forward),
        boundary_bytes: stats.device_bytes + stats.host_bytes,
        disk_bytes: stats.disk_bytes,
        peak_bytes: as_u64(peak),
        peak_rss,
        base_bytes: as_u64(base),
        param_bytes: loaded
            .params
            .iter()
            .map(|(_, v)| as_u64(v.elem_count() * v.dtype().size_in_bytes()))
            .sum(),
        head_forward_ms,
        head_held_after_forward,
        final_loss: loss,
    })
}

/// The median forward time and the bytes held after the forward of the same model without
/// decoder layers (embedding, final norm, head, loss): the part of the forward that
/// checkpointing never re-runs.
fn head_forward(args: &Args, seq: usize, device: &Device) -> Result<(f64, usize)> {
    let cfg = bench_config(0);
    let loaded = loader::random(&cfg, MODEL_SEED, DType::F32, device)?;
    let batch = random_batch(args.batch, seq, cfg.vocab_size, BATCH_SEED, device)?;
    let (mut times, mut held) = (Vec::new(), 0);
    for i in 0..args.warmup + args.steps {
        let before = alloc::held();
        let started = std::time::Instant::now();
        let logits = loaded
            .model
            .forward(&batch.input_ids, Some(&batch.attention_mask), None)?;
        let loss = qwen2::loss::causal_lm_loss(&logits, &batch.labels)?;
        drop(logits);
        let elapsed = started.elapsed();
        held = held.max(alloc::held().saturating_sub(before));
        drop(loss);
        if i >= args.warmup {
            times.push(ms(elapsed));
        }
    }
    Ok((median(times), held))
}

/// Each checkpointed row's floor, from the plain row of its depth and sequence length.
fn floors(rows: &[Row]) -> Vec<Option<Floor>> {
    rows.iter()
        .map(|row| {
            if row.mode == Mode::None.as_str() {
                return None;
            }
            let plain = rows.iter().find(|r| {
                r.mode == Mode::None.as_str() && (r.layers, r.seq) == (row.layers, row.seq)
            })?;
            let head_ms = plain.head_forward_ms?;
            let head_held = plain.head_held_after_forward?;
            // The layers' activations in the plain step; one layer's share of them.
            let activations = plain.held_after_forward.saturating_sub(head_held);
            let one_layer = activations / u64::try_from(plain.layers.max(1)).unwrap_or(1);
            Some(Floor {
                step_ms: plain.step_ms + (plain.forward_ms - head_ms).max(0.0),
                // What must coexist: weights and AdamW state, the gradients (all alive before
                // the optimizer runs), the boundaries and the activations of the one layer
                // being recomputed.
                peak_bytes: row.base_bytes + row.param_bytes + row.boundary_bytes + one_layer,
            })
        })
        .collect()
}

#[allow(clippy::cast_precision_loss)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

fn table(rows: &[Row], floors: &[Option<Floor>], args: &Args) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nQwen2 training step (forward, backward, clip, AdamW): hidden 512, 8/2 heads, MLP \
         1408, vocab 4096, batch {}, f32; median of {} steps after {} warm-up",
        args.batch, args.steps, args.warmup
    );
    let _ = writeln!(
        out,
        "| layers |  seq | mode         | seg | step (ms) | floor (ms) | fwd (ms) | bwd (ms) | \
         opt (ms) | recompute (ms) | held after fwd (MiB) | boundaries (MiB) | peak (MiB) | \
         floor (MiB) | peak RSS (MiB) |"
    );
    let _ = writeln!(
        out,
        "|-------:|-----:|--------------|----:|----------:|-----------:|---------:|---------:|\
         ---------:|---------------:|---------------------:|-----------------:|-----------:|\
         ------------:|---------------:|"
    );
    for (row, floor) in rows.iter().zip(floors) {
        let seg = if row.segment == 0 {
            "-".to_owned()
        } else {
            row.segment.to_string()
        };
        let floor_ms = floor.map_or_else(|| "-".to_owned(), |f| format!("{:.0}", f.step_ms));
        let floor_mib =
            floor.map_or_else(|| "-".to_owned(), |f| format!("{:.1}", mib(f.peak_bytes)));
        let rss = row
            .peak_rss
            .map_or_else(|| "n/a".to_owned(), |b| format!("{:.0}", mib(b)));
        let _ = writeln!(
            out,
            "| {:>6} | {:>4} | {:<12} | {seg:>3} | {:>9.0} | {floor_ms:>10} | {:>8.0} | {:>8.0} | \
             {:>8.0} | {:>14.0} | {:>20.1} | {:>16.1} | {:>10.1} | {floor_mib:>11} | {rss:>14} |",
            row.layers,
            row.seq,
            row.mode,
            row.step_ms,
            row.forward_ms,
            row.backward_ms,
            row.optimizer_ms,
            row.recompute_ms,
            mib(row.held_after_forward),
            mib(row.boundary_bytes),
            mib(row.peak_bytes),
        );
    }
    out
}

fn write_csv(path: &Path, rows: &[Row], floors: &[Option<Floor>]) -> Result<()> {
    let mut text = String::from(
        "layers,seq,batch,mode,segment,step_ms,floor_step_ms,forward_ms,backward_ms,\
         optimizer_ms,recompute_ms,held_after_forward_bytes,boundary_bytes,disk_bytes,\
         peak_bytes,floor_peak_bytes,peak_rss_bytes,base_bytes,param_bytes,head_forward_ms,\
         head_held_after_forward_bytes,final_loss\n",
    );
    let opt = |v: Option<String>| v.unwrap_or_default();
    for (r, floor) in rows.iter().zip(floors) {
        let _ = writeln!(
            text,
            "{},{},{},{},{},{:.3},{},{:.3},{:.3},{:.3},{:.3},{},{},{},{},{},{},{},{},{},{},{}",
            r.layers,
            r.seq,
            r.batch,
            r.mode,
            r.segment,
            r.step_ms,
            opt(floor.map(|f| format!("{:.3}", f.step_ms))),
            r.forward_ms,
            r.backward_ms,
            r.optimizer_ms,
            r.recompute_ms,
            r.held_after_forward,
            r.boundary_bytes,
            r.disk_bytes,
            r.peak_bytes,
            opt(floor.map(|f| f.peak_bytes.to_string())),
            opt(r.peak_rss.map(|b| b.to_string())),
            r.base_bytes,
            r.param_bytes,
            opt(r.head_forward_ms.map(|m| format!("{m:.3}"))),
            opt(r.head_held_after_forward.map(|b| b.to_string())),
            r.final_loss,
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    }
    std::fs::write(path, text).map_err(|e| io_error(path, e))
}

/// A plotted quantity: its axis label and how to read it from a row.
type Metric = (&'static str, fn(&Row) -> f64);

/// Step time and peak memory against depth, one line per (mode, segment, sequence length).
fn draw(path: &Path, rows: &[Row], batch: usize) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    }
    let plot_err = |e: &dyn std::fmt::Display| Error::Data(format!("{}: {e}", path.display()));
    let mut series: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    let several_seqs = rows.iter().any(|r| r.seq != rows[0].seq);
    for row in rows {
        let mut label = row.mode.clone();
        if row.segment > 1 {
            let _ = write!(label, ", segments of {}", row.segment);
        }
        if several_seqs {
            let _ = write!(label, ", seq {}", row.seq);
        }
        series.entry(label).or_default().push(row);
    }
    for points in series.values_mut() {
        points.sort_by_key(|r| r.layers);
    }
    let max_layers = rows.iter().map(|r| r.layers).max().unwrap_or(1);
    #[allow(clippy::cast_precision_loss)]
    let x_max = max_layers as f64 * 1.05 + 0.5;
    let seq_note = if several_seqs {
        String::new()
    } else {
        rows.first()
            .map_or_else(String::new, |r| format!(", seq {}", r.seq))
    };

    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(&e))?;
    let panels = root.split_evenly((1, 2));
    let metrics: [Metric; 2] = [
        ("step time (s)", |r| r.step_ms / 1e3),
        ("peak memory held (MiB)", |r| mib(r.peak_bytes)),
    ];
    for (panel, (name, value)) in panels.iter().zip(metrics) {
        let y_max = rows.iter().map(value).fold(0.0, f64::max) * 1.1 + 1e-9;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("Qwen2 step, batch {batch}{seq_note}: {name}"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(|e| plot_err(&e))?;
        chart
            .configure_mesh()
            .x_desc("decoder layers")
            .y_desc(name)
            .draw()
            .map_err(|e| plot_err(&e))?;
        for (i, (label, points)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            #[allow(clippy::cast_precision_loss)]
            let xy: Vec<(f64, f64)> = points.iter().map(|r| (r.layers as f64, value(r))).collect();
            chart
                .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
                .map_err(|e| plot_err(&e))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(xy.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(|e| plot_err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(&e))?;
    }
    root.present().map_err(|e| plot_err(&e))?;
    Ok(())
}
