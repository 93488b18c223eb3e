//! Where checkpointed segments keep their state between forward and backward.
//!
//! - device: the boundary stays where it was computed (`recompute`);
//! - host: the boundary is copied to host memory and copied back for backward. On a CPU compute
//!   device host memory *is* device memory, so the boundary is kept as it is (no copy) and only
//!   counted as host bytes;
//! - disk: the boundary goes to a file (see [`disk`]) and is prefetched back.

pub(crate) mod disk;
mod file;
#[cfg(feature = "cuda")]
mod pinned;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};

use self::disk::{DiskBoundary, DiskConfig, DiskStore, Prefetcher};
use crate::error::Result;
use crate::policy::Placement;

/// The boundary stores of one engine.
#[derive(Debug)]
pub(crate) struct Stores {
    pub(crate) disk: DiskStore,
    /// Bytes of boundaries on the compute device now.
    resident: Arc<AtomicU64>,
    #[cfg(feature = "cuda")]
    pinned: pinned::PinnedStore,
}

impl Stores {
    pub(crate) fn new(disk: DiskConfig) -> Self {
        Self {
            disk: DiskStore::new(disk),
            resident: Arc::default(),
            #[cfg(feature = "cuda")]
            pinned: pinned::PinnedStore::default(),
        }
    }

    /// Bytes of boundaries on the compute device now.
    pub(crate) fn resident_bytes(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }
}

/// A boundary kept on the compute device, counted as resident for as long as it lives.
pub(crate) struct Resident {
    tensor: Tensor,
    bytes: u64,
    counter: Arc<AtomicU64>,
}

impl Resident {
    fn new(tensor: Tensor, counter: &Arc<AtomicU64>) -> Self {
        let bytes = tensor_bytes(&tensor);
        counter.fetch_add(bytes, Ordering::Relaxed);
        Self {
            tensor,
            bytes,
            counter: Arc::clone(counter),
        }
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

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
    Device(Resident),
    /// In host memory, to be copied back to `device` (on a CPU device: the tensor itself).
    Host { tensor: Tensor, device: Device },
    /// In a pinned host buffer of a CUDA device.
    #[cfg(feature = "cuda")]
    Pinned {
        boundary: std::sync::Arc<pinned::PinnedBoundary>,
        bytes: u64,
    },
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
        stores: &Stores,
        layer: &str,
    ) -> Result<Self> {
        Ok(match placement {
            Placement::Graph | Placement::Device => {
                Boundary::Device(Resident::new(hidden.clone(), &stores.resident))
            }
            #[cfg(feature = "cuda")]
            Placement::Host if hidden.device().is_cuda() => Boundary::Pinned {
                boundary: stores.pinned.store(hidden)?,
                bytes: tensor_bytes(hidden),
            },
            Placement::Host => Boundary::Host {
                tensor: hidden.to_device(&Device::Cpu)?,
                device: hidden.device().clone(),
            },
            Placement::Disk => Boundary::Disk(stores.disk.put(hidden, layer)?),
        })
    }

    /// Starts bringing the boundary back ahead of its use, where the store can.
    pub(crate) fn prefetch(&self) -> Result<()> {
        match self {
            #[cfg(feature = "cuda")]
            Boundary::Pinned { boundary, .. } => Ok(boundary.prefetch()?),
            _ => Ok(()),
        }
    }

    /// Bytes the boundary occupies where it lives.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Boundary::Device(r) => r.bytes,
            Boundary::Host { tensor, .. } => tensor_bytes(tensor),
            Boundary::Disk(d) => d.bytes,
            #[cfg(feature = "cuda")]
            Boundary::Pinned { bytes, .. } => *bytes,
        }
    }

    /// Brings the boundary back to its compute device; disk boundaries come from `prefetch`.
    pub(crate) fn fetch(self, prefetch: Option<&Prefetcher>, layer: &str) -> Result<Fetched> {
        let started = Instant::now();
        match self {
            Boundary::Device(resident) => Ok(Fetched {
                tensor: resident.tensor.clone(),
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
            #[cfg(feature = "cuda")]
            Boundary::Pinned { boundary, .. } => Ok(Fetched {
                tensor: boundary.take()?,
                transfer: started.elapsed(),
                waited: None,
            }),
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
