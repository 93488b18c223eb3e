//! Which layers are checkpointed, and where their boundaries live between forward and backward.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// How an engine treats the layers a policy selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The plain autograd graph: every activation is kept. The baseline.
    None,
    /// Keep each segment's input (its boundary) on the compute device and re-run the segment
    /// during backward.
    Recompute,
    /// Like `Recompute`, with boundaries in host memory until backward: on CUDA, pinned buffers
    /// filled and drained on a side stream, one boundary prefetched ahead. On a CPU compute
    /// device host memory is the device's memory, so boundaries stay where they are (no copy)
    /// and are counted as host bytes: the mode then costs and saves what `Recompute` does.
    OffloadHost,
    /// Like `Recompute`, with boundaries in files on disk until backward: a private directory,
    /// a background writer, a prefetching reader and a checksum per file (see [`DiskConfig`](crate::DiskConfig)).
    OffloadDisk,
}

impl Mode {
    /// Every mode, in the order the CLI lists them.
    pub const ALL: [Mode; 4] = [
        Mode::None,
        Mode::Recompute,
        Mode::OffloadHost,
        Mode::OffloadDisk,
    ];

    /// The spelling used on command lines and in messages.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Recompute => "recompute",
            Mode::OffloadHost => "offload-host",
            Mode::OffloadDisk => "offload-disk",
        }
    }

    /// Where the boundaries of a checkpointed segment live in this mode.
    pub(crate) const fn placement(self) -> Placement {
        match self {
            Mode::None => Placement::Graph,
            Mode::Recompute => Placement::Device,
            Mode::OffloadHost => Placement::Host,
            Mode::OffloadDisk => Placement::Disk,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown checkpoint mode `{s}`: expected one of none, recompute, \
                     offload-host, offload-disk"
                ))
            })
    }
}

/// Where one segment's state lives between its forward and its backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    /// The segment keeps its autograd graph (no recomputation).
    Graph,
    /// The segment's input stays on the compute device.
    Device,
    /// The segment's input is copied to host memory.
    Host,
    /// The segment's input is written to disk.
    Disk,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Placement::Graph => "graph",
            Placement::Device => "device",
            Placement::Host => "host",
            Placement::Disk => "disk",
        })
    }
}

/// A run of consecutive layers that is checkpointed as one unit: only its input is kept, and the
/// whole run is recomputed during backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First layer (inclusive).
    pub start: usize,
    /// Last layer (exclusive).
    pub end: usize,
    /// Where the segment's state lives until backward.
    pub placement: Placement,
}

/// How closely the engine checks that recomputation reproduced the forward pass.
///
/// Every checkpointed layer is re-run during backward, and its gradients are right only if it
/// computes what it computed in the forward. The engine compares each recomputed layer output
/// with what it recorded in the forward, and fails with
/// [`Error::RecomputeMismatch`](crate::Error::RecomputeMismatch), naming the layer, on a
/// difference. It keeps no copy of the outputs (that would undo checkpointing), only a
/// fingerprint.
#[derive(Debug, Clone, Copy, Default)]
pub enum RecomputeCheck {
    /// Shape, dtype and device of every output. Always on: it costs nothing.
    #[default]
    Layout,
    /// Also the values. On a CPU device a 64-bit hash of the output's bits must match: bit for
    /// bit. On other devices the output's sum and absolute sum (reduced in `f32` on the device,
    /// which waits for it once per layer) must each agree within `tolerance` × the forward's
    /// absolute sum, since GPU kernels need not reproduce their rounding.
    Values {
        /// The relative tolerance on GPUs; [`RecomputeCheck::values`] uses `1e-4`.
        tolerance: f64,
    },
}

impl RecomputeCheck {
    /// [`Values`](Self::Values), with a GPU tolerance of `1e-4`.
    #[must_use]
    pub const fn values() -> Self {
        Self::Values { tolerance: 1e-4 }
    }
}

// Tolerances compare by their bits, so that a policy holding one is `Eq` like any other.
impl PartialEq for RecomputeCheck {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Layout, Self::Layout) => true,
            (Self::Values { tolerance: a }, Self::Values { tolerance: b }) => {
                a.to_bits() == b.to_bits()
            }
            _ => false,
        }
    }
}

impl Eq for RecomputeCheck {}

/// Which layers of a stack are checkpointed, in which mode, and in segments of how many layers.
///
/// ```
/// use checkpoint_runtime::{Mode, Policy};
///
/// let p = Policy::new(Mode::Recompute).segments(2).first(3);
/// let plan: Vec<_> = p.plan(5).into_iter().map(|s| (s.start, s.end)).collect();
/// assert_eq!(plan, [(0, 2), (2, 3), (3, 5)]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    mode: Mode,
    segment_len: usize,
    first: Option<usize>,
    keep_last: usize,
    budget: Option<u64>,
    check: RecomputeCheck,
}

impl Policy {
    /// Every layer in `mode`, one layer per segment.
    #[must_use]
    pub const fn new(mode: Mode) -> Self {
        Self {
            mode,
            segment_len: 1,
            first: None,
            keep_last: 0,
            budget: None,
            check: RecomputeCheck::Layout,
        }
    }

