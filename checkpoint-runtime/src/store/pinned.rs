//! Host boundaries of a CUDA device: pinned host buffers, copies on a side stream.
//!
//! - Buffers are page-locked and *not* write-combined (`alloc_pinned_with_flags(n, 0)`):
//!   write-combined memory is fast to write from the host but very slow to read back, and the
//!   device reads these buffers back. They are reused across steps through a [`Pool`] capped at
//!   the most bytes ever in use at once, so that new shapes replace old buffers.
//! - Device-to-host copies run on a side stream that first waits for the compute stream's work,
//!   so the forward's next layer overlaps the copy. The device tensor is released once its copy
//!   has completed, checked when the next boundary is stored.
//! - Host-to-device copies for backward are issued one boundary ahead ([`BoundaryStore::prefetch`])
//!   on the side stream; the compute stream waits for the copy's event before using the tensor.
//! - Every pinned buffer carries its own event (cudarc records it after each copy and waits on it
//!   before the next), so a buffer back in the pool is never overwritten while a copy reads it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{Shape, Storage, Tensor};

use super::pool::{Buffer, Pool};
use super::{BoundaryStore, Fetched, tensor_bytes};
use crate::error::{Error, Result};
use crate::sync::lock;

fn driver(e: impl std::fmt::Display + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::wrap(format!("CUDA host offload: {e}"))
}

/// A pinned host buffer of one of the float dtypes boundaries can have.
enum HostBuf {
    F32(PinnedHostSlice<f32>),
    F64(PinnedHostSlice<f64>),
    BF16(PinnedHostSlice<half::bf16>),
    F16(PinnedHostSlice<half::f16>),
}

impl Buffer for HostBuf {
    fn bytes(&self) -> u64 {
        let n = match self {
            HostBuf::F32(b) => b.num_bytes(),
            HostBuf::F64(b) => b.num_bytes(),
            HostBuf::BF16(b) => b.num_bytes(),
            HostBuf::F16(b) => b.num_bytes(),
        };
        n as u64
    }
}

/// An element type the pool can hand out buffers of.
trait Pinned: DeviceRepr + ValidAsZeroBits + CudaDType + Sized {
    fn wrap(buf: PinnedHostSlice<Self>) -> HostBuf;
    fn unwrap(buf: HostBuf) -> Option<PinnedHostSlice<Self>>;
    fn len_of(buf: &HostBuf) -> Option<usize>;
}

macro_rules! pinned {
    ($ty:ty, $variant:ident) => {
        impl Pinned for $ty {
            fn wrap(buf: PinnedHostSlice<Self>) -> HostBuf {
                HostBuf::$variant(buf)
            }
            fn unwrap(buf: HostBuf) -> Option<PinnedHostSlice<Self>> {
                match buf {
                    HostBuf::$variant(b) => Some(b),
                    _ => None,
                }
            }
            fn len_of(buf: &HostBuf) -> Option<usize> {
                match buf {
                    HostBuf::$variant(b) => Some(b.len()),
                    _ => None,
                }
            }
        }
    };
}
pinned!(f32, F32);
pinned!(f64, F64);
pinned!(half::bf16, BF16);
pinned!(half::f16, F16);

type SharedPool = Arc<Mutex<Pool<HostBuf>>>;

/// Puts `buf` back in the pool, freeing what no longer fits outside the lock.
fn give_back(pool: &SharedPool, buf: HostBuf) {
    let evicted = lock(pool).give_back(buf);
    // Freeing waits for the buffer's last copy (its event), then unpins it.
    drop(evicted);
}

/// The pinned store of one engine: the side stream and the buffer pool.
#[derive(Default)]
pub(crate) struct PinnedStore {
    side: Mutex<Option<Arc<CudaStream>>>,
    pool: SharedPool,
    /// The boundary whose copy was issued last; its device tensor is released at the next store.
    last: Mutex<Option<Arc<PinnedBoundary>>>,
}

impl std::fmt::Debug for PinnedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedStore").finish_non_exhaustive()
    }
}

