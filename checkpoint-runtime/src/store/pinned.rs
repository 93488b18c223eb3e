//! Host boundaries of a CUDA device: pinned host buffers, copies on a side stream.
//!
//! - A boundary goes to pinned host memory through the engine's [`Stager`] (`staging`), which
//!   orders the device-to-host copy after the kernels that wrote the boundary and releases the
//!   device tensor after the copy, both in stream order: the host never waits for the device.
//! - Host-to-device copies for backward are issued one boundary ahead ([`BoundaryStore::prefetch`])
//!   on the device's side stream, after the buffer's own event (the device-to-host copy); the
//!   compute stream waits for the copy's event before using the tensor.
//! - Once its host-to-device copy is issued, the buffer goes back to the pool; its event orders
//!   any reuse after that copy.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, PinnedHostSlice,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{Shape, Storage, Tensor};

use super::staging::{HostBuf, Pinned, SharedPool, Stager, driver, give_back};
use super::{BoundaryStore, Fetched, tensor_bytes};
use crate::error::{Error, Result};
use crate::sync::lock;

/// The pinned store of one engine; its stager (side streams, buffers) is shared with the disk
/// store.
#[derive(Debug)]
pub(crate) struct PinnedStore {
    stager: Arc<Stager>,
}

impl PinnedStore {
    pub(crate) fn new(stager: Arc<Stager>) -> Self {
        Self { stager }
    }
}

impl BoundaryStore for PinnedStore {
    /// Boxed: a boundary of any store is as small as the smallest.
    type Kept = Box<PinnedBoundary>;
    type Reader = ();

    fn put(&self, hidden: &Tensor, layer: &str) -> Result<Box<PinnedBoundary>> {
        let mut staged = self
            .stager
            .stage(hidden)
            .map_err(|e| transfer_error(layer, "copy the boundary to pinned host memory", e))?;
        let buf = staged.take_buf().ok_or_else(|| {
            Error::Config(format!(
                "internal: {layer}: a staged boundary has no buffer"
            ))
        })?;
        Ok(Box::new(PinnedBoundary {
            bytes: tensor_bytes(hidden),
            shape: staged.shape.clone(),
            device: staged.device.clone(),
            side: Arc::clone(&staged.side),
            pool: Arc::clone(&staged.pool),
            state: Mutex::new(State::OnHost(buf)),
        }))
    }

    fn bytes(kept: &Box<PinnedBoundary>) -> u64 {
        kept.bytes
    }

    fn reader(&self, _order: &[&Box<PinnedBoundary>]) -> Result<()> {
        Ok(())
    }

    fn prefetch(kept: &Box<PinnedBoundary>, layer: &str) -> Result<()> {
        kept.prefetch()
            .map_err(|e| transfer_error(layer, "prefetch the boundary back to the GPU", e))
    }

    fn fetch(kept: Box<PinnedBoundary>, (): &(), layer: &str) -> Result<Fetched> {
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
    /// In pinned host memory (the device-to-host copy may still be running: the buffer's event
    /// orders every read after it).
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
    /// Issues the host-to-device copy on the side stream, so it overlaps the current backward.
    fn prefetch(&self) -> candle_core::Result<()> {
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
        // Keep the buffer for later steps. A prefetched tensor that was never taken is freed on
        // the compute stream, after its copy (or, failing that ordering, once the host saw the
        // copy complete), whether or not cudarc tracks events.
        match std::mem::replace(&mut *lock(&self.state), State::Taken) {
            State::OnHost(buf) => give_back(&self.pool, buf),
            State::Prefetched { storage, ready } => {
                if self.device.cuda_stream().wait(&ready).is_err() {
                    let _ = ready.synchronize();
                }
                drop(storage);
            }
            State::Taken => {}
        }
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
        let store = PinnedStore::new(Arc::default());
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
                let pool = lock(store.stager.pool());
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
