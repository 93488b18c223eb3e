//! Hugging Face checkpoints in, trainable variables out.
//!
//! Reads `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`),
//! memory-mapped,
//! converts f32, bf16 or f16 tensors into the training dtype on the chosen device, and makes
//! every parameter a [`Var`] kept in a [`VarMap`] under its Hugging Face name, so that an
//! optimizer can update it. The model's constructors are the only list of parameters: the loader
//! hands them a [`VarBuilder`] whose backend looks each requested name up, checks its shape,
//! and records every missing or misshapen tensor, so that one run names them all.
//!
//! [`random`] builds the same variables from a seeded N(0, initializer_range) initialisation
//! (ones for norms, zeros for biases), reproducible across machines.
//!
//! [`load_lora`] loads the same checkpoint frozen, with LoRA updates ([`crate::lora`]) that are
//! the only trainable variables: fresh ones, or a PEFT adapter read by [`crate::adapter`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use serde::Deserialize;

use crate::config::Config;
use crate::error::{Error, Result, TensorProblem};
use crate::lora::{LoraConfig, is_lora_name};
use crate::model::Qwen2;

/// A model (by default [`Qwen2`]; any model built by [`load_with`]) and its trainable
/// parameters.
pub struct Loaded<M = Qwen2> {
    /// The model; its weights are the tensors of `params`.
    pub model: M,
    /// The validated configuration.
    pub config: Config,
    /// Every base parameter under its Hugging Face name (save it with `VarMap::save`). With
    /// LoRA these are frozen: the model reads them as constants and they get no gradient.
    pub varmap: VarMap,
    /// The trainable parameters, in the order the model requested them: every base parameter,
    /// or with LoRA only the `lora_A`/`lora_B` matrices (`model.layers.N.….lora_A.weight`).
    pub params: Vec<(String, Var)>,
    /// The LoRA configuration the model was built with.
    pub lora: Option<LoraConfig>,
    /// Tensors in the files that the model did not use (e.g. `lm_head.weight` of a tied model).
    pub unused: Vec<String>,
    /// The dtype of the checkpoint's floating-point weights (the first float tensor's, by
    /// name); `None` for a random initialisation. A model trained in another dtype is saved
    /// back in this one.
    pub file_dtype: Option<DType>,
}

impl<M> std::fmt::Debug for Loaded<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.params.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Loaded")
            .field("config", &self.config)
            .field("params", &names)
            .field("unused", &self.unused)
            .finish_non_exhaustive()
    }
}

/// Loads the checkpoint in `dir` into trainable variables of `dtype` on `device`.
///
/// # Errors
/// [`Error::Config`] naming a key this implementation does not support, [`Error::Tensors`]
/// listing every missing or misshapen tensor, [`Error::Io`] / [`Error::Json`] for unreadable
/// files, [`Error::Data`] for a sharded index that names a tensor its shard lacks.
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    load_with(dir, dtype, device, Qwen2::new)
}

