//! Where checkpointed segments keep their inputs (boundaries) between forward and backward.
//!
//! Every store implements [`BoundaryStore`], and the policy picks one per segment:
//! - [`device`]: the boundary stays where it was computed (`recompute`);
//! - [`host`]: the boundary is copied to host memory and back. On a CUDA device this is the
//!   pinned store (`pinned`, with `--features cuda`); on a CPU compute device host memory *is*
//!   device memory, so the boundary is kept as it is (no copy) and only counted as host bytes;
//! - [`disk`]: the boundary goes to a file and is prefetched back.
//!
//! On a CUDA device both offloading stores take the boundary off the GPU through one stager
//! (`staging`, with `--features cuda`), which orders the copy after the kernels that wrote the
//! boundary on the compute stream, never from another thread.
//!
//! [`Boundary`] is one kept boundary of any store, [`Stores`] the stores of one engine.

pub(crate) mod device;
pub(crate) mod disk;
mod file;
pub(crate) mod host;
#[cfg(feature = "cuda")]
mod pinned;
#[cfg(any(test, feature = "cuda"))]
mod pool;
#[cfg(feature = "cuda")]
mod staging;

use std::time::Duration;

use candle_core::{DType, Tensor, Var};

use self::device::DeviceStore;
use self::disk::{DiskConfig, DiskStore};
use self::host::HostStore;
use crate::error::{Error, Result};
use crate::policy::Placement;

/// A place where boundaries wait between the forward and the backward pass.
///
/// The forward [`put`](Self::put)s each segment's input. The backward then takes the boundaries
/// back in reverse order: it opens a [`reader`](Self::reader) over them, asks the next boundary
/// to [`prefetch`](Self::prefetch) while the current segment recomputes, and
/// [`fetch`](Self::fetch)es each one just before its segment's backward.
pub(crate) trait BoundaryStore {
    /// What the store holds for one boundary; dropping it releases the boundary.
    type Kept;
    /// What one backward pass holds while it takes this store's boundaries back.
    type Reader;

    /// Takes `hidden`, the input of the segment starting at `layer`.
    fn put(&self, hidden: &Tensor, layer: &str) -> Result<Self::Kept>;

    /// Bytes `kept` occupies in the store.
    fn bytes(kept: &Self::Kept) -> u64;

    /// Prepares a backward pass that will fetch `order`, in that order.
    fn reader(&self, order: &[&Self::Kept]) -> Result<Self::Reader>;

    /// Starts bringing `kept`, the boundary of `layer`, back ahead of its use, where the store
    /// can.
    fn prefetch(kept: &Self::Kept, layer: &str) -> Result<()>;

    /// Brings `kept` back on its compute device.
    fn fetch(kept: Self::Kept, reader: &Self::Reader, layer: &str) -> Result<Fetched>;
}

/// A boundary back on its compute device, with what bringing it back cost.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) tensor: Tensor,
    pub(crate) transfer: Duration,
    /// Whether backward had to wait for a prefetching reader (`None`: the store has none).
    pub(crate) waited: Option<bool>,
}

/// The boundary stores of one engine.
#[derive(Debug)]
pub(crate) struct Stores {
    device: DeviceStore,
    host: HostStore,
    #[cfg(feature = "cuda")]
    pinned: pinned::PinnedStore,
    pub(crate) disk: DiskStore,
}

/// One kept boundary, in whichever store holds it.
pub(crate) enum Boundary {
    Device(<DeviceStore as BoundaryStore>::Kept),
    Host(<HostStore as BoundaryStore>::Kept),
    #[cfg(feature = "cuda")]
    Pinned(<pinned::PinnedStore as BoundaryStore>::Kept),
    Disk(<DiskStore as BoundaryStore>::Kept),
}

/// The readers of one backward pass, one per store.
pub(crate) struct Readers {
    disk: <DiskStore as BoundaryStore>::Reader,
}

/// The state of one segment of a checkpointed stack.
pub(crate) enum Saved {
    /// The segment kept its autograd graph: `output` was computed from the leaf `input`.
    Graph { input: Var, output: Tensor },
    /// Only the segment's input was kept; the segment is recomputed from it during backward.
    Boundary(Boundary),
}

impl Stores {
    pub(crate) fn new(disk: DiskConfig) -> Self {
        let disk = DiskStore::new(disk);
        Self {
            device: DeviceStore::default(),
            host: HostStore,
            // One stager for both offloading stores: one side stream per device, one pool.
            #[cfg(feature = "cuda")]
            pinned: pinned::PinnedStore::new(disk.stager()),
            disk,
        }
    }

    /// Bytes of boundaries on the compute device now.
    pub(crate) fn resident_bytes(&self) -> u64 {
        self.device.resident_bytes()
    }

