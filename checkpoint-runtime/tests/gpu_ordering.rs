//! Offloaded boundaries hold the forward's data, however far the host runs ahead of the device.
//!
//! Each layer ends in a long chain of large kernels (matmul, tanh) that produces the carry stored
//! next, so that when a boundary is handed to a store the kernels writing it are still queued on
//! the device. A copy not ordered after them (the disk writer's thread copying on its own stream,
//! a device tensor freed under its copy) reads stale memory: the file, or the pinned buffer,
//! then holds other bytes than the forward computed, and the recomputed gradients differ.
//!
//! On CUDA (`--features cuda`, run by `scripts/gpu-check.sh`) the chains are 4096 × 4096 f32
//! matmuls; on CPU the same check runs small, as a test of the test (and of the CPU stores).

use candle_core::{DType, Device, Tensor, Var};
use checkpoint_runtime::{Checkpointer, DiskConfig, Error, Layer, Mode, Policy, Result};

/// One layer: `links` times `h = tanh(h · w)`.
#[derive(Debug, Clone)]
struct Chain {
    w: Var,
    links: usize,
}

impl Layer for Chain {
    fn forward_checkpointed(&self, x: &Tensor, (): &()) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for _ in 0..self.links {
            h = h.matmul(self.w.as_tensor())?.tanh()?;
        }
        Ok(h)
    }
}

/// The sizes of one check.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    rows: usize,
    width: usize,
    links: usize,
    layers: usize,
}

/// A deterministic `rows × cols` matrix, made on the device: `scale · sin(phase · (i + 1))` for
/// element `i` (counted in integers: an f32 count stops being exact at 2^24 elements).
fn matrix(rows: usize, cols: usize, phase: f64, scale: f64, dev: &Device) -> Result<Tensor> {
    let n = u32::try_from(rows * cols)
        .map_err(|_| Error::Config(format!("a {rows} × {cols} matrix is too large")))?;
    let t = (Tensor::arange(0u32, n, dev)?.to_dtype(DType::F64)? + 1.0)?;
    Ok(((t * phase)?.sin()? * scale)?
        .to_dtype(DType::F32)?
        .reshape((rows, cols))?)
}

