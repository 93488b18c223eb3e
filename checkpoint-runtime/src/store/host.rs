//! Boundaries in host memory, for compute devices without a pinned store.
//!
//! On a CPU compute device host memory *is* device memory: the boundary is kept as it is (no
//! copy, the same bytes as `recompute`) and only counted as host bytes, so that a policy written
//! for a GPU runs unchanged and exactly on CPU. CUDA devices use the pinned store instead.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::{BoundaryStore, Fetched, tensor_bytes};
use crate::error::Result;

/// The host store for devices without a pinned store.
#[derive(Debug, Default)]
pub(crate) struct HostStore;

/// A boundary in host memory, and the device it goes back to.
pub(crate) struct HostBoundary {
    tensor: Tensor,
    device: Device,
}

impl BoundaryStore for HostStore {
    type Kept = HostBoundary;
    type Reader = ();

    fn put(&self, hidden: &Tensor, _layer: &str) -> Result<HostBoundary> {
        Ok(HostBoundary {
            // On a CPU device `to_device` shares the storage: no copy.
            tensor: hidden.to_device(&Device::Cpu)?,
            device: hidden.device().clone(),
        })
    }

    fn bytes(kept: &HostBoundary) -> u64 {
        tensor_bytes(&kept.tensor)
    }

    fn reader(&self, _order: &[&HostBoundary]) -> Result<()> {
        Ok(())
    }

    fn prefetch(_kept: &HostBoundary, _layer: &str) -> Result<()> {
        Ok(())
    }

    fn fetch(kept: HostBoundary, (): &(), _layer: &str) -> Result<Fetched> {
        let started = Instant::now();
        let tensor = kept.tensor.to_device(&kept.device)?;
        Ok(Fetched {
            tensor,
            transfer: started.elapsed(),
            waited: None,
        })
    }
}