    /// Keeps `hidden`, the input of the segment starting at `layer`, at `placement`.
    pub(crate) fn put(
        &self,
        hidden: &Tensor,
        placement: Placement,
        layer: &str,
    ) -> Result<Boundary> {
        let offloaded = matches!(placement, Placement::Host | Placement::Disk);
        let dtype = hidden.dtype();
        if offloaded && !matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64) {
            let mode = if placement == Placement::Host {
                "offload-host"
            } else {
                "offload-disk"
            };
            return Err(Error::Config(format!(
                "{layer}: a boundary of dtype {dtype:?} cannot be offloaded (mode {mode}): the \
                 host and disk stores keep f16, bf16, f32 and f64. Run the stack in one of \
                 those dtypes, or keep its boundaries on the device (recompute)"
            )));
        }
        Ok(match placement {
            Placement::Graph | Placement::Device => {
                Boundary::Device(self.device.put(hidden, layer)?)
            }
            #[cfg(feature = "cuda")]
            Placement::Host if hidden.device().is_cuda() => {
                Boundary::Pinned(self.pinned.put(hidden, layer)?)
            }
            Placement::Host => Boundary::Host(self.host.put(hidden, layer)?),
            Placement::Disk => Boundary::Disk(self.disk.put(hidden, layer)?),
        })
    }

    /// Opens the readers of a backward pass that fetches `order`, in that order.
    pub(crate) fn readers<'a>(&self, order: impl Iterator<Item = &'a Boundary>) -> Result<Readers> {
        // The forward is over: the last boundary's device tensor can go once its copy is done.
        #[cfg(feature = "cuda")]
        self.disk.stager().release_held()?;
        let disk: Vec<_> = order
            .filter_map(|b| match b {
                Boundary::Disk(d) => Some(d),
                _ => None,
            })
            .collect();
        Ok(Readers {
            disk: self.disk.reader(&disk)?,
        })
    }
}

impl Boundary {
    /// Bytes the boundary occupies where it lives.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Boundary::Device(kept) => DeviceStore::bytes(kept),
            Boundary::Host(kept) => HostStore::bytes(kept),
            #[cfg(feature = "cuda")]
            Boundary::Pinned(kept) => pinned::PinnedStore::bytes(kept),
            Boundary::Disk(kept) => DiskStore::bytes(kept),
        }
    }

    /// Starts bringing the boundary of `layer` back ahead of its use, where its store can.
    pub(crate) fn prefetch(&self, layer: &str) -> Result<()> {
        match self {
            Boundary::Device(kept) => DeviceStore::prefetch(kept, layer),
            Boundary::Host(kept) => HostStore::prefetch(kept, layer),
            #[cfg(feature = "cuda")]
            Boundary::Pinned(kept) => pinned::PinnedStore::prefetch(kept, layer),
            Boundary::Disk(kept) => DiskStore::prefetch(kept, layer),
        }
    }

    /// Brings the boundary back to its compute device.
    pub(crate) fn fetch(self, readers: &Readers, layer: &str) -> Result<Fetched> {
        match self {
            Boundary::Device(kept) => DeviceStore::fetch(kept, &(), layer),
            Boundary::Host(kept) => HostStore::fetch(kept, &(), layer),
            #[cfg(feature = "cuda")]
            Boundary::Pinned(kept) => pinned::PinnedStore::fetch(kept, &(), layer),
            Boundary::Disk(kept) => DiskStore::fetch(kept, &readers.disk, layer),
        }
    }
}

/// The size of a tensor's elements in bytes.
pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// Each store, through the whole protocol (put, reader, prefetch, fetch in reverse order),
    /// gives back exactly the bytes it was given, for every dtype a boundary can have.
    #[test]
    fn every_store_gives_back_what_it_was_given() -> Result<()> {
        let stores = Stores::new(DiskConfig::default());
        let base = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((2, 3, 4))?;
        for placement in [Placement::Device, Placement::Host, Placement::Disk] {
            for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
                let inputs: Vec<Tensor> = (0..3)
                    .map(|i| (&base + f64::from(i))?.to_dtype(dtype))
                    .collect::<candle_core::Result<_>>()?;
                let kept: Vec<Boundary> = inputs
                    .iter()
                    .map(|t| stores.put(t, placement, "layer"))
                    .collect::<Result<_>>()?;
                assert!(kept.iter().all(|b| b.bytes() == tensor_bytes(&inputs[0])));
                let readers = stores.readers(kept.iter().rev())?;
                let mut kept = kept;
                for input in inputs.iter().rev() {
                    let boundary = kept.pop().ok_or(crate::Error::Config("empty".into()))?;
                    if let Some(next) = kept.last() {
                        next.prefetch("layer")?;
                    }
                    let back = boundary.fetch(&readers, "layer")?.tensor;
                    assert_eq!((back.dims(), back.dtype()), (input.dims(), dtype));
                    let diff = (back.to_dtype(DType::F64)? - input.to_dtype(DType::F64)?)?
                        .abs()?
                        .sum_all()?
                        .to_scalar::<f64>()?;
                    assert!(diff == 0.0, "{placement:?} {dtype:?}: differs by {diff}");
                }
            }
        }
        assert_eq!(
            stores.resident_bytes(),
            0,
            "device boundaries outlived their use"
        );
        Ok(())
    }
}