fn model(sizes: Sizes, dev: &Device) -> Result<(Vec<Chain>, Var)> {
    #[allow(clippy::cast_precision_loss)]
    let scale = 1.5 / (sizes.width as f64).sqrt();
    let layers = (0..sizes.layers)
        .map(|l| {
            #[allow(clippy::cast_precision_loss)]
            let phase = 0.618 + 0.1 * l as f64;
            let w = matrix(sizes.width, sizes.width, phase, scale, dev)?;
            Ok(Chain {
                w: Var::from_tensor(&w)?,
                links: sizes.links,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let x = Var::from_tensor(&matrix(sizes.rows, sizes.width, 0.377, 1.0, dev)?)?;
    Ok((layers, x))
}

/// The bits of `t`'s elements, in host memory (the copy is ordered on this thread's stream).
fn bits(t: &Tensor) -> Result<Vec<u32>> {
    let v = t
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    Ok(v.into_iter().map(f32::to_bits).collect())
}

/// Where `a` and `b` first differ, and how many elements differ, if they do.
fn difference(a: &[u32], b: &[u32]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("{} elements against {}", a.len(), b.len()));
    }
    let first = a.iter().zip(b).position(|(x, y)| x != y)?;
    let count = a.iter().zip(b).filter(|(x, y)| x != y).count();
    Some(format!(
        "{count} of {} elements differ, the first at {first}: {} against {}",
        a.len(),
        f32::from_bits(a[first]),
        f32::from_bits(b[first])
    ))
}

/// The gradients of the input and of every layer's weight under `mode`, as bits. In
/// offload-disk mode, also checks that each boundary file holds the forward's carry bit for
/// bit, `carries[i]` being the input of layer `i`.
fn gradients(mode: Mode, layers: &[Chain], x: &Var, carries: &[Vec<u32>]) -> Result<Vec<Vec<u32>>> {
    let ckpt = Checkpointer::with_disk(Policy::new(mode), DiskConfig::default());
    let y = ckpt.run_stack(x.as_tensor(), layers.iter().map(|l| (l, ())))?;
    if mode == Mode::OffloadDisk {
        ckpt.flush()?;
        let dir = ckpt
            .disk_dir()
            .ok_or_else(|| Error::Config("offload-disk wrote no directory".into()))?;
        let mut files = std::fs::read_dir(&dir)
            .and_then(|d| {
                d.map(|e| e.map(|e| e.path()))
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .map_err(candle_core::Error::wrap)?;
        files.sort();
        assert_eq!(files.len(), carries.len(), "one file per layer: {files:?}");
        for (i, (file, carry)) in files.iter().zip(carries).enumerate() {
            let stored = candle_core::safetensors::load(file, &Device::Cpu)?;
            let stored = stored
                .get("boundary")
                .ok_or_else(|| Error::Config(format!("{} holds no boundary", file.display())))?;
            if let Some(diff) = difference(&bits(stored)?, carry) {
                panic!(
                    "offload-disk: the file of layer {i} does not hold the forward's carry \
                     (a copy not ordered after its kernels): {diff}"
                );
            }
        }
    }
    let grads = ckpt.backward(&y.sqr()?.sum_all()?)?;
    std::iter::once(x)
        .chain(layers.iter().map(|l| &l.w))
        .map(|v| {
            let g = grads.get(v.as_tensor()).ok_or_else(|| {
                Error::Config(format!("mode {mode}: a parameter has no gradient"))
            })?;
            bits(g)
        })
        .collect()
}

/// Every mode's gradients equal `Mode::None`'s bit for bit; disk files hold the forward's data.
fn check(sizes: Sizes, dev: &Device) -> Result<()> {
    let (layers, x) = model(sizes, dev)?;
    let mut carries = vec![bits(x.as_tensor())?];
    let mut h = x.as_tensor().clone();
    for layer in &layers[..layers.len() - 1] {
        h = layer.forward_checkpointed(&h, &())?;
        carries.push(bits(&h)?);
    }
    let reference = gradients(Mode::None, &layers, &x, &carries)?;
    // Disk before host: on CUDA, the first side stream a context gets turns on cudarc's
    // cross-stream event tracking, which would hide an unordered disk copy.
    for mode in [Mode::OffloadDisk, Mode::OffloadHost, Mode::Recompute] {
        let started = std::time::Instant::now();
        let grads = gradients(mode, &layers, &x, &carries)?;
        println!("{mode}: {:.0} ms", started.elapsed().as_secs_f64() * 1e3);
        for (i, (got, want)) in grads.iter().zip(&reference).enumerate() {
            let what = if i == 0 {
                "the input".to_owned()
            } else {
                format!("the weight of layer {}", i - 1)
            };
            if let Some(diff) = difference(got, want) {
                panic!("{mode}: the gradient of {what} differs from mode none's: {diff}");
            }
        }
    }
    Ok(())
}

#[test]
fn offloaded_boundaries_hold_the_forwards_data_on_cpu() -> Result<()> {
    let sizes = Sizes {
        rows: 8,
        width: 32,
        links: 6,
        layers: 4,
    };
    check(sizes, &Device::Cpu)
}

/// Twelve 4096 × 4096 × 4096 matmuls per layer: the host queues a layer in well under a
/// millisecond and the device needs tens of milliseconds for it, so every boundary is handed to
/// its store long before the kernels that write it have run.
#[cfg(feature = "cuda")]
#[test]
fn offloaded_boundaries_hold_the_forwards_data_on_cuda() -> Result<()> {
    let sizes = Sizes {
        rows: 4096,
        width: 4096,
        links: 12,
        layers: 4,
    };
    check(sizes, &Device::new_cuda(0)?)
}