impl PinnedStore {
    fn side(&self, device: &CudaDevice) -> candle_core::Result<Arc<CudaStream>> {
        let mut side = lock(&self.side);
        if let Some(s) = side.as_ref() {
            return Ok(Arc::clone(s));
        }
        let stream = device
            .cuda_stream()
            .context()
            .new_stream()
            .map_err(driver)?;
        *side = Some(Arc::clone(&stream));
        Ok(stream)
    }

    /// A pinned buffer of `len` elements: a pooled one of that size, or a new one.
    fn buffer<T: Pinned>(
        &self,
        device: &CudaDevice,
        len: usize,
    ) -> candle_core::Result<PinnedHostSlice<T>> {
        let reused = lock(&self.pool).reuse(|b| T::len_of(b) == Some(len));
        if let Some(buf) = reused.and_then(T::unwrap) {
            return Ok(buf);
        }
        // SAFETY: the buffer is written in full by the device-to-host copy before anything
        // reads it (the copy is ordered before every read by the buffer's own event).
        let buf = unsafe {
            device
                .cuda_stream()
                .context()
                .alloc_pinned_with_flags::<T>(len, 0)
                .map_err(driver)?
        };
        lock(&self.pool).lend(buf.num_bytes() as u64);
        Ok(buf)
    }

    /// Starts copying `hidden` (on a CUDA device) into a pinned buffer.
    fn copy_out(&self, hidden: &Tensor) -> candle_core::Result<PinnedBoundary> {
        // Release the previous boundary's device memory once its copy is done.
        if let Some(prev) = lock(&self.last).take() {
            prev.release_source()?;
        }
        let hidden = hidden.contiguous()?;
        let (storage, layout) = hidden.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            return Err(candle_core::Error::msg(
                "pinned host offload needs a CUDA tensor",
            ));
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::msg("boundary is not contiguous"))?;
        let device = cuda.device.clone();
        let side = self.side(&device)?;
        side.join(&device.cuda_stream()).map_err(driver)?;
        let buf = match &cuda.slice {
            CudaStorageSlice::F32(s) => self.copy_slice(&side, s, start, end, &device)?,
            CudaStorageSlice::F64(s) => self.copy_slice(&side, s, start, end, &device)?,
            CudaStorageSlice::BF16(s) => self.copy_slice(&side, s, start, end, &device)?,
            CudaStorageSlice::F16(s) => self.copy_slice(&side, s, start, end, &device)?,
            _ => {
                return Err(candle_core::Error::msg(format!(
                    "boundaries of dtype {:?} cannot be offloaded: use f16, bf16, f32 or f64",
                    hidden.dtype()
                )));
            }
        };
        let copied = side.record_event(None).map_err(driver)?;
        drop(storage);
        Ok(PinnedBoundary {
            shape: hidden.shape().clone(),
            bytes: tensor_bytes(&hidden),
            device,
            side,
            pool: Arc::clone(&self.pool),
            state: Mutex::new(State::Copying {
                _source: hidden,
                copied,
                buf,
            }),
        })
    }

    fn copy_slice<T: Pinned>(
        &self,
        side: &Arc<CudaStream>,
        src: &CudaSlice<T>,
        start: usize,
        end: usize,
        device: &CudaDevice,
    ) -> candle_core::Result<HostBuf> {
        let mut buf = self.buffer::<T>(device, end - start)?;
        if let Err(e) = side.memcpy_dtoh(&src.slice(start..end), &mut buf) {
            give_back(&self.pool, T::wrap(buf));
            return Err(driver(e));
        }
        Ok(T::wrap(buf))
    }
}

impl BoundaryStore for PinnedStore {
    type Kept = Arc<PinnedBoundary>;
    type Reader = ();

    fn put(&self, hidden: &Tensor, layer: &str) -> Result<Arc<PinnedBoundary>> {
        let boundary = self
            .copy_out(hidden)
            .map_err(|e| transfer_error(layer, "copy the boundary to pinned host memory", e))?;
        let boundary = Arc::new(boundary);
        *lock(&self.last) = Some(Arc::clone(&boundary));
        Ok(boundary)
    }

