//! What the `qwen2` and `qwen2-moe` binaries share on their command lines: the checkpointing
//! policy's arguments, the compute device, the dtype, the tokenizer and the exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{DType, Device};
use checkpoint_runtime::{DiskConfig, Mode};
use clap::Args;

use crate::chat::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::train::CheckpointOptions;
use crate::{Error, Result};

/// The checkpointing policy, as command-line arguments (flatten them into a command's).
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// none | recompute | offload-host | offload-disk
    #[arg(long, default_value = "recompute")]
    pub checkpoint: Mode,
    /// Layers per checkpointed segment (only each segment's input is kept).
    #[arg(long, default_value_t = 1)]
    pub segment: usize,
    /// Checkpoint only the first N layers; the rest keep their graph.
    #[arg(long)]
    pub first: Option<usize>,
    /// Offload modes: keep the boundaries of the last N segments on the device (backward needs
    /// them first).
    #[arg(long, default_value_t = 0)]
    pub keep_last: usize,
    /// Memory budget (MiB) for what the layer stack keeps between forward and backward: the
    /// engine measures each layer on the first step and keeps, recomputes or offloads (within
    /// the mode) per layer; prints its plan. Replaces --segment, --first and --keep-last.
    #[arg(long, value_name = "MIB")]
    pub budget_mib: Option<u64>,
    /// offload-disk: the directory under which the engine creates its private (0700) directory
    /// [default: the system temp dir].
    #[arg(long, value_name = "DIR")]
    pub offload_dir: Option<PathBuf>,
    /// offload-disk: boundaries read ahead of the backward pass.
    #[arg(long, default_value_t = DiskConfig::default().prefetch)]
    pub prefetch: usize,
}

impl PolicyArgs {
    /// The engine options these arguments ask for, checked before anything is loaded.
    ///
    /// # Errors
    /// An option that does not apply to the mode, or a budget too large to count in bytes.
    pub fn options(&self) -> Result<CheckpointOptions> {
        let budget = self
            .budget_mib
            .map(|mib| {
                mib.checked_mul(1 << 20)
                    .ok_or_else(|| Error::Data(format!("--budget-mib {mib}: too large")))
            })
            .transpose()?;
        let options = CheckpointOptions {
            mode: self.checkpoint,
            segment: self.segment,
            first: self.first,
            keep_last: self.keep_last,
            budget,
            offload_dir: self.offload_dir.clone(),
            prefetch: self.prefetch,
        };
        options.policy()?; // reject options that do not apply before loading anything
        Ok(options)
    }
}

/// The GPU with `--features cuda`, the CPU otherwise.
///
/// # Errors
/// Built for CUDA, but device 0 cannot be opened.
pub fn device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        Device::new_cuda(0).map_err(|e| {
            Error::Data(format!(
                "built with --features cuda, but CUDA device 0 is unusable: {e}"
            ))
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(Device::Cpu)
    }
}

/// `--dtype`: f32, bf16 or f16; by default bf16 on a GPU and f32 on the CPU.
///
/// # Errors
/// Any other name.
pub fn parse_dtype(arg: Option<&str>, device: &Device) -> Result<DType> {
    match arg {
        None if device.is_cuda() => Ok(DType::BF16),
        None => Ok(DType::F32),
        Some("f32") => Ok(DType::F32),
        Some("bf16") => Ok(DType::BF16),
        Some("f16") => Ok(DType::F16),
        Some(other) => Err(Error::Data(format!(
            "--dtype {other}: expected f32, bf16 or f16"
        ))),
    }
}

/// The tokenizer (and chat template) of `--model DIR`, or bytes with `--bytes` or without a
/// checkpoint. Read before the weights, so that a checkpoint without a tokenizer fails at once.
///
/// # Errors
/// [`Error::MissingTokenizer`] for a checkpoint without `tokenizer.json` (unless `bytes`); an
/// unreadable tokenizer or chat template.
pub fn tokenizer(model: Option<&Path>, bytes: bool) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    match model {
        Some(dir) if !bytes => Ok((Tokenizer::from_dir(dir)?, ChatTemplate::from_dir(dir)?)),
        _ => Ok((Tokenizer::bytes(), None)),
    }
}

/// A command's exit: success, or its error on stderr and failure.
#[must_use]
pub fn exit_code(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
