//! PEFT LoRA adapter directories in and out, and merging an adapter into its base.
//!
//! A directory holds `adapter_config.json` (`peft_type: "LORA"`, `r`, `lora_alpha`,
//! `target_modules`, ...) and `adapter_model.safetensors`, whose tensors carry PEFT's names:
//! `base_model.model.` + the module path + `.lora_A.weight` `(r, in)` or `.lora_B.weight`
//! `(out, r)`, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. [`load`]
//! reads one (refusing, by key, the PEFT options this implementation does not compute), [`save`]
//! writes one that `PeftModel.from_pretrained` loads, each file written to a temporary name and
//! renamed into place as [`crate::save`] does, and [`merge`] folds an adapter into the base
//! weights, `W + B·A · alpha/r`, for a plain checkpoint.
//!
//! `lora_dropout` is read as any unknown key is, and not applied: training here runs without
//! dropout, and inference and merging never use it.
//!
//! ```no_run
//! use std::path::Path;
//! use candle_core::{DType, Device};
//!
//! # fn main() -> qwen2::Result<()> {
//! let adapter = qwen2::adapter::load(Path::new("out/adapter"))?;
//! let base = Path::new("Qwen2-0.5B-Instruct");
//! let loaded =
//!     qwen2::loader::load_lora(base, &adapter.config, adapter.init(), DType::F32, &Device::Cpu)?;
//! // `loaded.params` holds only the lora_A/lora_B matrices: train them, then
//! qwen2::adapter::save(Path::new("out/adapter-2"), &loaded, Some("Qwen2-0.5B-Instruct"))?;
//! let merged = qwen2::adapter::merge(&loaded)?; // W + B·A·alpha/r
//! qwen2::save::save(Path::new("out/merged"), &loaded.config, &merged)?;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::loader::{Loaded, LoraInit};
use crate::lora::{LoraConfig, Target, is_lora_name};

/// What PEFT puts before a module path in an adapter's tensor names.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The files of an adapter directory: config, weights.
pub const FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// An adapter read from a directory.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `r`, `lora_alpha` and `target_modules` of `adapter_config.json` (seed 0: unused).
    pub config: LoraConfig,
    /// The LoRA matrices under the model's names (PEFT's without [`PEFT_PREFIX`]).
    pub tensors: HashMap<String, Tensor>,
    /// `adapter_model.safetensors`, named in errors.
    pub weights_file: PathBuf,
}

impl Adapter {
    /// The matrices as the loader's initialisation ([`crate::loader::load_lora`]).
    #[must_use]
    pub fn init(&self) -> LoraInit {
        LoraInit::Tensors {
            file: self.weights_file.clone(),
            tensors: self.tensors.clone(),
        }
    }
}

/// `adapter_config.json` as PEFT writes it: the keys that change the computation.
#[derive(Debug, Deserialize)]
struct RawAdapterConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    target_modules: Option<TargetModules>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    bias: Option<String>,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: HashMap<String, serde_json::Value>,
    layers_to_transform: Option<serde_json::Value>,
    modules_to_save: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    One(String),
}

