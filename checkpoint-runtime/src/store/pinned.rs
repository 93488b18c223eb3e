//! Host boundaries of a CUDA device: pinned host buffers, copies on a side stream.
//!
//! - Buffers are page-locked and *not* write-combined (`alloc_pinned_with_flags(n, 0)`):
//!   write-combined memory is fast to write from the host but very slow to read back, and the
//!   device reads these buffers back. They are pooled and reused across steps.
//! - Device-to-host copies run on a side stream that first waits for the compute stream's work
//!   (an event), so the forward's next layer overlaps the copy. The device tensor is released
//!   once its copy's event has completed, checked when the next boundary is stored.
//! - Host-to-device copies for backward are issued one boundary ahead ([`PinnedBoundary::prefetch`])
//!   on the side stream; the compute stream waits for the copy's event before using the tensor.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{Shape, Storage, Tensor};

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

/// A buffer type the pool can hand out.
trait Pinned: DeviceRepr + ValidAsZeroBits + CudaDType + Sized {
    fn wrap(buf: PinnedHostSlice<Self>) -> HostBuf;
    fn unwrap(buf: HostBuf) -> Result<PinnedHostSlice<Self>, HostBuf>;
}

macro_rules! pinned {
    ($ty:ty, $variant:ident) => {
        impl Pinned for $ty {
            fn wrap(buf: PinnedHostSlice<Self>) -> HostBuf {
                HostBuf::$variant(buf)
            }
            fn unwrap(buf: HostBuf) -> Result<PinnedHostSlice<Self>, HostBuf> {
                match buf {
                    HostBuf::$variant(b) => Ok(b),
                    other => Err(other),
                }
            }
        }
    };
}
pinned!(f32, F32);
pinned!(f64, F64);
pinned!(half::bf16, BF16);
pinned!(half::f16, F16);

/// The pinned store of one engine: the side stream and the buffer pool.
#[derive(Default)]
pub(crate) struct PinnedStore {
    side: Mutex<Option<Arc<CudaStream>>>,
    pool: Arc<Mutex<Vec<HostBuf>>>,
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
        let mut side = self.side.lock().unwrap_or_else(PoisonError::into_inner);
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

    fn take<T: Pinned>(
        &self,
        device: &CudaDevice,
        len: usize,
    ) -> candle_core::Result<PinnedHostSlice<T>> {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        let mut kept = Vec::with_capacity(pool.len());
        let mut found = None;
        for buf in pool.drain(..) {
            match T::unwrap(buf) {
                Ok(b) if found.is_none() && b.len() == len => found = Some(b),
                Ok(b) => kept.push(T::wrap(b)),
                Err(other) => kept.push(other),
            }
        }
        *pool = kept;
        drop(pool);
        match found {
            Some(b) => Ok(b),
            // SAFETY: the buffer is written in full by the device-to-host copy before anything
            // reads it (the copy is ordered before every read by the buffer's own event).
            None => unsafe {
                device
                    .cuda_stream()
                    .context()
                    .alloc_pinned_with_flags::<T>(len, 0)
                    .map_err(driver)
            },
        }
    }

    /// Starts copying `hidden` (on a CUDA device) into a pinned buffer.
    pub(crate) fn store(&self, hidden: &Tensor) -> candle_core::Result<Arc<PinnedBoundary>> {
        // Release the previous boundary's device memory once its copy is done.
        if let Some(prev) = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
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
        let compute = device.cuda_stream();
        let side = self.side(&device)?;
        side.join(&compute).map_err(driver)?;
        let buf = match &cuda.slice {
            CudaStorageSlice::F32(s) => self.copy_out(&side, s, start, end, &device)?,
            CudaStorageSlice::F64(s) => self.copy_out(&side, s, start, end, &device)?,
            CudaStorageSlice::BF16(s) => self.copy_out(&side, s, start, end, &device)?,
            CudaStorageSlice::F16(s) => self.copy_out(&side, s, start, end, &device)?,
            _ => {
                return Err(candle_core::Error::msg(format!(
                    "boundaries of dtype {:?} cannot be offloaded: use f16, bf16, f32 or f64",
                    hidden.dtype()
                )));
            }
        };
        let copied = side.record_event(None).map_err(driver)?;
        drop(storage);
        let boundary = Arc::new(PinnedBoundary {
            shape: hidden.shape().clone(),
            device,
            side,
            pool: Arc::clone(&self.pool),
            state: Mutex::new(State::Copying {
                _source: hidden,
                copied,
                buf,
            }),
        });
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&boundary));
        Ok(boundary)
    }

    fn copy_out<T: Pinned>(
        &self,
        side: &Arc<CudaStream>,
        src: &CudaSlice<T>,
        start: usize,
        end: usize,
        device: &CudaDevice,
    ) -> candle_core::Result<HostBuf> {
        let mut buf = self.take::<T>(device, end - start)?;
        side.memcpy_dtoh(&src.slice(start..end), &mut buf)
            .map_err(driver)?;
        Ok(T::wrap(buf))
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
    device: CudaDevice,
    side: Arc<CudaStream>,
    pool: Arc<Mutex<Vec<HostBuf>>>,
    state: Mutex<State>,
}

