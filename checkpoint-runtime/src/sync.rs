//! Locking that outlives a panic elsewhere.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, recovering it if a panicking thread poisoned it: no map or store of the engine
/// holds an invariant that a panic can leave half-updated (a panicking step is forgotten whole).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
