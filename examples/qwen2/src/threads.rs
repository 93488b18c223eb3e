//! CPU threads: how candle's two pools share the cores, and the one setting that keeps them
//! from fighting.
//!
//! On the CPU candle runs element-wise ops (maps, binary ops, reductions) on its own *barrier
//! pool*: the calling thread and `n - 1` workers, `n` being `CANDLE_NUM_THREADS`, else
//! `RAYON_NUM_THREADS`, else the number of cores. Matrix products go to `gemm`, which runs on
//! rayon's global pool of `n` threads, as do `checkpoint-ops`' row-parallel kernels. Nothing
//! nests (no matmul runs inside a parallel map), so at most one pool has work at a time; but
//! a barrier-pool worker that has finished spins for `CANDLE_BARRIER_POOL_SPIN_LIMIT` rounds
//! (25,000 `pause`s by default, about a millisecond) before it parks. A training step
//! alternates element-wise ops with matmuls thousands of times, so after each element-wise op
//! the spinning worker holds a core that the next matmul's rayon threads need: `n + n - 1`
//! busy threads on `n` cores.
//!
//! [`limit_idle_spinning`] lowers that limit to [`SPIN_LIMIT`] unless the user set it. The
//! effect was measured with the step benchmark (`BENCHMARKS.md`, "Threads").

use std::env;

/// The environment variable candle reads once, when its barrier pool starts.
pub const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Spin rounds before an idle barrier-pool worker parks: enough to catch the next element-wise
/// op of a chain, far too few to hold a core through a matmul.
pub const SPIN_LIMIT: u32 = 200;

/// Sets [`SPIN_LIMIT_VAR`] to [`SPIN_LIMIT`] unless it is already set (the user's value wins).
///
/// # Safety
/// Writes the process environment: call it first thing in `main`, before any other thread
/// exists (candle's pools included, which start on the first tensor op), as
/// [`std::env::set_var`] requires.
pub unsafe fn limit_idle_spinning() {
    if env::var_os(SPIN_LIMIT_VAR).is_none() {
        // SAFETY: the caller guarantees that no other thread runs yet (see above).
        unsafe { env::set_var(SPIN_LIMIT_VAR, SPIN_LIMIT.to_string()) };
    }
}
