//! Compile-time guarantees of `#[checkpointable]`: every misuse is a compile error whose message
//! says what to do (`tests/ui/fail/*.rs`, with the expected `.stderr` next to each), and the
//! supported shapes compile and run (`tests/ui/pass/*.rs`).
//!
//! After changing a message, regenerate the expected output with
//! `TRYBUILD=overwrite cargo test -p checkpoint-tests --test ui` and review the `.stderr` diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui/fail/*.rs");
    t.pass("ui/pass/*.rs");
}
