//! Idle host buffers kept for reuse, bounded by the most bytes ever in use at once.
//!
//! Pinned host memory is slow to allocate (it is page-locked by the driver) and scarce (it cannot
//! be swapped), so buffers are reused across steps. Reuse alone would let the pool grow with
//! every new boundary shape (variable sequence lengths), so idle buffers are capped at the
//! high-water mark of buffers in use: beyond it, the oldest idle buffers are freed.

use std::collections::VecDeque;

/// A buffer the pool can keep: its size decides what the pool may hold.
pub(crate) trait Buffer {
    /// The buffer's size in bytes.
    fn bytes(&self) -> u64;
}

/// Idle buffers, oldest first, with the bytes handed out and the most ever handed out at once.
#[derive(Debug)]
pub(crate) struct Pool<B> {
    idle: VecDeque<B>,
    idle_bytes: u64,
    in_use: u64,
    high_water: u64,
    /// Buffers allocated (not reused) so far.
    allocated: u64,
}

impl<B> Default for Pool<B> {
    fn default() -> Self {
        Self {
            idle: VecDeque::new(),
            idle_bytes: 0,
            in_use: 0,
            high_water: 0,
            allocated: 0,
        }
    }
}

impl<B: Buffer> Pool<B> {
    /// Hands out the most recently idle buffer that `fits`, if any.
    pub(crate) fn reuse(&mut self, fits: impl Fn(&B) -> bool) -> Option<B> {
        let at = self.idle.iter().rposition(fits)?;
        let buf = self.idle.remove(at)?;
        self.idle_bytes -= buf.bytes();
        self.hand_out(buf.bytes());
        Some(buf)
    }

    /// Counts a freshly allocated buffer of `bytes` as handed out.
    pub(crate) fn lend(&mut self, bytes: u64) {
        self.allocated += 1;
        self.hand_out(bytes);
    }

    fn hand_out(&mut self, bytes: u64) {
        self.in_use += bytes;
        self.high_water = self.high_water.max(self.in_use);
    }

    /// Takes `buf` back; returns the oldest idle buffers that no longer fit under the cap, for
    /// the caller to free outside any lock.
    #[must_use = "the evicted buffers are freed when dropped; drop them outside the pool's lock"]
    pub(crate) fn give_back(&mut self, buf: B) -> Vec<B> {
        let bytes = buf.bytes();
        self.in_use = self.in_use.saturating_sub(bytes);
        self.idle_bytes += bytes;
        self.idle.push_back(buf);
        let mut evicted = Vec::new();
        while self.idle_bytes > self.high_water {
            let Some(old) = self.idle.pop_front() else {
                break;
            };
            self.idle_bytes -= old.bytes();
            evicted.push(old);
        }
        evicted
    }

    /// Bytes of idle buffers.
    #[cfg(test)]
    pub(crate) fn idle_bytes(&self) -> u64 {
        self.idle_bytes
    }

    /// The most bytes handed out at once so far.
    #[cfg(test)]
    pub(crate) fn high_water(&self) -> u64 {
        self.high_water
    }

    /// Buffers allocated (not reused) so far.
    #[cfg(test)]
    pub(crate) fn allocated(&self) -> u64 {
        self.allocated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Buf(u64);

    impl Buffer for Buf {
        fn bytes(&self) -> u64 {
            self.0
        }
    }

    /// Takes a buffer of `n` bytes from the pool, or allocates one.
    fn take(pool: &mut Pool<Buf>, n: u64) -> (Buf, bool) {
        match pool.reuse(|b| b.0 == n) {
            Some(b) => (b, true),
            None => {
                pool.lend(n);
                (Buf(n), false)
            }
        }
    }

    #[test]
    fn buffers_of_the_same_shape_are_reused_every_step() {
        let mut pool = Pool::default();
        for step in 0..5 {
            let bufs: Vec<_> = (0..4).map(|_| take(&mut pool, 100)).collect();
            let reused = bufs.iter().filter(|(_, r)| *r).count();
            assert_eq!(reused, if step == 0 { 0 } else { 4 }, "step {step}");
            assert_eq!(pool.allocated(), 4);
            for (b, _) in bufs {
                assert!(pool.give_back(b).is_empty());
            }
            assert_eq!(pool.idle_bytes(), 400);
        }
    }

    #[test]
    fn new_shapes_evict_old_buffers_instead_of_growing() {
        let mut pool = Pool::default();
        // Every step a new sequence length: the pool never holds more than one step's buffers.
        for (step, len) in (100..110).enumerate() {
            let bufs: Vec<_> = (0..4).map(|_| take(&mut pool, len).0).collect();
            let mut evicted = Vec::new();
            for b in bufs {
                evicted.extend(pool.give_back(b));
            }
            assert!(
                pool.idle_bytes() <= 4 * len,
                "step {step}: {}",
                pool.idle_bytes()
            );
            if step > 0 {
                assert_eq!(evicted, (0..4).map(|_| Buf(len - 1)).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn idle_bytes_never_exceed_the_most_in_use_at_once() {
        let mut pool = Pool::default();
        let a = take(&mut pool, 300).0;
        let b = take(&mut pool, 200).0;
        assert!(pool.give_back(a).is_empty());
        assert!(pool.give_back(b).is_empty());
        assert_eq!(pool.high_water(), 500);
        // 500 B were in use at once: a 100 B buffer does not fit with both idle ones kept.
        let c = take(&mut pool, 100).0;
        let evicted = pool.give_back(c);
        assert_eq!(evicted, [Buf(300)]);
        assert_eq!(pool.idle_bytes(), 300);
        // The most recently idle fitting buffer is handed out first.
        assert_eq!(pool.reuse(|b| b.0 >= 100), Some(Buf(100)));
    }
}
