//! `threads::limit_idle_spinning` sets candle's spin limit, and leaves a user's own value alone.
//! One test in a file of its own: it writes the environment of this process only.

use qwen2::threads::{SPIN_LIMIT, SPIN_LIMIT_VAR, limit_idle_spinning};

#[test]
fn the_spin_limit_is_set_once_and_a_users_value_wins() {
    // SAFETY: the only test of this process, and it starts no thread that reads the environment.
    unsafe {
        std::env::remove_var(SPIN_LIMIT_VAR);
        limit_idle_spinning();
    }
    assert_eq!(
        std::env::var(SPIN_LIMIT_VAR).ok(),
        Some(SPIN_LIMIT.to_string())
    );

    // SAFETY: as above.
    unsafe {
        std::env::set_var(SPIN_LIMIT_VAR, "7");
        limit_idle_spinning();
    }
    assert_eq!(std::env::var(SPIN_LIMIT_VAR).ok().as_deref(), Some("7"));
}
