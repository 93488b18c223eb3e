//! Writing a trained model back as a Hugging Face checkpoint: `config.json` and
//! `model.safetensors` under the checkpoint's own tensor names, readable by [`crate::loader`]
//! and by transformers.
//!
//! Each file is written to a temporary name in the same directory and renamed into place, so
//! that an interrupted save never leaves a half-written checkpoint where a good one was.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;

use candle_core::{DType, Tensor};
use candle_nn::VarMap;

use crate::config::Config;
use crate::error::{Error, Result};

/// The files [`save`] writes into its directory.
pub const FILES: [&str; 2] = ["config.json", "model.safetensors"];

/// Creates `dir` if needed and checks that it can take a checkpoint: called before training, so
/// that a bad `--save` fails in a second rather than after the run.
///
/// # Errors
/// [`Error::Write`] naming the directory when it cannot be created or written.
pub fn prepare(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
    let probe = dir.join(".qwen2-save-probe");
    fs::write(&probe, b"").map_err(|e| Error::write(&probe, e))?;
    fs::remove_file(&probe).map_err(|e| Error::write(&probe, e))
}

/// Writes `config` and every variable of `varmap` (named as in the checkpoint) into `dir`,
/// replacing a checkpoint already there.
///
/// # Errors
/// [`Error::Write`] naming the file that could not be written; the previous file stays in place.
pub fn save(dir: &Path, config: &Config, varmap: &VarMap) -> Result<()> {
    save_as(dir, config, varmap, None)
}

/// [`save`], with the weights converted to `dtype` (the dtype of the checkpoint a run started
/// from: a bf16 checkpoint trained in f32 is saved bf16); `None`: as trained.
///
/// # Errors
/// As [`save`].
pub fn save_as(dir: &Path, config: &Config, varmap: &VarMap, dtype: Option<DType>) -> Result<()> {
    prepare(dir)?;
    let [config_name, weights_name] = FILES;
    replace(&dir.join(config_name), |tmp| {
        fs::write(tmp, config.to_json()).map_err(|e| Error::write(tmp, e))
    })?;
    let tensors = {
        let vars = varmap.data().lock().unwrap_or_else(PoisonError::into_inner);
        vars.iter()
            .map(|(name, var)| {
                let t = var.as_tensor();
                let t = match dtype {
                    Some(d) if d != t.dtype() => t.to_dtype(d)?,
                    _ => t.clone(),
                };
                Ok((name.clone(), t))
            })
            .collect::<candle_core::Result<HashMap<String, Tensor>>>()?
    };
    replace(&dir.join(weights_name), |tmp| {
        candle_core::safetensors::save(&tensors, tmp)
            .map_err(|e| Error::write(tmp, std::io::Error::other(e.to_string())))
    })
}

/// The tokenizer files a Hugging Face checkpoint may have; [`copy_tokenizer`] copies those
/// present.
pub const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
];

/// Copies the [`TOKENIZER_FILES`] present in `from` (the checkpoint trained from) into `to`
/// (the saved one), so that `--model TO` tokenizes as the run did. Returns those copied.
///
/// # Errors
/// [`Error::Write`] naming the file that could not be copied.
pub fn copy_tokenizer(from: &Path, to: &Path) -> Result<Vec<&'static str>> {
    let mut copied = Vec::new();
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if !src.is_file() {
            continue;
        }
        let dst = to.join(name);
        // The same directory (`--model D --save D`): the files are already there.
        if src.canonicalize().ok() != dst.canonicalize().ok() || !dst.exists() {
            replace(&dst, |tmp| {
                fs::copy(&src, tmp)
                    .map(|_| ())
                    .map_err(|e| Error::write(tmp, e))
            })?;
        }
        copied.push(name);
    }
    Ok(copied)
}

/// Writes `path` through `write` into a temporary file next to it, then renames it into place.
pub(crate) fn replace(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let written =
        write(&tmp).and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::write(path, e)));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}
