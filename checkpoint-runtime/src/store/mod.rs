//! Where checkpointed segments keep their state between forward and backward.
//!
//! - device: the boundary stays where it was computed (`recompute`);
//! - host: the boundary is copied to host memory and copied back for backward. On a CPU compute
//!   device host memory *is* device memory, so the boundary is kept as it is (no copy) and only
//!   counted as host bytes;
//! - disk: the boundary goes to a file (see [`disk`]) and is prefetched back.

pub(crate) mod disk;
mod file;

use std::time::Instant;

use candle_core::{Device, Tensor, Var};

use self::disk::{DiskBoundary, DiskStore, Prefetcher};
use crate::error::Result;
use crate::policy::Placement;

/// The state of one segment of a checkpointed stack.
pub(crate) enum Saved {
    /// The segment kept its autograd graph: `output` was computed from the leaf `input`.
    Graph { input: Var, output: Tensor },
    /// Only the segment's input was kept; the segment is recomputed from it during backward.
    Boundary(Boundary),
}

/// A kept segment input, wherever it lives.
pub(crate) enum Boundary {
    /// On the compute device.
    Device(Tensor),
    /// In host memory, to be copied back to `device`.
    Host { tensor: Tensor, device: Device },
    /// In a file.
    Disk(DiskBoundary),
}

/// A boundary back on its compute device, with what bringing it back cost.
pub(crate) struct Fetched {
    pub(crate) tensor: Tensor,
    pub(crate) transfer: std::time::Duration,
    /// Whether backward had to wait for the prefetcher (disk only).
    pub(crate) waited: Option<bool>,
}

impl Boundary {
    /// Stores `hidden` at `placement`.
    pub(crate) fn store(
        hidden: &Tensor,
        placement: Placement,
        disk: &DiskStore,
        layer: &str,
    ) -> Result<Self> {
        Ok(match placement {
            Placement::Graph | Placement::Device => Boundary::Device(hidden.clone()),
            Placement::Host => Boundary::Host {
                tensor: hidden.to_device(&Device::Cpu)?,
                device: hidden.device().clone(),
            },
            Placement::Disk => Boundary::Disk(disk.put(hidden, layer)?),
        })
    }

    /// Bytes the boundary occupies where it lives.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Boundary::Device(t) | Boundary::Host { tensor: t, .. } => tensor_bytes(t),
            Boundary::Disk(d) => d.bytes,
        }
    }

    /// Brings the boundary back to its compute device; disk boundaries come from `prefetch`.
    pub(crate) fn fetch(self, prefetch: Option<&Prefetcher>, layer: &str) -> Result<Fetched> {
        let started = Instant::now();
        match self {
            Boundary::Device(tensor) => Ok(Fetched {
                tensor,
                transfer: std::time::Duration::ZERO,
                waited: None,
            }),
            Boundary::Host { tensor, device } => {
                let tensor = tensor.to_device(&device)?;
                Ok(Fetched {
                    tensor,
                    transfer: started.elapsed(),
                    waited: None,
                })
            }
            Boundary::Disk(d) => {
                let loaded = match prefetch {
                    Some(p) => p.next(layer)?,
                    None => Prefetcher::start(vec![d.file.clone()], 1)?.next(layer)?,
                };
                drop(d);
                Ok(Fetched {
                    tensor: loaded.tensor,
                    transfer: loaded.transfer,
                    waited: Some(loaded.waited),
                })
            }
        }
    }
}

/// The size of a tensor's elements in bytes.
pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}
