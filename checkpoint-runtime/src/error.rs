//! The runtime's error type. Every variant names what failed, where, and what to do about it.

use std::path::PathBuf;

use crate::policy::Mode;

/// The result type of the engine's public API.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors raised by checkpointing engines.
///
/// Converts into [`candle_core::Error`] so that `?` works inside model code that returns candle's
/// result type. That conversion keeps the message (layer, mode, fix) but not the variant: match
/// on the variant where the engine's own methods return it, such as
/// [`Checkpointer::backward`](crate::Checkpointer::backward).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A candle operation failed outside any layer.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A layer failed while the engine ran it.
    #[error("{layer} failed during {phase} (mode {mode}): {source}")]
    Layer {
        /// The layer: its position in the stack, type and method.
        layer: String,
        /// `forward`, `recompute`, or `probe` (a budget policy measuring the layer on its first
        /// step).
        phase: &'static str,
        /// The engine's mode for that layer.
        mode: Mode,
        /// What went wrong (boxed: it is large, and errors travel in every result).
        source: Box<candle_core::Error>,
    },

    /// A second backward pass reached a checkpointed stack whose boundaries the first one released.
    #[error(
        "backward ran twice through the checkpointed stack starting at {layer} (mode {mode}): its \
         boundaries were released by the first backward. Run the forward pass again before \
         another backward"
    )]
    BackwardTwice {
        /// The first layer of the stack.
        layer: String,
        /// The mode that stack was run in.
        mode: Mode,
    },

    /// A stack's output reaches the loss through a keyword argument of another checkpointed
    /// stack that has more than one segment: each segment's backward would need it again.
    #[error(
        "the checkpointed stack starting at {layer} (mode {mode}) feeds a keyword argument of \
         another checkpointed stack, whose segments each run their own backward; the first one \
         already consumed this stack's boundaries. Fix: run one of the two stacks with \
         Mode::None, or keep the other stack in a single segment (Policy::segments(len))"
    )]
    StackInKeywordArgument {
        /// The first layer of the stack whose output is a keyword argument.
        layer: String,
        /// The mode that stack was run in.
        mode: Mode,
    },

    /// Recomputation produced parameter gradients that nobody collected. Stacks refuse to run
    /// their backward outside [`Checkpointer::backward`](crate::Checkpointer::backward)
    /// ([`Error::BackwardOutsideEngine`]), so this guards an invariant rather than a misuse.
    #[error(
        "{count} parameter gradient(s) computed while recomputing checkpointed layers were never \
         collected (mode {mode}): the last backward pass was run with `loss.backward()`, which \
         cannot see them. Call `Checkpointer::backward(&loss)` instead; it merges them into the \
         gradient store it returns"
    )]
    UncollectedGradients {
        /// How many parameter gradients were left behind.
        count: usize,
        /// The engine's mode.
        mode: Mode,
    },

    /// A boundary file could not be written or read.
    #[error("{layer}: cannot {action} `{path}` (mode offload-disk): {source}. Fix: {hint}")]
    Disk {
        /// The layer whose boundary it is.
        layer: String,
        /// The file or directory.
        path: PathBuf,
        /// What the engine was doing.
        action: &'static str,
        /// What to do about it.
        hint: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },

    /// A boundary file changed between forward and backward.
    #[error(
        "{layer}: boundary file `{path}` is corrupt (mode offload-disk): {detail}. Something \
         modified it between forward and backward; run the step again"
    )]
    CorruptBoundary {
        /// The layer whose boundary it is.
        layer: String,
        /// The file.
        path: PathBuf,
        /// What did not match.
        detail: String,
    },

    /// A boundary could not be copied between a GPU and pinned host memory.
    #[error(
        "{layer}: cannot {action} (mode offload-host): {source}. Fix: if pinned host memory is \
         exhausted, offload fewer layers to the host (Policy::keep_last, Policy::budget) or use \
         offload-disk"
    )]
    HostTransfer {
        /// The layer whose boundary it is.
        layer: String,
        /// What the engine was doing.
        action: &'static str,
        /// The driver's error (boxed: it is large, and errors travel in every result).
        source: Box<candle_core::Error>,
    },

    /// A policy or configuration that cannot be run.
    #[error("invalid checkpoint configuration: {0}")]
    Config(String),

    /// A checkpointed stack's backward ran outside [`Checkpointer::backward`] of its engine
    /// (a plain `loss.backward()`, or candle-nn's `Optimizer::backward_step`), where its
    /// parameter gradients could reach no gradient store. Refused before anything is
    /// recomputed, so the graph can still go through the engine.
    ///
    /// [`Checkpointer::backward`]: crate::Checkpointer::backward
    #[error(
        "the checkpointed stack starting at {layer} (mode {mode}) ran backward outside \
         `Checkpointer::backward` of its engine: `loss.backward()` and candle-nn's \
         `opt.backward_step(&loss)` cannot see the gradients of checkpointed weights, and the \
         optimizer would silently skip them. Fix: `ckpt.backward_step(&mut opt, &loss)`, or \
         `let grads = ckpt.backward(&loss)?; opt.step(&grads)`, with `ckpt` the engine that ran \
         the stack (every stack behind one loss must run through that one engine)"
    )]
    BackwardOutsideEngine {
        /// The first layer of the stack.
        layer: String,
        /// The mode that stack was run in.
        mode: Mode,
    },

    /// [`Checkpointer::backward`] was called while another one was running on the same engine.
    ///
    /// [`Checkpointer::backward`]: crate::Checkpointer::backward
    #[error(
        "`Checkpointer::backward` was called while another backward of the same engine (mode \
         {mode}) was running {where_}: one engine collects the gradients of one backward at a \
         time, and the two would mix. Fix: run the steps one after the other, or give each \
         training loop its own `Checkpointer`"
    )]
    ConcurrentBackward {
        /// The engine's mode.
        mode: Mode,
        /// `on another thread`, or `on this thread (from inside a layer)`.
        where_: &'static str,
    },

    /// A [`GradientAudit`](crate::GradientAudit) found trainable variables without a gradient.
    #[error("{0}")]
    IncompleteGradients(Box<crate::audit::GradientAudit>),

    // Randomness and the recomputation check.
    /// A layer drew randomness through [`rng`](crate::rng) with nothing to draw from: no engine
    /// is running it and no [`Rng::scope`](crate::rng::Rng::scope) encloses it.
    #[error(
        "checkpoint_runtime::rng::{what} was called outside any engine invocation and any \
         `Rng::scope`, so nothing decides what it draws. Run the layer through a Checkpointer \
         (Mode::None included), or wrap the plain call in `Rng::new(seed).scope(|| ...)`"
    )]
    NoRandomSource {
        /// The helper that drew.
        what: &'static str,
    },

    /// A dropout probability outside `[0, 1)`.
    #[error(
        "dropout probability {p} is not in [0, 1): pass the probability of zeroing an element \
         (0.1 zeroes 10%), or 0 for no dropout"
    )]
    InvalidDropout {
        /// The probability given.
        p: f32,
    },

    /// A recomputed layer output differs from the forward's.
    #[error(
        "{layer}, in {invocation}, recomputed a different output than in the forward pass \
         (mode {mode}): {detail}. A checkpointed layer must be a deterministic function of its \
         carry, its keyword arguments and its weights: draw randomness through \
         checkpoint_runtime::rng (not candle_nn::ops::dropout or Tensor::rand), and keep \
         counters and caches out of its forward"
    )]
    RecomputeMismatch {
        /// The layer whose output differs: its position in the stack, type and method.
        layer: String,
        /// Which run of the stack: the engine's count of stacks when it ran.
        invocation: String,
        /// The mode of the stack.
        mode: Mode,
        /// What differs, forward against recomputation.
        detail: String,
    },
}

impl From<Error> for candle_core::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Candle(inner) => inner,
            other => candle_core::Error::wrap(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    /// Errors travel in every `Result` of the engine and of the code that calls it: keep them
    /// under 128 bytes, where clippy's `result_large_err` starts to flag every function
    /// returning them, in the caller's crate too.
    #[test]
    fn the_error_stays_small() {
        let size = std::mem::size_of::<Error>();
        assert!(size < 128, "{size}");
    }
}
