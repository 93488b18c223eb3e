//! Text to token ids: a checkpoint's Hugging Face tokenizer (`tokenizer.json`, through the
//! `tokenizers` crate), or bytes as ids for the random-init byte-level model.
//!
//! Plain text is encoded as `tokenizer(text)` encodes it in transformers (special tokens the
//! tokenizer adds, such as a BOS, included; Qwen2 adds none); special tokens written in the
//! text (`<|im_start|>`) become their single ids.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The tokenizer file of a Hugging Face checkpoint directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Turns text into the token ids a model was trained on.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// Every byte is its own id (0..256).
    Bytes,
    /// A Hugging Face tokenizer, read from `path`.
    Hf {
        inner: Box<tokenizers::Tokenizer>,
        path: PathBuf,
        /// Ids of the added tokens marked `special` (`<|im_end|>`, `<|endoftext|>`).
        special: HashSet<u32>,
    },
}

/// Token ids with the byte range of the text each came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The ids.
    pub ids: Vec<u32>,
    /// `offsets[i]`: the bytes of the text that produced `ids[i]`.
    pub offsets: Vec<Range<usize>>,
}

impl Tokenizer {
    /// Bytes as token ids: the tokenizer of the random-init model (and of `--bytes`).
    #[must_use]
    pub fn bytes() -> Self {
        Self { kind: Kind::Bytes }
    }

    /// The tokenizer of the checkpoint in `dir` (its `tokenizer.json`).
    ///
    /// # Errors
    /// [`Error::MissingTokenizer`] if `dir` has no `tokenizer.json` (a checkpoint's ids are
    /// its tokenizer's, so no silent fallback to bytes); [`Error::Tokenizer`] if the file
    /// cannot be read as a tokenizer.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            return Err(Error::MissingTokenizer {
                dir: dir.to_path_buf(),
            });
        }
        Self::from_file(&path)
    }

    /// The Hugging Face tokenizer in `path` (a `tokenizer.json`).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::Tokenizer`] if it is not a
    /// tokenizer the `tokenizers` crate understands.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: format!(
                "not a tokenizer the `tokenizers` crate can load ({e}); save it again with a \
                 recent transformers (`tokenizer.save_pretrained`)"
            ),
        })?;
        let special = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        Ok(Self {
            kind: Kind::Hf {
                inner: Box::new(inner),
                path: path.to_path_buf(),
                special,
            },
        })
    }

    /// Whether this is the byte-level tokenizer.
    #[must_use]
    pub fn is_bytes(&self) -> bool {
        matches!(self.kind, Kind::Bytes)
    }

    /// The file it was read from (`None` for bytes).
    #[must_use]
    pub fn path(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Bytes => None,
            Kind::Hf { path, .. } => Some(path),
        }
    }

    /// Whether `id` is a special added token (an end-of-turn or end-of-text marker).
    #[must_use]
    pub fn is_special(&self, id: u32) -> bool {
        match &self.kind {
            Kind::Bytes => false,
            Kind::Hf { special, .. } => special.contains(&id),
        }
    }

    /// The id of `token` as a whole (an added token such as `<|im_end|>`), if it has one.
    #[must_use]
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.kind {
            Kind::Bytes => None,
            Kind::Hf { inner, .. } => inner.token_to_id(token),
        }
    }

    /// Checks that every id the tokenizer can produce is a row of the model's embedding.
    /// (Bytes are checked per text, in [`encode`](Self::encode)'s callers: an ASCII text fits
    /// a vocabulary of 128.)
    ///
    /// # Errors
    /// [`Error::Tokenizer`] naming both sizes: the tokenizer belongs to another model.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        let Kind::Hf { inner, path, .. } = &self.kind else {
            return Ok(());
        };
        let largest = inner.get_vocab(true).into_values().max().unwrap_or(0);
        if !usize::try_from(largest).is_ok_and(|id| id < vocab_size) {
            return Err(Error::Tokenizer {
                path: path.clone(),
                message: format!(
                    "it produces ids up to {largest}, but the model's vocab_size is \
                     {vocab_size}: this tokenizer belongs to another model; use the one saved \
                     with the checkpoint"
                ),
            });
        }
        Ok(())
    }

    /// The ids of `text`.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the Hugging Face tokenizer fails on the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Kind::Hf { .. } => Ok(self.encode_with_offsets(text, true)?.ids),
        }
    }

    /// The ids of `text` and the byte range each came from. `add_special_tokens`: whether the
    /// tokenizer's post-processor may add its own specials (a BOS); a rendered chat template
    /// already holds them, as in transformers' `apply_chat_template`.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the Hugging Face tokenizer fails on the text.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<Encoded> {
        match &self.kind {
            Kind::Bytes => Ok(Encoded {
                ids: text.bytes().map(u32::from).collect(),
                offsets: (0..text.len()).map(|i| i..i + 1).collect(),
            }),
            Kind::Hf { inner, path, .. } => {
                let encoding =
                    inner
                        .encode(text, add_special_tokens)
                        .map_err(|e| Error::Tokenizer {
                            path: path.clone(),
                            message: format!("cannot encode a text of {} bytes: {e}", text.len()),
                        })?;
                Ok(Encoded {
                    ids: encoding.get_ids().to_vec(),
                    offsets: encoding.get_offsets().iter().map(|&(a, b)| a..b).collect(),
                })
            }
        }
    }
}