impl PinnedBoundary {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the device-to-host copy and drops the device tensor.
    fn release_source(&self) -> candle_core::Result<()> {
        let mut state = self.lock();
        if let State::Copying { copied, .. } = &*state {
            copied.synchronize().map_err(driver)?;
            if let State::Copying { buf, .. } = std::mem::replace(&mut *state, State::Taken) {
                *state = State::OnHost(buf);
            }
        }
        Ok(())
    }

    /// Issues the host-to-device copy on the side stream, so it overlaps the current backward.
    pub(crate) fn prefetch(&self) -> candle_core::Result<()> {
        self.release_source()?;
        let mut state = self.lock();
        let State::OnHost(_) = &*state else {
            return Ok(()); // already prefetched or taken
        };
        let State::OnHost(buf) = std::mem::replace(&mut *state, State::Taken) else {
            return Ok(());
        };
        let compute = self.device.cuda_stream();
        // The destination is allocated on the compute stream; the copy waits for it.
        let (storage, buf) = match buf {
            HostBuf::F32(b) => self.copy_in(&compute, b)?,
            HostBuf::F64(b) => self.copy_in(&compute, b)?,
            HostBuf::BF16(b) => self.copy_in(&compute, b)?,
            HostBuf::F16(b) => self.copy_in(&compute, b)?,
        };
        let ready = self.side.record_event(None).map_err(driver)?;
        // The buffer's own event orders its reuse after this copy.
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(buf);
        *state = State::Prefetched { storage, ready };
        Ok(())
    }

    fn copy_in<T: Pinned>(
        &self,
        compute: &Arc<CudaStream>,
        buf: PinnedHostSlice<T>,
    ) -> candle_core::Result<(CudaStorage, HostBuf)> {
        let mut dst = compute.alloc_zeros::<T>(buf.len()).map_err(driver)?;
        self.side.join(compute).map_err(driver)?;
        self.side.memcpy_htod(&buf, &mut dst).map_err(driver)?;
        Ok((T::wrap_cuda_slice(dst, self.device.clone()), T::wrap(buf)))
    }

    /// The boundary on the device, ordered after its copy on the compute stream.
    pub(crate) fn take(&self) -> candle_core::Result<Tensor> {
        self.prefetch()?;
        let state = std::mem::replace(&mut *self.lock(), State::Taken);
        let State::Prefetched { storage, ready } = state else {
            return Err(candle_core::Error::msg("pinned boundary taken twice"));
        };
        self.device.cuda_stream().wait(&ready).map_err(driver)?;
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            self.shape.clone(),
            BackpropOp::none(),
            false,
        ))
    }
}

impl Drop for PinnedBoundary {
    fn drop(&mut self) {
        // Keep the buffer for later steps; an in-flight copy is waited for by the buffer's event.
        let state = std::mem::replace(&mut *self.lock(), State::Taken);
        let buf = match state {
            State::Copying { buf, copied, .. } => {
                let _ = copied.synchronize();
                buf
            }
            State::OnHost(buf) => buf,
            State::Prefetched { .. } | State::Taken => return,
        };
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(buf);
    }
}
