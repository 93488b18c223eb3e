//! Writing a trained model back as a Hugging Face checkpoint: `config.json` and
//! `model.safetensors` under the checkpoint's own tensor names, readable by [`crate::loader`]
//! and by transformers.
//!
//! Each file is written to a temporary name in the same directory and renamed into place, so
//! that an interrupted save never leaves a half-written checkpoint where a good one was.

use std::fs;
use std::path::{Path, PathBuf};

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
    prepare(dir)?;
    let [config_name, weights_name] = FILES;
    replace(&dir.join(config_name), |tmp| {
        fs::write(tmp, config.to_json()).map_err(|e| Error::write(tmp, e))
    })?;
    replace(&dir.join(weights_name), |tmp| {
        varmap
            .save(tmp)
            .map_err(|e| Error::write(tmp, std::io::Error::other(e.to_string())))
    })
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
