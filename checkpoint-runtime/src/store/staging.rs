//! Copies of CUDA boundaries into pinned host memory, ordered after the kernels that wrote them.
//!
//! Both offloading stores take a CUDA boundary off the device through a [`Stager`]: the host
//! store (`pinned`) keeps the pinned buffer until backward, the disk store hands it to its
//! writer thread. What orders what:
//!
//! - **The copy after the kernels.** [`Stager::stage`] runs on the thread that runs the forward,
//!   so `CudaDevice::cuda_stream()` is that thread's compute stream (candle's default device
//!   stream is CUDA's per-thread stream, which names a different stream on every host thread).
//!   It records an event there and makes the device's side stream wait for it before the copy:
//!   the copy reads the boundary only once every kernel queued before it has run, however far the
//!   host has run ahead. The forward's next layers overlap the copy.
//! - **Readers of the buffer after the copy.** cudarc records the pinned buffer's own event after
//!   the copy; the host-to-device copy of backward waits for it on the side stream, and the disk
//!   writer waits for it on the host ([`Staged::encode`]) before it reads a byte.
//! - **The device tensor's release after the copy.** The tensor is held until the next boundary
//!   is staged (or the backward starts), then the compute stream waits for the copy's event and
//!   the tensor is dropped: CUDA frees it in stream order on the compute stream, after the copy,
//!   and the host never waits for the device on the way.
//! - **A buffer's reuse after its last copy.** Every copy waits for the buffer's event before it
//!   writes or reads the buffer, so a buffer back in the [`Pool`] is never overwritten while a
//!   copy still uses it.
//!
//! Buffers are page-locked and *not* write-combined (`alloc_pinned_with_flags(n, 0)`):
//! write-combined memory is fast to write from the device but very slow for the host and the
//! device to read back, and both read these buffers. They are reused across steps through a
//! [`Pool`] capped at the most bytes ever in use at once, so that new shapes replace old buffers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorageSlice, DeviceId};
use candle_core::{Shape, Storage, Tensor};

use super::file::{self, Element};
use super::pool::{Buffer, Pool};
use crate::sync::lock;

/// A driver error, said to come from taking a boundary off the GPU.
pub(super) fn driver(e: impl std::fmt::Display + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::wrap(format!("CUDA boundary copy: {e}"))
}

/// A pinned host buffer of one of the float dtypes boundaries can have.
pub(super) enum HostBuf {
    F32(PinnedHostSlice<f32>),
    F64(PinnedHostSlice<f64>),
    BF16(PinnedHostSlice<half::bf16>),
    F16(PinnedHostSlice<half::f16>),
}

impl HostBuf {
    /// The context the buffer is pinned for.
    fn context(&self) -> &Arc<CudaContext> {
        match self {
            HostBuf::F32(b) => b.context(),
            HostBuf::F64(b) => b.context(),
            HostBuf::BF16(b) => b.context(),
            HostBuf::F16(b) => b.context(),
        }
    }
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
pub(super) trait Pinned: DeviceRepr + ValidAsZeroBits + CudaDType + Element {
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

/// The pinned buffers of one engine, shared with whoever holds one.
pub(super) type SharedPool = Arc<Mutex<Pool<HostBuf>>>;

/// Puts `buf` back in the pool, freeing what no longer fits outside the lock.
pub(super) fn give_back(pool: &SharedPool, buf: HostBuf) {
    let evicted = lock(pool).give_back(buf);
    // Freeing waits for the buffer's last copy (its event), then unpins it.
    drop(evicted);
}

/// A device tensor that a copy on a side stream may still be reading, and that copy's event.
struct Held {
    source: Option<Tensor>,
    copied: Arc<CudaEvent>,
    /// The compute stream of the thread that staged it (the one that releases it).
    compute: Arc<CudaStream>,
}

impl Held {
    /// Makes the compute stream wait for the copy, then drops the tensor: its memory is freed
    /// in stream order after the copy, without the host waiting.
    fn release(&mut self) -> candle_core::Result<()> {
        let Some(source) = self.source.take() else {
            return Ok(());
        };
        let ordered = self.compute.wait(&self.copied);
        if ordered.is_err() {
            // Without the stream ordering, the host waits: the tensor must outlive its copy.
            let _ = self.copied.synchronize();
        }
        drop(source);
        ordered.map_err(driver)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Nothing to report to from a destructor; `release` waits on the host if it must.
        let _ = self.release();
    }
}

/// Takes CUDA boundaries off the device: one side stream per device, the pinned buffer pool,
/// and the last boundary's device tensor until its copy is ordered before its release.
#[derive(Default)]
pub(crate) struct Stager {
    sides: Mutex<HashMap<DeviceId, Arc<CudaStream>>>,
    pool: SharedPool,
    held: Mutex<Option<Held>>,
}

impl std::fmt::Debug for Stager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stager")
            .field("devices", &lock(&self.sides).len())
            .finish_non_exhaustive()
    }
}

impl Stager {
    /// The pinned buffer pool.
    #[cfg(test)]
    pub(super) fn pool(&self) -> &SharedPool {
        &self.pool
    }

    /// The side stream of `device`, created on its first boundary.
    fn side(&self, device: &CudaDevice) -> candle_core::Result<Arc<CudaStream>> {
        let mut sides = lock(&self.sides);
        if let Some(s) = sides.get(&device.id()) {
            return Ok(Arc::clone(s));
        }
        let stream = device
            .cuda_stream()
            .context()
            .new_stream()
            .map_err(driver)?;
        sides.insert(device.id(), Arc::clone(&stream));
        Ok(stream)
    }

