//! What the engine did in one step: where boundaries lived, and what recomputation cost.

use std::fmt;
use std::time::Duration;

use crate::policy::Placement;

/// Statistics of the steps since the last [`Checkpointer::take_stats`](crate::Checkpointer::take_stats).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Stacks run through the engine.
    pub stacks: u64,
    /// Segments checkpointed (recomputed in backward).
    pub segments: u64,
    /// Bytes of boundaries kept on the compute device.
    pub device_bytes: u64,
    /// Bytes of boundaries kept in host memory.
    pub host_bytes: u64,
    /// Bytes of boundaries written to disk.
    pub disk_bytes: u64,
    /// Time spent re-running layers during backward.
    pub recompute: Duration,
}

impl Stats {
    pub(crate) fn add_boundary(&mut self, placement: Placement, bytes: u64) {
        match placement {
            Placement::Graph => {}
            Placement::Device => self.device_bytes += bytes,
            Placement::Host => self.host_bytes += bytes,
            Placement::Disk => self.disk_bytes += bytes,
        }
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<22} {:>14}", "stacks", self.stacks)?;
        writeln!(f, "{:<22} {:>14}", "segments checkpointed", self.segments)?;
        writeln!(f, "{:<22} {:>14}", "boundary bytes device", self.device_bytes)?;
        writeln!(f, "{:<22} {:>14}", "boundary bytes host", self.host_bytes)?;
        writeln!(f, "{:<22} {:>14}", "boundary bytes disk", self.disk_bytes)?;
        write!(
            f,
            "{:<22} {:>11.3} ms",
            "recompute time",
            self.recompute.as_secs_f64() * 1e3
        )
    }
}
