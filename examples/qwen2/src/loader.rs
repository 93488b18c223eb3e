//! Hugging Face checkpoints in, trainable variables out.
//!
//! Reads `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`),
//! converts f32, bf16 or f16 tensors into the training dtype on the chosen device, and makes
//! every parameter a [`Var`] kept in a [`VarMap`] under its Hugging Face name, so that an
//! optimizer can update it. The model's constructors are the only list of parameters: the loader
//! hands them a [`VarBuilder`] whose backend looks each requested name up, checks its shape,
//! and records every missing or misshapen tensor, so that one run names them all.
//!
//! [`random`] builds the same variables from a seeded N(0, initializer_range) initialisation
//! (ones for norms, zeros for biases), reproducible across machines.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use serde::Deserialize;

use crate::config::Config;
use crate::error::{Error, Result, TensorProblem};
use crate::model::Qwen2;

/// A model (by default [`Qwen2`]; any model built by [`load_with`]) and its trainable
/// parameters.
pub struct Loaded<M = Qwen2> {
    /// The model; its weights are the tensors of `params`.
    pub model: M,
    /// The validated configuration.
    pub config: Config,
    /// Every parameter under its Hugging Face name (save it with `VarMap::save`).
    pub varmap: VarMap,
    /// The same parameters, in the order the model requested them.
    pub params: Vec<(String, Var)>,
    /// Tensors in the files that the model did not use (e.g. `lm_head.weight` of a tied model).
    pub unused: Vec<String>,
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
        dir,
        dtype,
        device,
        new,
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
        Path::new("<random init>"),
        dtype,
        device,
        new,
    )
}

fn build<M>(
    config: Config,
    source: Source,
    dir: &Path,
    dtype: DType,
    device: &Device,
    new: impl FnOnce(&Config, &VarBuilder<'_>) -> candle_core::Result<M>,
) -> Result<Loaded<M>> {
    let state = Arc::new(Mutex::new(State::default()));
    let backend = Backend {
        source,
        varmap: VarMap::new(),
        state: Arc::clone(&state),
        tied: config.tie_word_embeddings,
    };
    let varmap = backend.varmap.clone();
    let file_names: Vec<String> = match &backend.source {
        Source::Files { tensors, .. } => tensors.keys().cloned().collect(),
        Source::Random { .. } => Vec::new(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let built = new(&config, &vb);
    drop(vb);
    let state = std::mem::take(&mut *state.lock().unwrap_or_else(PoisonError::into_inner));
    if !state.problems.is_empty() {
        return Err(Error::Tensors {
            dir: dir.to_owned(),
            problems: state.problems,
        });
    }
    let model = built?;
    let used: HashSet<&str> = state.params.iter().map(|(n, _)| n.as_str()).collect();
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
        unused,
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
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::Data(format!(
            "{}: not a readable safetensors file: {e}",
            path.display()
        ))
    })
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
    params: Vec<(String, Var)>,
    problems: Vec<TensorProblem>,
}

/// The `VarBuilder` backend: every tensor the model asks for becomes a `Var` in the `VarMap`.
struct Backend {
    source: Source,
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

impl SimpleBackend for Backend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
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
        let tensor = var.as_tensor().clone();
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .params
            .push((name.to_owned(), var));
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