/// Reads the adapter in `dir`.
///
/// # Errors
/// [`Error::Io`] / [`Error::Json`] for unreadable files; [`Error::Adapter`] naming the file and
/// the key for a PEFT option this implementation does not compute (DoRA, rsLoRA, per-layer ranks,
/// biases, `modules_to_save`, a regex `target_modules`), an unknown target module, or a tensor
/// that is not a LoRA matrix under PEFT's names.
pub fn load(dir: &Path) -> Result<Adapter> {
    let [config_name, weights_name] = FILES;
    let config_path = dir.join(config_name);
    let text = fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let raw: RawAdapterConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: config_path.clone(),
        source,
    })?;
    let config = raw.validate(&config_path)?;

    let weights_file = dir.join(weights_name);
    if !weights_file.is_file() {
        return Err(Error::io(
            &weights_file,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let stored = candle_core::safetensors::load(&weights_file, &Device::Cpu).map_err(|e| {
        Error::Adapter {
            path: weights_file.clone(),
            message: format!("not a readable safetensors file: {e}"),
        }
    })?;
    let mut tensors = HashMap::new();
    for (name, t) in stored {
        let Some(ours) = name.strip_prefix(PEFT_PREFIX).filter(|n| is_lora_name(n)) else {
            return Err(Error::Adapter {
                path: weights_file,
                message: format!(
                    "tensor `{name}` is not a LoRA matrix under PEFT's names \
                     (`{PEFT_PREFIX}model.layers.N.self_attn.q_proj.lora_A.weight`); \
                     only lora_A/lora_B matrices are supported"
                ),
            });
        };
        tensors.insert(ours.to_owned(), t);
    }
    Ok(Adapter {
        config,
        tensors,
        weights_file,
    })
}

impl RawAdapterConfig {
    fn validate(self, path: &Path) -> Result<LoraConfig> {
        let refuse = |key: &str, message: &str| Error::Adapter {
            path: path.to_owned(),
            message: format!("key `{key}`: {message}"),
        };
        if let Some(kind) = &self.peft_type
            && kind != "LORA"
        {
            return Err(refuse(
                "peft_type",
                &format!("`{kind}` is not a LoRA adapter; only peft_type \"LORA\" is supported"),
            ));
        }
        let unsupported = [
            ("use_dora", self.use_dora, "DoRA is not implemented"),
            (
                "use_rslora",
                self.use_rslora,
                "rank-stabilised scaling (alpha/√r) is not implemented",
            ),
            (
                "fan_in_fan_out",
                self.fan_in_fan_out,
                "transposed (Conv1D) weights do not occur in Qwen2",
            ),
            (
                "lora_bias",
                self.lora_bias,
                "LoRA biases are not implemented",
            ),
            (
                "rank_pattern",
                !self.rank_pattern.is_empty(),
                "per-module ranks are not implemented",
            ),
            (
                "alpha_pattern",
                !self.alpha_pattern.is_empty(),
                "per-module alphas are not implemented",
            ),
            (
                "layers_to_transform",
                self.layers_to_transform.is_some(),
                "adapting only some layers is not implemented",
            ),
            (
                "modules_to_save",
                self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()),
                "fully trained extra modules are not implemented",
            ),
        ];
        if let Some((key, _, why)) = unsupported.into_iter().find(|(_, set, _)| *set) {
            return Err(refuse(
                key,
                &format!("{why}; use an adapter saved without it"),
            ));
        }
        if let Some(bias) = &self.bias
            && bias != "none"
        {
            return Err(refuse(
                "bias",
                &format!("`{bias}`: trained biases are not implemented; only \"none\""),
            ));
        }
        let names = match self.target_modules {
            Some(TargetModules::List(names)) => names,
            Some(TargetModules::One(name)) if Target::parse(&name).is_ok() => vec![name],
            Some(TargetModules::One(pattern)) => {
                return Err(refuse(
                    "target_modules",
                    &format!(
                        "`{pattern}` is a pattern; list the module names instead, e.g. \
                         [\"q_proj\", \"v_proj\"]"
                    ),
                ));
            }
            None => {
                return Err(refuse(
                    "target_modules",
                    "missing; list the adapted modules",
                ));
            }
        };
        let targets = names
            .iter()
            .map(|n| {
                Target::parse(n).map_err(|e| Error::Adapter {
                    path: path.to_owned(),
                    message: format!("key `target_modules`: {e}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        LoraConfig::new(self.r, self.lora_alpha, targets, 0).map_err(|e| Error::Adapter {
            path: path.to_owned(),
            message: format!("keys `r`/`lora_alpha`: {e}"),
        })
    }
}

/// The `adapter_config.json` text for `lora`, with the keys PEFT reads.
#[must_use]
pub fn config_json(lora: &LoraConfig, base_model: Option<&str>) -> String {
    // PEFT writes lora_alpha as an integer when it is one.
    #[allow(clippy::cast_possible_truncation)]
    let alpha = if lora.alpha.fract() == 0.0 && lora.alpha.abs() < 1e15 {
        serde_json::json!(lora.alpha as i64)
    } else {
        serde_json::json!(lora.alpha)
    };
    let value = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": null,
        "r": lora.r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": lora.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": false,
        "use_dora": false,
        "lora_bias": false,
    });
    format!("{value:#}\n")
}

/// Writes the LoRA matrices of `loaded` as a PEFT adapter into `dir` (created if needed),
/// replacing an adapter already there; `base_model` becomes `base_model_name_or_path`.
///
/// # Errors
/// [`Error::Data`] when `loaded` has no LoRA; [`Error::Write`] naming the file that could not be
/// written (the previous file stays in place).
pub fn save(dir: &Path, loaded: &Loaded, base_model: Option<&str>) -> Result<()> {
    let lora = loaded.lora.as_ref().ok_or_else(|| {
        Error::Data(
            "saving an adapter needs a model with LoRA (--lora-r/--lora-targets or --adapter)"
                .into(),
        )
    })?;
    crate::save::prepare(dir)?;
    let tensors: HashMap<String, Tensor> = loaded
        .params
        .iter()
        .filter(|(n, _)| is_lora_name(n))
        .map(|(n, v)| (format!("{PEFT_PREFIX}{n}"), v.as_tensor().clone()))
        .collect();
    let [config_name, weights_name] = FILES;
    crate::save::replace(&dir.join(weights_name), |tmp| {
        candle_core::safetensors::save(&tensors, tmp)
            .map_err(|e| Error::write(tmp, std::io::Error::other(e.to_string())))
    })?;
    crate::save::replace(&dir.join(config_name), |tmp| {
        fs::write(tmp, config_json(lora, base_model)).map_err(|e| Error::write(tmp, e))
    })
}

/// The base weights of `loaded` with its LoRA updates folded in, `W + B·A · alpha/r` (computed
/// in f32, stored in `W`'s dtype), under the checkpoint's names: save them with
/// [`crate::save::save`] for a plain checkpoint.
///
/// # Errors
/// [`Error::Data`] when `loaded` has no LoRA, or a LoRA matrix has no partner or no base weight.
pub fn merge(loaded: &Loaded) -> Result<VarMap> {
    let lora = loaded.lora.as_ref().ok_or_else(|| {
        Error::Data(
            "--merge folds a LoRA adapter into the base: give --lora-r and --lora-targets, or \
             --adapter DIR"
                .into(),
        )
    })?;
    let params: HashMap<&str, &Var> = loaded.params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let base = loaded.varmap.data().lock().map_or_else(
        |poisoned| poisoned.into_inner().clone(),
        |guard| guard.clone(),
    );
    let merged = VarMap::new();
    {
        let mut out = merged
            .data()
            .lock()
            .map_err(|_| Error::Data("the merged weights' lock is poisoned".into()))?;
        for (name, var) in &base {
            let Some(module) = name.strip_suffix(".weight") else {
                out.insert(name.clone(), var.clone());
                continue;
            };
            let a_name = format!("{module}.lora_A.weight");
            let b_name = format!("{module}.lora_B.weight");
            let value = match (params.get(a_name.as_str()), params.get(b_name.as_str())) {
                (None, None) => var.clone(),
                (Some(a), Some(b)) => {
                    let w = var.as_tensor();
                    let a = a.as_tensor().to_dtype(DType::F32)?; // (r, in)
                    let b = b.as_tensor().to_dtype(DType::F32)?; // (out, r)
                    let delta = (b.matmul(&a)? * lora.scale())?; // (out, in)
                    let sum = (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
                    Var::from_tensor(&sum)?
                }
                _ => {
                    return Err(Error::Data(format!(
                        "`{module}` has only one of lora_A and lora_B; an adapter needs both"
                    )));
                }
            };
            out.insert(name.clone(), value);
        }
    }
    Ok(merged)
}