    fn bytes(kept: &Arc<PinnedBoundary>) -> u64 {
        kept.bytes
    }

    fn reader(&self, _order: &[&Arc<PinnedBoundary>]) -> Result<()> {
        Ok(())
    }

    fn prefetch(kept: &Arc<PinnedBoundary>, layer: &str) -> Result<()> {
        kept.prefetch()
            .map_err(|e| transfer_error(layer, "prefetch the boundary back to the GPU", e))
    }

    fn fetch(kept: Arc<PinnedBoundary>, (): &(), layer: &str) -> Result<Fetched> {
        let started = Instant::now();
        let (tensor, hit) = kept
            .take()
            .map_err(|e| transfer_error(layer, "copy the boundary back to the GPU", e))?;
        Ok(Fetched {
            tensor,
            transfer: started.elapsed(),
            waited: Some(!hit),
        })
    }
}

/// A driver error of the pinned store, naming the layer and a way out.
fn transfer_error(layer: &str, action: &'static str, source: candle_core::Error) -> Error {
    Error::HostTransfer {
        layer: layer.to_owned(),
        action,
        source: Box::new(source),
    }
}

enum State {
    /// The device-to-host copy is in flight.
    Copying {
        /// Never read: holds the device memory until `copied` completes.
        _source: Tensor,
        copied: CudaEvent,
        buf: HostBuf,
    },
    /// Only the host copy remains.
    OnHost(HostBuf),
    /// The host-to-device copy for backward is in flight.
    Prefetched {
        storage: CudaStorage,
        ready: CudaEvent,
    },
    /// Handed back to the engine.
    Taken,
}

/// One boundary in pinned host memory.
pub(crate) struct PinnedBoundary {
    shape: Shape,
    bytes: u64,
    device: CudaDevice,
    side: Arc<CudaStream>,
    pool: SharedPool,
    state: Mutex<State>,
}

impl PinnedBoundary {
    /// Waits for the device-to-host copy and drops the device tensor.
    fn release_source(&self) -> candle_core::Result<()> {
        let mut state = lock(&self.state);
        if let State::Copying { copied, .. } = &*state {
            copied.synchronize().map_err(driver)?;
            if let State::Copying { buf, .. } = std::mem::replace(&mut *state, State::Taken) {
                *state = State::OnHost(buf);
            }
        }
        Ok(())
    }

    /// Issues the host-to-device copy on the side stream, so it overlaps the current backward.
    fn prefetch(&self) -> candle_core::Result<()> {
        self.release_source()?;
        let mut state = lock(&self.state);
        let State::OnHost(buf) = std::mem::replace(&mut *state, State::Taken) else {
            return Ok(()); // already prefetched or taken: put nothing back
        };
        let compute = self.device.cuda_stream();
        let copied = match buf {
            HostBuf::F32(b) => self.copy_in(&compute, b),
            HostBuf::F64(b) => self.copy_in(&compute, b),
            HostBuf::BF16(b) => self.copy_in(&compute, b),
            HostBuf::F16(b) => self.copy_in(&compute, b),
        };
        let (storage, buf) = copied?;
        let ready = self.side.record_event(None).map_err(driver)?;
        // The buffer's own event orders its reuse after this copy.
        give_back(&self.pool, buf);
        *state = State::Prefetched { storage, ready };
        Ok(())
    }

    fn copy_in<T: Pinned>(
        &self,
        compute: &Arc<CudaStream>,
        buf: PinnedHostSlice<T>,
    ) -> candle_core::Result<(CudaStorage, HostBuf)> {
        // Allocated on the compute stream, where the tensor is used; the copy waits for it.
        let copy = |buf: &PinnedHostSlice<T>| -> candle_core::Result<CudaSlice<T>> {
            let mut dst = compute.alloc_zeros::<T>(buf.len()).map_err(driver)?;
            self.side.join(compute).map_err(driver)?;
            self.side.memcpy_htod(buf, &mut dst).map_err(driver)?;
            Ok(dst)
        };
        match copy(&buf) {
            Ok(dst) => Ok((T::wrap_cuda_slice(dst, self.device.clone()), T::wrap(buf))),
            Err(e) => {
                give_back(&self.pool, T::wrap(buf));
                Err(e)
            }
        }
    }