/// As [`load`], for a model that `new` builds from the checkpoint's Qwen2 configuration (a
/// variant whose `config.json` adds keys, read by the caller) and a [`VarBuilder`] over its
/// tensors: same files, names, checks and errors.
///
/// # Errors
/// As [`load`].
pub fn load_with<M>(
    dir: &Path,
    dtype: DType,
    device: &Device,
    new: impl FnOnce(&Config, &VarBuilder<'_>) -> candle_core::Result<M>,
) -> Result<Loaded<M>> {
    let config = Config::from_file(&dir.join("config.json"))?;
    let (tensors, sources) = read_weights(dir)?;
    build(
        config,
        Source::Files { tensors, sources },
        None,
        dir,
        dtype,
        device,
        new,
    )
}

/// LoRA matrices for [`load_lora`]: fresh, or read from an adapter.
#[derive(Debug, Clone)]
pub enum LoraInit {
    /// `A` Kaiming-uniform from `LoraConfig::seed`, `B` zero.
    Fresh,
    /// These tensors, under the model's names (`model.layers.N.self_attn.q_proj.lora_A.weight`),
    /// read from `file` (named in errors); see [`crate::adapter::load`].
    Tensors {
        /// The adapter's weights file.
        file: PathBuf,
        /// The matrices.
        tensors: HashMap<String, Tensor>,
    },
}

/// Loads the checkpoint in `dir` frozen, with the LoRA updates of `lora` as the only trainable
/// parameters ([`Loaded::params`]), initialised by `init`.
///
/// # Errors
/// As [`load`]; [`Error::Adapter`] naming the adapter file and every LoRA matrix it lacks, has
/// misshapen, or has for a projection the configuration does not adapt.
pub fn load_lora(
    dir: &Path,
    lora: &LoraConfig,
    init: LoraInit,
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    let config = Config::from_file(&dir.join("config.json"))?;
    let (tensors, sources) = read_weights(dir)?;
    build(
        config,
        Source::Files { tensors, sources },
        Some((lora.clone(), init)),
        dir,
        dtype,
        device,
        |cfg, vb| Qwen2::with_lora(cfg, Some(lora), vb),
    )
}

/// [`random`] with fresh LoRA updates: a frozen random base (seed `seed`), `A` from
/// `lora.seed`.
///
/// # Errors
/// If candle cannot allocate the parameters.
pub fn random_lora(
    config: &Config,
    seed: u64,
    lora: &LoraConfig,
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    build(
        config.clone(),
        Source::Random { seed },
        Some((lora.clone(), LoraInit::Fresh)),
        Path::new("<random init>"),
        dtype,
        device,
        |cfg, vb| Qwen2::with_lora(cfg, Some(lora), vb),
    )
}

/// A randomly initialised model (seeded, deterministic on every machine).
///
/// # Errors
/// If candle cannot allocate the parameters.
pub fn random(config: &Config, seed: u64, dtype: DType, device: &Device) -> Result<Loaded> {
    random_with(config, seed, dtype, device, Qwen2::new)
}

/// As [`random`], for a model that `new` builds (see [`load_with`]).
///
/// # Errors
/// If candle cannot allocate the parameters.
pub fn random_with<M>(
    config: &Config,
    seed: u64,
    dtype: DType,
    device: &Device,
    new: impl FnOnce(&Config, &VarBuilder<'_>) -> candle_core::Result<M>,
) -> Result<Loaded<M>> {
    build(
        config.clone(),
        Source::Random { seed },
        None,
        Path::new("<random init>"),
        dtype,
        device,
        new,
    )
}

fn build<M>(
    config: Config,
    source: Source,
    lora: Option<(LoraConfig, LoraInit)>,
    dir: &Path,
    dtype: DType,
    device: &Device,
    new: impl FnOnce(&Config, &VarBuilder<'_>) -> candle_core::Result<M>,
) -> Result<Loaded<M>> {
    let state = Arc::new(Mutex::new(State {
        layers: config.num_hidden_layers,
        ..State::default()
    }));
    let lora_config = lora.as_ref().map(|(c, _)| c.clone());
    let backend = Backend {
        source,
        lora,
        varmap: VarMap::new(),
        state: Arc::clone(&state),
        tied: config.tie_word_embeddings,
    };
    let varmap = backend.varmap.clone();
    let (file_names, file_dtype): (Vec<String>, Option<DType>) = match &backend.source {
        Source::Files { tensors, .. } => {
            let mut names: Vec<&String> = tensors.keys().collect();
            names.sort();
            let dtype = names
                .iter()
                .filter_map(|n| tensors.get(*n))
                .map(Tensor::dtype)
                .find(|d| d.is_float());
            (tensors.keys().cloned().collect(), dtype)
        }
        Source::Random { .. } => (Vec::new(), None),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let built = new(&config, &vb);
    drop(vb);
    let state = std::mem::take(&mut *state.lock().unwrap_or_else(PoisonError::into_inner));
    if let Some(err) = state.adapter_error(&lora_config) {
        return Err(err);
    }
    if !state.problems.is_empty() {
        return Err(Error::Tensors {
            dir: dir.to_owned(),
            problems: state.problems,
        });
    }
    let model = built?;
    let used: HashSet<&str> = state.used.iter().map(String::as_str).collect();
    let mut unused: Vec<String> = file_names
        .into_iter()
        .filter(|n| !used.contains(n.as_str()))
        .collect();
    unused.sort();
    Ok(Loaded {
        model,
        config,
        varmap,
        params: state.params,
        lora: lora_config,
        unused,
        file_dtype,
    })
}

/// Reads every tensor of the checkpoint (in its file dtype, on the CPU), with the file each
/// came from.
fn read_weights(dir: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, PathBuf>)> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let mut tensors = HashMap::new();
    let mut sources = HashMap::new();
    if single.is_file() {
        for (name, t) in read_safetensors(&single)? {
            sources.insert(name.clone(), single.clone());
            tensors.insert(name, t);
        }
    } else if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let parsed: Index = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: index.clone(),
            source,
        })?;
        let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, file) in &parsed.weight_map {
            by_file.entry(file).or_default().push(name);
        }
        for (file, names) in by_file {
            let path = dir.join(file);
            let mut shard = read_safetensors(&path)?;
            for name in names {
                let t = shard.remove(name).ok_or_else(|| {
                    Error::Data(format!(
                        "{} maps `{name}` to {file}, which has no such tensor: the index and \
                         its shards disagree (re-download the checkpoint)",
                        index.display()
                    ))
                })?;
                sources.insert(name.to_owned(), path.clone());
                tensors.insert(name.to_owned(), t);
            }
        }
    } else {
        return Err(Error::Data(format!(
            "{} has neither model.safetensors nor model.safetensors.index.json: point --model at \
             a Hugging Face checkpoint directory",
            dir.display()
        )));
    }
    Ok((tensors, sources))
}

fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let unreadable = |e: candle_core::Error| {
        Error::Data(format!(
            "{}: not a readable safetensors file: {e}",
            path.display()
        ))
    };
    // SAFETY: the file is mapped read-only and only read while `file` lives (each tensor is
    // copied out of the mapping below); the mapping's contents are undefined only if another
    // process truncates or rewrites the checkpoint during these reads, which the CLI documents
    // as unsupported (`save` never rewrites in place: it renames a new file over the old one,
    // which leaves this mapping on the old inode).
    let file =
        unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(unreadable)?;
    // Copied out one tensor at a time: the peak is the tensors, not the file read into memory
    // beside them (as `safetensors::load` does).
    file.tensors()
        .into_iter()
        .map(|(name, _)| {
            let t = file.load(&name, &Device::Cpu).map_err(unreadable)?;
            Ok((name, t))
        })
        .collect()
}

enum Source {
    Files {
        tensors: HashMap<String, Tensor>,
        sources: HashMap<String, PathBuf>,
    },
    Random {
        seed: u64,
    },
}

#[derive(Default)]
struct State {
    /// Trainable: every base parameter, or only the LoRA matrices.
    params: Vec<(String, Var)>,
    /// Names of the base tensors the model requested.
    used: Vec<String>,
    problems: Vec<TensorProblem>,
    /// Problems with the LoRA matrices of an adapter, and its file.
    adapter_problems: Vec<String>,
    adapter_file: Option<PathBuf>,
    /// Names of the adapter's matrices the model requested.
    adapter_used: HashSet<String>,
    /// Every matrix the adapter holds.
    adapter_names: Vec<String>,
    /// Decoder layers of the model (for messages).
    layers: usize,
}

