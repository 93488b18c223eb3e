//! The errors of the library's fallible entry points (config, loader, data, training,
//! verification). Model code itself returns candle's `Result`.

use std::path::PathBuf;

/// The result type of the loader, trainer and verifier.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong, naming the file, key or tensor involved and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },

    /// A file of a checkpoint being saved could not be written.
    #[error(
        "cannot write {}: {source}. Fix: point --save at a writable directory with free space",
        path.display()
    )]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },

    /// A JSON file is malformed or lacks a required key.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// serde's message (it names the key and the line).
        source: serde_json::Error,
    },

    /// A configuration key holds a value this implementation does not support.
    #[error("config key `{key}`: {message}")]
    Config {
        /// The key, dotted for nested keys (`rope_parameters.rope_type`).
        key: String,
        /// Why, and what to do.
        message: String,
    },

    /// The checkpoint's tensors do not match what the config describes.
    #[error("{} does not match its config:\n{}", dir.display(), list(problems))]
    Tensors {
        /// The checkpoint directory.
        dir: PathBuf,
        /// One entry per missing or misshapen tensor.
        problems: Vec<TensorProblem>,
    },

    /// A training or verification input is unusable.
    #[error("{0}")]
    Data(String),

    /// `verify` found a tensor further from the reference than its tolerance.
    #[error(
        "verification failed: {count} tensor(s) above tolerance; worst `{worst}` with relative \
         error {rel_err:.3e} (tolerance {tolerance:.0e})"
    )]
    Verify {
        /// How many tensors failed.
        count: usize,
        /// The tensor with the largest error relative to its tolerance.
        worst: String,
        /// Its relative error.
        rel_err: f64,
        /// Its tolerance.
        tolerance: f64,
    },

    /// `--model DIR` has no `tokenizer.json`, and `--bytes` was not given.
    #[error(
        "{} has no tokenizer.json: the checkpoint's token ids are its tokenizer's, so training it \
         on raw bytes would teach it nonsense. Fix: put the checkpoint's tokenizer.json in the \
         directory, or pass --bytes to train on byte ids anyway",
        dir.display()
    )]
    MissingTokenizer {
        /// The checkpoint directory.
        dir: PathBuf,
    },

    /// A tokenizer file is unusable, or does not fit the model.
    #[error("{}: {message}", path.display())]
    Tokenizer {
        /// `tokenizer.json` or `tokenizer_config.json`.
        path: PathBuf,
        /// What is wrong, and what to do.
        message: String,
    },

    /// The checkpoint's chat template cannot be compiled or rendered.
    #[error("the chat_template of {}: {message}", path.display())]
    ChatTemplate {
        /// The `tokenizer_config.json` that holds the template.
        path: PathBuf,
        /// The template engine's message (it names the template line), and what to do.
        message: String,
    },

    /// A PEFT LoRA adapter directory is unusable, or does not fit the model.
    #[error("{}: {message}", path.display())]
    Adapter {
        /// `adapter_config.json` or `adapter_model.safetensors`.
        path: PathBuf,
        /// What is wrong (naming the key or tensor), and what to do.
        message: String,
    },

    /// One line of a JSONL data file is unusable.
    #[error("{}, line {line}: {message}", path.display())]
    DataLine {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line, and what the line should hold.
        message: String,
    },

    /// The checkpointing engine failed (it names the layer and the mode).
    #[error(transparent)]
    Checkpoint(Box<checkpoint_runtime::Error>),

    /// A candle operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// One tensor that the loader could not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorProblem {
    /// The config needs the tensor, no file has it.
    Missing {
        /// Hugging Face name.
        name: String,
        /// What to check.
        hint: String,
    },
    /// The tensor's shape differs from the one the config implies.
    Shape {
        /// Hugging Face name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
}

impl std::fmt::Display for TensorProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TensorProblem::Missing { name, hint } => write!(f, "missing tensor `{name}` ({hint})"),
            TensorProblem::Shape {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor `{name}` has shape {found:?}, the config implies {expected:?} \
                 (check hidden_size, intermediate_size, num_attention_heads, \
                 num_key_value_heads, head_dim and vocab_size)"
            ),
        }
    }
}

fn list(problems: &[TensorProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl From<checkpoint_runtime::Error> for Error {
    fn from(err: checkpoint_runtime::Error) -> Self {
        Error::Checkpoint(Box::new(err))
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Write {
            path: path.into(),
            source,
        }
    }

    /// [`Error::Config`] for `key`, with why and what to do.
    pub fn config(key: &str, message: impl Into<String>) -> Self {
        Error::Config {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}
