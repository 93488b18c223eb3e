//! What the engine did: where boundaries lived, what recomputation and transfers cost.

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
    /// The most boundary bytes resident on the compute device at once.
    pub peak_device_bytes: u64,
    /// Time spent re-running layers during backward.
    pub recompute: Duration,
    /// Time spent moving boundaries off the device and back (writer and reader time for disk).
    pub transfer: Duration,
    /// Offloaded boundaries already back when backward needed them: loaded from disk, or (on
    /// CUDA) copied back to the GPU.
    pub prefetch_hits: u64,
    /// Offloaded boundaries that backward had to wait for.
    pub prefetch_waits: u64,
}

impl Stats {
    /// Folds the stats of a later step into these run totals: counts and times add up; boundary
    /// bytes and the peak describe one step, so the larger of the two is kept.
    pub fn merge(&mut self, step: &Stats) {
        self.stacks += step.stacks;
        self.segments += step.segments;
        self.device_bytes = self.device_bytes.max(step.device_bytes);
        self.host_bytes = self.host_bytes.max(step.host_bytes);
        self.disk_bytes = self.disk_bytes.max(step.disk_bytes);
        self.peak_device_bytes = self.peak_device_bytes.max(step.peak_device_bytes);
        self.recompute += step.recompute;
        self.transfer += step.transfer;
        self.prefetch_hits += step.prefetch_hits;
        self.prefetch_waits += step.prefetch_waits;
    }

    pub(crate) fn add_boundary(&mut self, placement: Placement, bytes: u64) {
        self.segments += 1;
        match placement {
            Placement::Graph => {}
            Placement::Device => self.device_bytes += bytes,
            Placement::Host => self.host_bytes += bytes,
            Placement::Disk => self.disk_bytes += bytes,
        }
    }
}

/// `bytes` in the largest binary unit that keeps the number at least 1.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        writeln!(f, "| stat                      |        value |")?;
        writeln!(f, "|---------------------------|-------------:|")?;
        writeln!(f, "| stacks                    | {:>12} |", self.stacks)?;
        writeln!(f, "| segments checkpointed     | {:>12} |", self.segments)?;
        writeln!(
            f,
            "| boundaries on device      | {:>12} |",
            human(self.device_bytes)
        )?;
        writeln!(
            f,
            "| boundaries in host memory | {:>12} |",
            human(self.host_bytes)
        )?;
        writeln!(
            f,
            "| boundaries on disk        | {:>12} |",
            human(self.disk_bytes)
        )?;
        writeln!(
            f,
            "| peak boundaries on device | {:>12} |",
            human(self.peak_device_bytes)
        )?;
        writeln!(
            f,
            "| recompute time            | {:>9.1} ms |",
            ms(self.recompute)
        )?;
        writeln!(
            f,
            "| transfer time             | {:>9.1} ms |",
            ms(self.transfer)
        )?;
        writeln!(
            f,
            "| prefetch hits             | {:>12} |",
            self.prefetch_hits
        )?;
        write!(
            f,
            "| prefetch waits            | {:>12} |",
            self.prefetch_waits
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Stats, human};

    #[test]
    fn merge_sums_counts_and_keeps_the_larger_step() {
        let step = |bytes: u64, ms: u64| Stats {
            stacks: 1,
            segments: 4,
            disk_bytes: bytes,
            peak_device_bytes: bytes / 2,
            recompute: Duration::from_millis(ms),
            prefetch_hits: 3,
            ..Stats::default()
        };
        let mut run = step(100, 5);
        run.merge(&step(300, 7));
        assert_eq!((run.stacks, run.segments, run.prefetch_hits), (2, 8, 6));
        assert_eq!((run.disk_bytes, run.peak_device_bytes), (300, 150));
        assert_eq!(run.recompute, Duration::from_millis(12));
    }

    #[test]
    fn human_picks_the_largest_unit() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.50 KiB");
        assert_eq!(human(5 << 20), "5.00 MiB");
        assert_eq!(human(3 << 30), "3.00 GiB");
    }
}