impl State {
    /// Everything wrong with the adapter at once: missing, misshapen and unused matrices.
    fn adapter_error(&self, lora: &Option<LoraConfig>) -> Option<Error> {
        let file = self.adapter_file.as_ref()?;
        let mut problems = self.adapter_problems.clone();
        let mut unused: Vec<&String> = self
            .adapter_names
            .iter()
            .filter(|n| !self.adapter_used.contains(*n))
            .collect();
        unused.sort();
        let targets = lora
            .as_ref()
            .map(|l| {
                l.targets
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        problems.extend(unused.into_iter().map(|n| {
            format!(
                "tensor `{}{n}`: the model has no such adapted projection (targets {targets}, \
                 {} layers); the adapter was made for another model or target_modules",
                crate::adapter::PEFT_PREFIX,
                self.layers,
            )
        }));
        if problems.is_empty() {
            return None;
        }
        Some(Error::Adapter {
            path: file.clone(),
            message: format!(
                "does not match the model:\n{}",
                problems
                    .iter()
                    .map(|p| format!("  - {p}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        })
    }
}

/// The `VarBuilder` backend: every tensor the model asks for becomes a `Var` in the `VarMap`.
struct Backend {
    source: Source,
    /// With LoRA, base tensors are handed to the model as constants.
    lora: Option<(LoraConfig, LoraInit)>,
    varmap: VarMap,
    state: Arc<Mutex<State>>,
    tied: bool,
}

impl Backend {
    fn value(
        &self,
        shape: &Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Option<Tensor>> {
        match &self.source {
            Source::Random { seed } => Ok(Some(init_tensor(shape, name, init, *seed, dtype, dev)?)),
            Source::Files { tensors, sources } => {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(t) = tensors.get(name) else {
                    let hint = if name == "lm_head.weight" && !self.tied {
                        "the config says tie_word_embeddings: false; if the head shares the \
                         embedding, set it to true"
                            .to_owned()
                    } else {
                        "the config implies it; check num_hidden_layers and that this is a \
                         Qwen2 checkpoint"
                            .to_owned()
                    };
                    state.problems.push(TensorProblem::Missing {
                        name: name.to_owned(),
                        hint,
                    });
                    return Ok(None);
                };
                if t.shape() != shape {
                    state.problems.push(TensorProblem::Shape {
                        name: name.to_owned(),
                        expected: shape.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                    return Ok(None);
                }
                if !t.dtype().is_float() {
                    let file = sources.get(name).map(|p| p.display().to_string());
                    candle_core::bail!(
                        "tensor `{name}` in {} is {:?}, not a float tensor",
                        file.unwrap_or_default(),
                        t.dtype()
                    );
                }
                Ok(Some(t.to_dtype(dtype)?.to_device(dev)?))
            }
        }
    }
}

impl Backend {
    /// A trainable LoRA matrix: from the adapter, or drawn from `init` with the LoRA seed.
    fn lora_matrix(
        &self,
        shape: &Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some((lora, source)) = &self.lora else {
            candle_core::bail!("`{name}`: a LoRA matrix was requested without a LoRA configuration")
        };
        let value = match source {
            LoraInit::Fresh => init_tensor(shape, name, init, lora.seed, dtype, dev)?,
            LoraInit::Tensors { file, tensors } => {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                if state.adapter_file.is_none() {
                    state.adapter_file = Some(file.clone());
                    state.adapter_names = tensors.keys().cloned().collect();
                }
                state.adapter_used.insert(name.to_owned());
                let peft = format!("{}{name}", crate::adapter::PEFT_PREFIX);
                match tensors.get(name) {
                    None => {
                        state.adapter_problems.push(format!(
                            "missing tensor `{peft}`: target_modules adapts this projection; \
                             the adapter was made for another model, or its file is incomplete"
                        ));
                        return Tensor::zeros(shape, dtype, dev);
                    }
                    Some(t) if t.shape() != shape => {
                        state.adapter_problems.push(format!(
                            "tensor `{peft}` has shape {:?}, r {} and the model imply {:?}: \
                             check r in adapter_config.json (and --lora-r), and that the \
                             adapter was made for this model",
                            t.dims(),
                            lora.r,
                            shape.dims()
                        ));
                        return Tensor::zeros(shape, dtype, dev);
                    }
                    Some(t) if !t.dtype().is_float() => {
                        candle_core::bail!(
                            "tensor `{peft}` in {} is {:?}, not a float tensor",
                            file.display(),
                            t.dtype()
                        )
                    }
                    Some(t) => t.to_dtype(dtype)?.to_device(dev)?,
                }
            }
        };
        let var = Var::from_tensor(&value)?;
        let tensor = var.as_tensor().clone();
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .params
            .push((name.to_owned(), var));
        Ok(tensor)
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if is_lora_name(name) {
            return self.lora_matrix(&shape, name, init, dtype, dev);
        }
        let Some(value) = self.value(&shape, name, init, dtype, dev)? else {
            // Recorded as a problem; a placeholder lets construction go on to find the others.
            return Tensor::zeros(shape, dtype, dev);
        };
        let var = Var::from_tensor(&value)?;
        self.varmap
            .data()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), var.clone());
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.used.push(name.to_owned());
        if self.lora.is_some() {
            // Frozen: the model reads a constant that shares the Var's storage, so no gradient
            // reaches the base (and no optimizer sees it).
            return Ok(var.as_tensor().detach());
        }
        let tensor = var.as_tensor().clone();
        state.params.push((name.to_owned(), var));
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("the Qwen2 loader needs the shape of `{name}`; use `VarBuilder::get`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.source {
            Source::Files { tensors, .. } => tensors.contains_key(name),
            Source::Random { .. } => true,
        }
    }
}

/// A tensor drawn from `init` with a generator seeded by `seed` and `name`, so that every
/// parameter is the same on every machine whatever order the model builds them in.
fn init_tensor(
    shape: &Shape,
    name: &str,
    init: Init,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let n = shape.elem_count();
    let mut rng = SplitMix64(seed ^ fnv1a(name));
    #[allow(clippy::cast_possible_truncation)]
    let values: Vec<f32> = match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| (mean + stdev * rng.normal()) as f32)
            .collect(),
        Init::Uniform { lo, up } => (0..n)
            .map(|_| (lo + (up - lo) * rng.uniform()) as f32)
            .collect(),
        Init::Kaiming { .. } => {
            candle_core::bail!("`{name}`: Kaiming initialisation is not used by this model")
        }
    };
    Tensor::from_vec(values, shape.clone(), dev)?.to_dtype(dtype)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A tiny, portable generator (splitmix64) with Box–Muller normals.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let u = ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        u
    }

    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}
