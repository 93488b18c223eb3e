//! What a checkpointed segment keeps between its forward and its backward.

use candle_core::{Tensor, Var};

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
}

impl Boundary {
    /// Bytes the boundary occupies where it lives.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Boundary::Device(t) => tensor_bytes(t),
        }
    }
}

/// The size of a tensor's elements in bytes.
pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}
