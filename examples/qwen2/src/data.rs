//! Byte-level training data: a text cut into examples at paragraph boundaries, served in
//! right-padded batches with an attention mask and `-100` labels on the padding.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::loss::IGNORE_INDEX;

/// The public-domain text `qwen2 train` uses by default (see `data/README.md`).
pub const BUNDLED_TEXT: &str = include_str!("../data/pride-and-prejudice-ch1.txt");

/// One training batch, right-padded to its longest example.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(b, t)` u32 token ids (padding: 0).
    pub input_ids: Tensor,
    /// `(b, t)` u32, 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `(b, t)` i64: the input ids, `-100` on padding.
    pub labels: Tensor,
    /// Tokens that are not padding.
    pub tokens: usize,
}

/// Examples of at most `seq_len` byte tokens, and a seeded sampler over them.
#[derive(Debug, Clone)]
pub struct ByteDataset {
    examples: Vec<Vec<u32>>,
    rng: u64,
}

impl ByteDataset {
    /// Cuts `text` into paragraphs (blank-line separated), and paragraphs longer than
    /// `seq_len` into pieces of `seq_len` bytes; pieces shorter than 2 bytes are dropped (they
    /// predict nothing).
    ///
    /// # Errors
    /// If a byte is not below `vocab_size` (a byte-level model needs a vocabulary of 256 for
    /// arbitrary text) or nothing is left to train on.
    pub fn new(text: &str, seq_len: usize, vocab_size: usize, seed: u64) -> Result<Self> {
        if seq_len < 2 {
            return Err(Error::Data(format!("--seq-len {seq_len}: use at least 2")));
        }
        if let Some(b) = text.bytes().find(|&b| usize::from(b) >= vocab_size) {
            return Err(Error::Data(format!(
                "the text contains byte {b}, but the model's vocabulary has {vocab_size} \
                 entries: byte-level training needs every byte below vocab_size (use an ASCII \
                 text for a model with vocab_size 128)"
            )));
        }
        let mut examples = Vec::new();
        for para in text.split("\n\n") {
            let para = para.trim();
            for piece in para.as_bytes().chunks(seq_len) {
                if piece.len() >= 2 {
                    examples.push(piece.iter().map(|&b| u32::from(b)).collect());
                }
            }
        }
        if examples.is_empty() {
            return Err(Error::Data("the training text is empty".to_owned()));
        }
        Ok(Self {
            examples,
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        })
    }

    /// Number of examples.
    #[must_use]
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is no example (never, after `new`).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// `batch` examples drawn at random, right-padded to the longest.
    ///
    /// # Errors
    /// If candle cannot build the tensors.
    pub fn sample(&mut self, batch: usize, device: &Device) -> Result<Batch> {
        let picks: Vec<usize> = (0..batch)
            .map(|_| {
                // xorshift64*
                self.rng ^= self.rng >> 12;
                self.rng ^= self.rng << 25;
                self.rng ^= self.rng >> 27;
                let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
                #[allow(clippy::cast_possible_truncation)]
                let i = (r >> 33) as usize % self.examples.len();
                i
            })
            .collect();
        let rows: Vec<&[u32]> = picks.iter().map(|&i| self.examples[i].as_slice()).collect();
        collate(&rows, device)
    }
}

/// Right-pads `rows` into a [`Batch`].
///
/// # Errors
/// If `rows` is empty or candle cannot build the tensors.
pub fn collate(rows: &[&[u32]], device: &Device) -> Result<Batch> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    if t == 0 {
        return Err(Error::Data("an empty batch".to_owned()));
    }
    let b = rows.len();
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    let mut tokens = 0;
    for row in rows {
        for i in 0..t {
            match row.get(i) {
                Some(&id) => {
                    ids.push(id);
                    mask.push(1u32);
                    labels.push(i64::from(id));
                    tokens += 1;
                }
                None => {
                    ids.push(0);
                    mask.push(0);
                    labels.push(IGNORE_INDEX);
                }
            }
        }
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?,
        labels: Tensor::from_vec(labels, (b, t), device)?,
        tokens,
    })
}
