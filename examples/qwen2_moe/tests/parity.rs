//! Parity with the shared reference (`tests/fixtures/qwen2-moe-tiny`, made by Hugging Face
//! transformers): logits, load-balancing loss, total loss and every gradient.

use std::path::PathBuf;

use candle_core::Device;
use qwen2::verify::{GRAD_TOLERANCE, OUTPUT_TOLERANCE};
use qwen2_moe::verify::verify;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2-moe-tiny")
}

#[test]
fn matches_transformers_without_checkpointing() -> TestResult {
    let dir = fixture();
    let report = verify(&dir, &dir.join("reference.safetensors"), &Device::Cpu)?;
    println!("{report}");
    // logits, aux loss, loss; per layer 4 attention weights + 3 biases + 2 norms + router +
    // 4 experts × 3 + shared expert 3 + its gate = 26; embedding, final norm, untied head.
    assert_eq!(report.checks.len(), 3 + 2 * 26 + 3, "{report}");
    for c in &report.checks {
        let tol = if c.name.starts_with("grad.") {
            GRAD_TOLERANCE
        } else {
            OUTPUT_TOLERANCE
        };
        assert!(
            c.rel_err <= tol,
            "{} off by {:.3e}\n{report}",
            c.name,
            c.rel_err
        );
    }
    report.ok()?;
    Ok(())
}