    /// The plain graph for every layer.
    #[must_use]
    pub const fn none() -> Self {
        Self::new(Mode::None)
    }

    /// Recompute every layer from a boundary kept on the device.
    #[must_use]
    pub const fn recompute() -> Self {
        Self::new(Mode::Recompute)
    }

    /// Checkpoint segments of `k` layers: only every k-th boundary is kept and each segment is
    /// recomputed whole (k = √L gives the classic √L memory). `0` is treated as `1`.
    #[must_use]
    pub const fn segments(mut self, k: usize) -> Self {
        self.segment_len = if k == 0 { 1 } else { k };
        self
    }

    /// Checkpoint only the first `n` layers; the rest keep their graph.
    #[must_use]
    pub const fn first(mut self, n: usize) -> Self {
        self.first = Some(n);
        self
    }

    /// Keep the boundaries of the last `n` checkpointed segments on the device even when the mode
    /// offloads: they are the first ones backward needs.
    #[must_use]
    pub const fn keep_last(mut self, n: usize) -> Self {
        self.keep_last = n;
        self
    }

    /// Fit the bytes a stack keeps between forward and backward into `bytes`: the engine measures
    /// each layer on the first step (a probe) and then keeps, recomputes or offloads (never
    /// beyond this policy's mode) per layer; see [`plan_budget`](crate::plan_budget). Replaces
    /// the segment, first and keep-last settings. A stack of another length or carry shape is
    /// measured and planned anew. On a CPU device a budget in [`Mode::OffloadHost`] is refused
    /// (host memory is the device's memory there): use [`Mode::OffloadDisk`].
    #[must_use]
    pub const fn budget(mut self, bytes: u64) -> Self {
        self.budget = Some(bytes);
        self
    }

    /// How recomputed outputs are checked against the forward's: [`RecomputeCheck::Layout`]
    /// (the default) or [`RecomputeCheck::values`], which also compares the values (bit for bit
    /// on CPU) at the cost of hashing every checkpointed layer's output once in the forward and
    /// once in the backward.
    #[must_use]
    pub const fn check_recompute(mut self, check: RecomputeCheck) -> Self {
        self.check = check;
        self
    }

    /// How recomputed outputs are checked.
    #[must_use]
    pub const fn recompute_check(&self) -> RecomputeCheck {
        self.check
    }

    /// The memory budget, if any.
    #[must_use]
    pub const fn memory_budget(&self) -> Option<u64> {
        self.budget
    }

    /// The mode of the checkpointed layers.
    #[must_use]
    pub const fn mode(&self) -> Mode {
        self.mode
    }

    /// Splits a stack of `len` layers into segments.
    #[must_use]
    pub fn plan(&self, len: usize) -> Vec<Segment> {
        let checkpointed = self.first.map_or(len, |n| n.min(len));
        let placement = self.mode.placement();
        let mut segments = Vec::new();
        if placement == Placement::Graph {
            if len > 0 {
                segments.push(Segment {
                    start: 0,
                    end: len,
                    placement,
                });
            }
            return segments;
        }
        let mut start = 0;
        while start < checkpointed {
            let end = (start + self.segment_len).min(checkpointed);
            segments.push(Segment {
                start,
                end,
                placement,
            });
            start = end;
        }
        let resident = self.keep_last.min(segments.len());
        let first_resident = segments.len() - resident;
        for seg in &mut segments[first_resident..] {
            seg.placement = Placement::Device;
        }
        if checkpointed < len {
            segments.push(Segment {
                start: checkpointed,
                end: len,
                placement: Placement::Graph,
            });
        }
        segments
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self::recompute()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(p: &Policy, len: usize) -> Vec<(usize, usize, Placement)> {
        p.plan(len)
            .into_iter()
            .map(|s| (s.start, s.end, s.placement))
            .collect()
    }

    #[test]
    fn none_is_one_graph_segment_and_empty_stacks_have_none() {
        assert_eq!(spans(&Policy::none(), 3), [(0, 3, Placement::Graph)]);
        assert!(Policy::none().plan(0).is_empty());
        assert!(Policy::recompute().plan(0).is_empty());
    }

    #[test]
    fn recompute_checkpoints_every_layer() {
        let d = Placement::Device;
        assert_eq!(
            spans(&Policy::recompute(), 3),
            [(0, 1, d), (1, 2, d), (2, 3, d)]
        );
    }

    #[test]
    fn segments_first_and_keep_last_compose() {
        let p = Policy::new(Mode::OffloadDisk)
            .segments(2)
            .first(5)
            .keep_last(1);
        assert_eq!(
            spans(&p, 7),
            [
                (0, 2, Placement::Disk),
                (2, 4, Placement::Disk),
                (4, 5, Placement::Device),
                (5, 7, Placement::Graph),
            ]
        );
    }

    #[test]
    fn modes_round_trip_through_their_names() {
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>().ok(), Some(m));
        }
        let err = "offload".parse::<Mode>().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("offload-disk")));
    }
}