    /// Releases the device tensor of the last boundary staged, ordered after its copy on the
    /// compute stream. Call it on the thread that ran the forward.
    pub(crate) fn release_held(&self) -> candle_core::Result<()> {
        let held = lock(&self.held).take();
        held.map_or(Ok(()), |mut h| h.release())
    }

    /// Starts copying `hidden` (a CUDA tensor) into a pinned buffer, ordered after every kernel
    /// queued so far on this thread's compute stream. Call it on the thread that ran those
    /// kernels.
    pub(super) fn stage(&self, hidden: &Tensor) -> candle_core::Result<Staged> {
        self.release_held()?;
        let hidden = hidden.contiguous()?;
        let (storage, layout) = hidden.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            return Err(candle_core::Error::msg(
                "internal: a boundary staged for a CUDA copy is not on a CUDA device",
            ));
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::msg("internal: a contiguous boundary has gaps"))?;
        let device = cuda.device.clone();
        let compute = device.cuda_stream();
        let side = self.side(&device)?;
        side.join(&compute).map_err(driver)?;
        let buf = match &cuda.slice {
            CudaStorageSlice::F32(s) => self.copy(&side, s, start, end, &device)?,
            CudaStorageSlice::F64(s) => self.copy(&side, s, start, end, &device)?,
            CudaStorageSlice::BF16(s) => self.copy(&side, s, start, end, &device)?,
            CudaStorageSlice::F16(s) => self.copy(&side, s, start, end, &device)?,
            _ => {
                return Err(candle_core::Error::msg(format!(
                    "boundaries of dtype {:?} cannot be offloaded: use f16, bf16, f32 or f64",
                    hidden.dtype()
                )));
            }
        };
        // From here on, the buffer goes back to the pool on error (`Staged`'s drop).
        let mut staged = Staged {
            buf: Some(buf),
            shape: hidden.shape().clone(),
            device,
            side: Arc::clone(&side),
            pool: Arc::clone(&self.pool),
            copied: None,
        };
        // Blocking sync: the disk writer sleeps on it instead of spinning.
        let copied = side
            .record_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .map_err(driver)?;
        let copied = Arc::new(copied);
        staged.copied = Some(Arc::clone(&copied));
        drop(storage);
        *lock(&self.held) = Some(Held {
            source: Some(hidden),
            copied,
            compute,
        });
        Ok(staged)
    }

    /// A pinned buffer of `len` elements: a pooled one of that size, or a new one.
    fn buffer<T: Pinned>(
        &self,
        device: &CudaDevice,
        len: usize,
    ) -> candle_core::Result<PinnedHostSlice<T>> {
        let ctx = device.cuda_stream().context().clone();
        // Pinned for this device's context: a buffer pinned for another is pageable to it.
        let reused = lock(&self.pool).reuse(|b| T::len_of(b) == Some(len) && *b.context() == ctx);
        if let Some(buf) = reused.and_then(T::unwrap) {
            return Ok(buf);
        }
        // SAFETY: the buffer is written in full by the device-to-host copy before anything
        // reads it (the copy is ordered before every read by the buffer's own event).
        let buf = unsafe { ctx.alloc_pinned_with_flags::<T>(len, 0).map_err(driver)? };
        lock(&self.pool).lend(buf.num_bytes() as u64);
        Ok(buf)
    }

    fn copy<T: Pinned>(
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

/// A boundary copied, or being copied, into a pinned buffer; the buffer goes back to the pool
/// when this is dropped, unless it was taken out.
pub(super) struct Staged {
    buf: Option<HostBuf>,
    pub(super) shape: Shape,
    pub(super) device: CudaDevice,
    /// The side stream the copy runs on.
    pub(super) side: Arc<CudaStream>,
    pub(super) pool: SharedPool,
    /// Recorded on the side stream after the copy (`None` only while being built).
    copied: Option<Arc<CudaEvent>>,
}

impl Staged {
    /// The boundary as a safetensors file, once its copy has completed (the host waits for it).
    pub(super) fn encode(&self) -> candle_core::Result<Vec<u8>> {
        // The buffer's own event orders the read too, but cudarc records it only while it
        // tracks events (candle lets that be turned off); this one is always recorded.
        if let Some(copied) = &self.copied {
            copied.synchronize().map_err(driver)?;
        }
        let dims = self.shape.dims();
        let bytes = match &self.buf {
            Some(HostBuf::F32(b)) => file::encode_slice(dims, b.as_slice().map_err(driver)?),
            Some(HostBuf::F64(b)) => file::encode_slice(dims, b.as_slice().map_err(driver)?),
            Some(HostBuf::BF16(b)) => file::encode_slice(dims, b.as_slice().map_err(driver)?),
            Some(HostBuf::F16(b)) => file::encode_slice(dims, b.as_slice().map_err(driver)?),
            None => {
                return Err(candle_core::Error::msg(
                    "internal: a staged boundary lost its buffer",
                ));
            }
        };
        Ok(bytes)
    }

    /// Takes the buffer out, for a holder that gives it back itself.
    pub(super) fn take_buf(&mut self) -> Option<HostBuf> {
        self.buf.take()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_back(&self.pool, buf);
        }
    }
}