    /// The boundary on the device, ordered after its copy on the compute stream, and whether
    /// that copy had already completed (a prefetch hit: the compute stream does not wait).
    fn take(&self) -> candle_core::Result<(Tensor, bool)> {
        self.prefetch()?;
        let state = std::mem::replace(&mut *lock(&self.state), State::Taken);
        let State::Prefetched { storage, ready } = state else {
            return Err(candle_core::Error::msg(
                "internal: a pinned boundary was taken twice",
            ));
        };
        let hit = ready.try_is_complete().map_err(driver)?;
        self.device.cuda_stream().wait(&ready).map_err(driver)?;
        let tensor = Tensor::from_storage(
            Storage::Cuda(storage),
            self.shape.clone(),
            BackpropOp::none(),
            false,
        );
        Ok((tensor, hit))
    }
}

impl Drop for PinnedBoundary {
    fn drop(&mut self) {
        // Keep the buffer for later steps. A copy still reading the device tensor must finish
        // before the tensor is freed; a prefetched tensor is freed after its copy by cudarc.
        let state = std::mem::replace(&mut *lock(&self.state), State::Taken);
        let buf = match state {
            State::Copying {
                buf,
                copied,
                _source: source,
            } => {
                let _ = copied.synchronize();
                drop(source);
                buf
            }
            State::OnHost(buf) => buf,
            State::Prefetched { .. } | State::Taken => return,
        };
        give_back(&self.pool, buf);
    }
}

/// These need a GPU: they run with `--features cuda` (`scripts/gpu-check.sh`), never in CI.
#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// Every dtype comes back bit for bit, in backward order with the next boundary prefetched,
    /// and a second step reuses the first step's pinned buffers instead of allocating more.
    #[test]
    fn boundaries_come_back_exactly_and_buffers_are_reused() -> Result<()> {
        let dev = Device::new_cuda(0)?;
        let store = PinnedStore::default();
        let base = Tensor::arange(0f32, 4096.0, &dev)?.reshape((2, 32, 64))?;
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let inputs: Vec<Tensor> = (0..3)
                .map(|i| (&base * (0.5 + f64::from(i)))?.to_dtype(dtype))
                .collect::<candle_core::Result<_>>()?;
            let mut allocated = Vec::new();
            for step in 0..2 {
                let mut kept = inputs
                    .iter()
                    .map(|t| store.put(t, "layer"))
                    .collect::<Result<Vec<_>>>()?;
                assert!(
                    kept.iter()
                        .all(|k| PinnedStore::bytes(k) == tensor_bytes(&inputs[0]))
                );
                let mut hits = 0;
                for input in inputs.iter().rev() {
                    let boundary = kept.pop().ok_or(Error::Config("empty".into()))?;
                    if let Some(next) = kept.last() {
                        PinnedStore::prefetch(next, "layer")?;
                    }
                    let fetched = PinnedStore::fetch(boundary, &(), "layer")?;
                    hits += u32::from(fetched.waited == Some(false));
                    let back = fetched.tensor;
                    assert!(back.device().same_device(&dev));
                    assert_eq!((back.dims(), back.dtype()), (input.dims(), dtype));
                    let diff = (back.to_dtype(DType::F64)? - input.to_dtype(DType::F64)?)?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f64>()?;
                    assert!(diff == 0.0, "{dtype:?}, step {step}: differs by {diff}");
                }
                let pool = lock(&store.pool);
                assert!(pool.idle_bytes() <= pool.high_water());
                allocated.push(pool.allocated());
                println!("{dtype:?}, step {step}: {hits} of 3 boundaries back before use");
            }
            assert_eq!(
                allocated[0], allocated[1],
                "{dtype:?}: the second step allocated pinned buffers instead of reusing them"
            );
        }
        Ok(())
    }
}
