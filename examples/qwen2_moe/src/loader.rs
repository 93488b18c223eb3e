//! Hugging Face Qwen2-MoE checkpoints in, trainable variables out: the `qwen2` loader (same
//! files, names, checks and errors) building a [`Qwen2Moe`].

use std::path::Path;

use candle_core::{DType, Device};
use qwen2::Result;
use qwen2::loader::{self, Loaded};

use crate::config::Config;
use crate::model::Qwen2Moe;

/// Loads the checkpoint in `dir` into trainable variables of `dtype` on `device`.
///
/// # Errors
/// As [`qwen2::loader::load`], and [`qwen2::Error::Config`] for a mixture-of-experts key it
/// does not support.
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Loaded<Qwen2Moe>> {
    let cfg = Config::from_file(&dir.join("config.json"))?;
    loader::load_with(dir, dtype, device, |_, vb| Qwen2Moe::new(&cfg, vb))
}

/// A randomly initialised model (seeded, deterministic on every machine).
///
/// # Errors
/// If candle cannot allocate the parameters.
pub fn random(cfg: &Config, seed: u64, dtype: DType, device: &Device) -> Result<Loaded<Qwen2Moe>> {
    loader::random_with(&cfg.base, seed, dtype, device, |_, vb| {
        Qwen2Moe::new(cfg, vb)
    })
}
