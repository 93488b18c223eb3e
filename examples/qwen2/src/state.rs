//! The training state, saved next to a checkpoint so that `--resume DIR` continues a run
//! exactly: `training_state.safetensors` holds every parameter in its training dtype and its
//! AdamW state (f32 moments, and the f32 master of a bf16/f16 parameter);
//! `training_state.json` the steps done, the sampler's position, the losses so far, and the
//! arguments a resumed run must repeat.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::save::replace;
use crate::train::ClippedAdamW;

/// The tensors' file.
pub const TENSORS: &str = "training_state.safetensors";
/// The position's file.
pub const META: &str = "training_state.json";

/// Where a run stands, beside its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Optimizer steps done (the learning-rate schedule's position).
    pub step: usize,
    /// The batch sampler's position ([`Dataset::sampler_state`]).
    pub data_position: u64,
    /// The run's seed (initialisation, split and sampler).
    pub seed: u64,
    /// The loss of every step done.
    pub losses: Vec<f32>,
    /// `(step, loss)` of every evaluation done.
    pub evals: Vec<(usize, f64)>,
    /// Arguments that shape the run (`--lr`, `--batch`, `--dtype`, ...): a resumed run must
    /// give the same ones.
    pub args: BTreeMap<String, String>,
}

/// A saved training state, read back.
#[derive(Debug)]
pub struct Saved {
    /// Where the run stood.
    pub meta: Meta,
    /// `param.<name>` and `adamw.<name>` per parameter.
    tensors: HashMap<String, Tensor>,
}

/// Writes the training state of `params` (named as in the checkpoint) into `dir`.
///
/// # Errors
/// [`Error::Write`] naming the file; a parameter the optimizer does not hold.
pub fn save(dir: &Path, meta: &Meta, opt: &ClippedAdamW, params: &[(String, Var)]) -> Result<()> {
    let mut tensors = HashMap::with_capacity(2 * params.len());
    for (name, var) in params {
        let state = opt.state(var).ok_or_else(|| {
            Error::Data(format!(
                "saving the training state: parameter `{name}` has no optimizer state"
            ))
        })?;
        tensors.insert(format!("param.{name}"), var.as_tensor().clone());
        tensors.insert(format!("adamw.{name}"), state.clone());
    }
    replace(&dir.join(TENSORS), |tmp| {
        candle_core::safetensors::save(&tensors, tmp)
            .map_err(|e| Error::write(tmp, std::io::Error::other(e.to_string())))
    })?;
    let json = serde_json::to_string_pretty(meta)
        .map_err(|e| Error::Data(format!("training state: {e}")))?;
    replace(&dir.join(META), |tmp| {
        fs::write(tmp, json).map_err(|e| Error::write(tmp, e))
    })
}

/// Reads the training state in `dir` (onto the CPU).
///
/// # Errors
/// [`Error::Io`] for a missing file, [`Error::Data`] for an unreadable one (naming it).
pub fn load(dir: &Path) -> Result<Saved> {
    let meta_path = dir.join(META);
    let text = fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
    let meta: Meta = serde_json::from_str(&text).map_err(|e| {
        Error::Data(format!(
            "{}: not a training state ({e}); --resume takes a directory a `--save` run wrote",
            meta_path.display()
        ))
    })?;
    let path = dir.join(TENSORS);
    if !path.is_file() {
        return Err(Error::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
        Error::Data(format!(
            "{}: not a readable safetensors file: {e}",
            path.display()
        ))
    })?;
    Ok(Saved { meta, tensors })
}

impl Saved {
    /// Checks that this run's `args` are the saved run's.
    ///
    /// # Errors
    /// [`Error::Data`] naming every argument that differs, with both values.
    pub fn check_args(&self, dir: &Path, args: &BTreeMap<String, String>) -> Result<()> {
        let none = "(not given)".to_owned();
        let keys: std::collections::BTreeSet<&String> =
            self.meta.args.keys().chain(args.keys()).collect();
        let differ: Vec<String> = keys
            .into_iter()
            .filter_map(|k| {
                let (saved, now) = (
                    self.meta.args.get(k).unwrap_or(&none),
                    args.get(k).unwrap_or(&none),
                );
                (saved != now).then(|| format!("{k}: saved {saved}, now {now}"))
            })
            .collect();
        if differ.is_empty() {
            return Ok(());
        }
        Err(Error::Data(format!(
            "--resume {}: the run was saved with other arguments ({}); resume with the saved \
             ones, or start a fresh run without --resume",
            dir.display(),
            differ.join("; ")
        )))
    }

    /// Puts the saved weights into `params`, the AdamW state into `opt` and the sampler's
    /// position into `data`.
    ///
    /// # Errors
    /// [`Error::Data`] naming a parameter missing from the state or of another shape or dtype.
    pub fn apply(
        &self,
        params: &[(String, Var)],
        opt: &mut ClippedAdamW,
        data: &mut Dataset,
    ) -> Result<()> {
        let mut states = Vec::with_capacity(params.len());
        for (name, var) in params {
            let get = |key: String| {
                self.tensors.get(&key).ok_or_else(|| {
                    Error::Data(format!(
                        "--resume: the training state has no `{key}`: it was saved from \
                         another model; resume with the saved --model"
                    ))
                })
            };
            let value = get(format!("param.{name}"))?;
            if value.dims() != var.dims() || value.dtype() != var.dtype() {
                return Err(Error::Data(format!(
                    "--resume: `{name}` is saved as {:?} {:?} but the model's is {:?} {:?}; \
                     resume with the saved --model and --dtype",
                    value.dtype(),
                    value.dims(),
                    var.dtype(),
                    var.dims()
                )));
            }
            var.set(&value.to_device(var.device())?)?;
            states.push((var, get(format!("adamw.{name}"))?.clone()));
        }
        let step = u32::try_from(self.meta.step)
            .map_err(|_| Error::Data(format!("--resume: step {} too large", self.meta.step)))?;
        opt.restore(step, states)
            .map_err(|e| Error::Data(format!("--resume: the optimizer state does not fit: {e}")))?;
        data.set_sampler_state(self.meta.data_position);
        Ok(())
    }
}
