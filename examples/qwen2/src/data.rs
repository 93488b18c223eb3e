//! Training data: a plain text or a JSONL file turned into token examples with labels, laid
//! out to `--seq-len` (long examples truncated, or everything packed into full rows), split
//! into training and evaluation examples, and served in right-padded batches with an attention
//! mask and `-100` labels on padding (and on the tokens the loss does not count).
//!
//! Formats:
//! - plain text (any file not ending in `.jsonl`): cut at blank lines into paragraphs, and
//!   paragraphs longer than `seq_len` tokens into pieces of `seq_len`; every token is a label;
//! - JSONL, one example per line: `{"text": "..."}` (every token a label) or
//!   `{"messages": [{"role": "user", "content": "..."}, ...]}`, rendered with the checkpoint's
//!   chat template and labelled on the assistant's tokens only (see [`crate::chat`]).

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::chat::{ASSISTANT, ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::loss::IGNORE_INDEX;
use crate::tokenizer::Tokenizer;

/// The public-domain text `qwen2 train` uses by default (see `data/README.md`).
pub const BUNDLED_TEXT: &str = include_str!("../data/pride-and-prejudice-ch1.txt");

/// One training batch, right-padded to its longest example.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(b, t)` u32 token ids (padding: 0).
    pub input_ids: Tensor,
    /// `(b, t)` u32, 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `(b, t)` i64: the token ids where the loss counts them, `-100` elsewhere (padding,
    /// and the non-assistant tokens of chat examples).
    pub labels: Tensor,
    /// Tokens that are not padding.
    pub tokens: usize,
    /// Positions the loss predicts: labels other than `-100`, the first of each row excepted
    /// (position `i` predicts label `i + 1`).
    pub targets: usize,
}

/// One example: token ids and, per token, its label (`-100`: not counted by the loss).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `labels[i]` is `ids[i]` where the loss counts the token, `-100` elsewhere.
    pub labels: Vec<i64>,
}

impl Example {
    /// An example every token of which is a label (plain text).
    #[must_use]
    pub fn text(ids: Vec<u32>) -> Self {
        let labels = ids.iter().map(|&id| i64::from(id)).collect();
        Self { ids, labels }
    }

    /// Number of tokens.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether it has no token.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether the loss has something to predict in it (a label after the first token).
    #[must_use]
    pub fn predicts_something(&self) -> bool {
        self.labels.iter().skip(1).any(|&l| l != IGNORE_INDEX)
    }
}

/// The examples of a plain text: paragraphs (blank-line separated, trimmed), each cut into
/// pieces of at most `seq_len` tokens.
///
/// # Errors
/// A tokenizer error.
pub fn text_examples(text: &str, tokenizer: &Tokenizer, seq_len: usize) -> Result<Vec<Example>> {
    let mut examples = Vec::new();
    for para in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        let ids = tokenizer.encode(para)?;
        examples.extend(
            ids.chunks(seq_len.max(1))
                .map(|c| Example::text(c.to_vec())),
        );
    }
    Ok(examples)
}

/// The examples of a JSONL file's contents, one per non-blank line. `path` names the file in
/// errors; `template` is needed by chat lines only.
///
/// # Errors
/// [`Error::DataLine`] naming the file and the line for a line that is not a JSON object with a
/// string `"text"` or a list of `{"role", "content"}` `"messages"` with an assistant turn, or a
/// chat line without a chat template; tokenizer and template errors also name the line.
pub fn jsonl_examples(
    contents: &str,
    path: &Path,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<Vec<Example>> {
    let mut examples = Vec::new();
    for (index, line) in contents.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at_line = |message: String| Error::DataLine {
            path: path.to_path_buf(),
            line: index + 1,
            message,
        };
        let example = match parse_record(line).map_err(at_line)? {
            Record::Text(text) => Example::text(tokenizer.encode(&text)?),
            Record::Chat(messages) => {
                let template = template.ok_or_else(|| at_line(no_template(tokenizer)))?;
                template
                    .encode(tokenizer, &messages)
                    .map_err(|e| at_line(e.to_string()))?
            }
        };
        examples.push(example);
    }
    Ok(examples)
}

/// The examples of the data file `path`: JSONL if its name ends in `.jsonl`, plain text
/// otherwise (see [`text_examples`] and [`jsonl_examples`]).
///
/// # Errors
/// [`Error::Io`] if it cannot be read (or is not UTF-8); the errors of the two readers.
pub fn file_examples(
    path: &Path,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    seq_len: usize,
) -> Result<Vec<Example>> {
    let contents = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    if is_jsonl(path) {
        jsonl_examples(&contents, path, tokenizer, template)
    } else {
        text_examples(&contents, tokenizer, seq_len)
    }
}

/// The examples of the data file `path` ([`file_examples`]), or of [`BUNDLED_TEXT`] without
/// one: what a training command reads.
///
/// # Errors
/// Those of [`file_examples`] and [`text_examples`].
pub fn examples_or_bundled(
    path: Option<&Path>,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    seq_len: usize,
) -> Result<Vec<Example>> {
    match path {
        Some(path) => file_examples(path, tokenizer, template, seq_len),
        None => text_examples(BUNDLED_TEXT, tokenizer, seq_len),
    }
}

/// Whether `path` is read as JSONL (its name ends in `.jsonl`).
#[must_use]
pub fn is_jsonl(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
}

enum Record {
    Text(String),
    Chat(Vec<Message>),
}

const EXPECTED: &str = "expected a JSON object with \"text\" (a string) or \"messages\" (a list \
                        of {\"role\": ..., \"content\": ...} objects)";

fn parse_record(line: &str) -> std::result::Result<Record, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not valid JSON ({e}); {EXPECTED}"))?;
    let Some(object) = value.as_object() else {
        return Err(EXPECTED.to_owned());
    };
    match (object.get("text"), object.get("messages")) {
        (Some(_), Some(_)) => Err("both \"text\" and \"messages\": give one of them".to_owned()),
        (Some(serde_json::Value::String(text)), None) => Ok(Record::Text(text.clone())),
        (Some(_), None) => Err("\"text\" must be a string".to_owned()),
        (None, Some(serde_json::Value::Array(list))) => {
            let messages = list
                .iter()
                .enumerate()
                .map(|(i, m)| parse_message(i, m))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            if !messages.iter().any(|m| m.role == ASSISTANT) {
                return Err(
                    "the conversation has no \"assistant\" message: the loss counts \
                            assistant tokens only, so it would train nothing"
                        .to_owned(),
                );
            }
            Ok(Record::Chat(messages))
        }
        (None, Some(_)) => Err(format!("\"messages\" must be a list; {EXPECTED}")),
        (None, None) => Err(EXPECTED.to_owned()),
    }
}

fn parse_message(i: usize, value: &serde_json::Value) -> std::result::Result<Message, String> {
    let field = |key: &str| match value.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        _ => Err(format!(
            "messages[{i}]: expected an object with string \"role\" and \"content\""
        )),
    };
    Ok(Message::new(field("role")?, field("content")?))
}

fn no_template(tokenizer: &Tokenizer) -> String {
    match tokenizer.path().and_then(Path::parent) {
        Some(dir) => format!(
            "a chat example (\"messages\") needs the checkpoint's chat template, and {} has \
             none (neither a chat_template in tokenizer_config.json nor chat_template.jinja); \
             add it, or give the data as {{\"text\": ...}} lines",
            dir.display()
        ),
        None => "a chat example (\"messages\") needs a checkpoint's chat template, and \
                 byte-level training has none; train a --model with a chat_template, or give \
                 the data as {\"text\": ...} lines"
            .to_owned(),
    }
}

/// How examples become training rows.
#[derive(Debug, Clone, PartialEq)]
pub struct DataOptions {
    /// The longest row, in tokens.
    pub seq_len: usize,
    /// Concatenate all examples and cut the stream into rows of exactly `seq_len` tokens
    /// (the last may be shorter), instead of truncating each example to `seq_len`.
    pub pack: bool,
    /// The share of examples held out for evaluation (0: none), chosen at random (seeded)
    /// before packing, so that no evaluation text is trained on.
    pub eval_fraction: f64,
    /// The model's vocabulary: every id must be below it.
    pub vocab_size: usize,
    /// Seed of the split and of the batch sampler.
    pub seed: u64,
}

impl DataOptions {
    /// Each example truncated to rows of at most `seq_len` tokens, every row for training (no
    /// packing, no eval split).
    #[must_use]
    pub fn rows(seq_len: usize, vocab_size: usize, seed: u64) -> Self {
        Self {
            seq_len,
            pack: false,
            eval_fraction: 0.0,
            vocab_size,
            seed,
        }
    }
}

/// Training and evaluation rows, and a seeded sampler over the training rows.
#[derive(Debug, Clone)]
pub struct Dataset {
    train: Vec<Example>,
    eval: Vec<Example>,
    truncated: usize,
    dropped: usize,
    rng: u64,
}

impl Dataset {
    /// Lays `examples` out as `options` say and holds out the evaluation share. Examples with
    /// nothing to predict within their row (a one-token piece, a chat truncated before its
    /// first assistant token) are dropped and counted.
    ///
    /// # Errors
    /// [`Error::Data`] if `seq_len` is below 2, an id is not below `vocab_size`, the eval
    /// fraction is not in `[0, 1)` or leaves no training example, or nothing is left to train
    /// (or, with a fraction, to evaluate) on.
    pub fn new(examples: Vec<Example>, options: &DataOptions) -> Result<Self> {
        let DataOptions {
            seq_len,
            pack,
            eval_fraction,
            vocab_size,
            seed,
        } = *options;
        if seq_len < 2 {
            return Err(Error::Data(format!("--seq-len {seq_len}: use at least 2")));
        }
        if let Some(id) = examples
            .iter()
            .flat_map(|e| &e.ids)
            .find(|&&id| !usize::try_from(id).is_ok_and(|id| id < vocab_size))
        {
            return Err(Error::Data(format!(
                "the data holds token id {id}, but the model's vocabulary has {vocab_size} \
                 entries: byte-level training needs every byte below vocab_size (use an ASCII \
                 text for a model with vocab_size 128)"
            )));
        }
        if !(0.0..1.0).contains(&eval_fraction) {
            return Err(Error::Data(format!(
                "--eval-fraction {eval_fraction}: expected a share in [0, 1) (0.1 holds out a \
                 tenth of the examples)"
            )));
        }
        let total = examples.len();
        let (train, eval) = split(examples, eval_fraction, seed);
        if eval_fraction > 0.0 && train.is_empty() {
            return Err(Error::Data(format!(
                "--eval-fraction {eval_fraction} holds out all {total} example(s) and leaves \
                 none to train on: lower it, or give more data"
            )));
        }
        let mut truncated = 0;
        let mut dropped = 0;
        let mut layout = |examples: Vec<Example>| {
            let rows = if pack {
                pack_rows(&examples, seq_len)
            } else {
                examples
                    .into_iter()
                    .map(|mut e| {
                        if e.len() > seq_len {
                            truncated += 1;
                            e.ids.truncate(seq_len);
                            e.labels.truncate(seq_len);
                        }
                        e
                    })
                    .collect()
            };
            let before = rows.len();
            let rows: Vec<Example> = rows
                .into_iter()
                .filter(Example::predicts_something)
                .collect();
            dropped += before - rows.len();
            rows
        };
        let train = layout(train);
        let eval = layout(eval);
        if train.is_empty() {
            return Err(Error::Data(format!(
                "no training example has a token to predict within --seq-len {seq_len} (the \
                 data is empty, or every chat's first assistant token lies beyond --seq-len)"
            )));
        }
        if eval_fraction > 0.0 && eval.is_empty() {
            return Err(Error::Data(format!(
                "--eval-fraction {eval_fraction}: no held-out example has a token to predict \
                 within --seq-len {seq_len}; raise --seq-len or the fraction"
            )));
        }
        Ok(Self {
            train,
            eval,
            truncated,
            dropped,
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        })
    }

    /// The byte-level examples of `text` (paragraphs cut into pieces of at most `seq_len`
    /// bytes), all for training: the random-init model's data.
    ///
    /// # Errors
    /// As [`new`](Self::new): a byte not below `vocab_size` (a vocabulary of 128 takes ASCII
    /// only), or an empty text.
    pub fn bytes(text: &str, seq_len: usize, vocab_size: usize, seed: u64) -> Result<Self> {
        let examples = text_examples(text, &Tokenizer::bytes(), seq_len)?;
        Self::new(examples, &DataOptions::rows(seq_len, vocab_size, seed))
    }

    /// Number of training rows.
    #[must_use]
    pub fn len(&self) -> usize {
        self.train.len()
    }

    /// Whether there is no training row (never, after `new`).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.train.is_empty()
    }

    /// The training rows.
    #[must_use]
    pub fn train_rows(&self) -> &[Example] {
        &self.train
    }

    /// The held-out evaluation rows.
    #[must_use]
    pub fn eval_rows(&self) -> &[Example] {
        &self.eval
    }

    /// Examples cut to `seq_len` (without packing).
    #[must_use]
    pub fn truncated(&self) -> usize {
        self.truncated
    }

    /// Rows dropped because they had nothing to predict.
    #[must_use]
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// The sampler's position: what [`set_sampler_state`](Self::set_sampler_state) takes to
    /// draw the same batches from here on (saved with a training state).
    #[must_use]
    pub fn sampler_state(&self) -> u64 {
        self.rng
    }

    /// Continues sampling from a position [`sampler_state`](Self::sampler_state) returned.
    pub fn set_sampler_state(&mut self, state: u64) {
        // xorshift never leaves a non-zero state; a zero one (not from `sampler_state`) would
        // draw row 0 forever.
        self.rng = state.max(1);
    }

    /// `batch` training rows drawn at random, right-padded to the longest.
    ///
    /// # Errors
    /// If candle cannot build the tensors.
    pub fn sample(&mut self, batch: usize, device: &Device) -> Result<Batch> {
        let picks: Vec<&Example> = (0..batch)
            .map(|_| {
                let r = xorshift(&mut self.rng);
                #[allow(clippy::cast_possible_truncation)]
                let i = (r >> 33) as usize % self.train.len();
                &self.train[i]
            })
            .collect();
        collate_examples(&picks, device)
    }

    /// The evaluation rows in order, in batches of at most `batch`.
    pub fn eval_batches<'a>(
        &'a self,
        batch: usize,
        device: &'a Device,
    ) -> impl Iterator<Item = Result<Batch>> + 'a {
        self.eval.chunks(batch.max(1)).map(move |rows| {
            let rows: Vec<&Example> = rows.iter().collect();
            collate_examples(&rows, device)
        })
    }
}

/// xorshift64*: a small seeded generator, so that runs are reproducible without a dependency.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Holds out `round(n * fraction)` examples (at least one for a positive fraction), chosen by
/// a seeded shuffle; both parts keep the file's order.
fn split(examples: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    if fraction <= 0.0 || examples.is_empty() {
        return (examples, Vec::new());
    }
    let n = examples.len();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let held = ((n as f64 * fraction).round() as usize).clamp(1, n);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = seed
        .wrapping_add(0x5851_f42d_4c95_7f2d)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        | 1;
    for i in (1..n).rev() {
        #[allow(clippy::cast_possible_truncation)]
        let j = (xorshift(&mut rng) >> 33) as usize % (i + 1);
        order.swap(i, j);
    }
    let mut is_eval = vec![false; n];
    for &i in &order[..held] {
        is_eval[i] = true;
    }
    let (eval, train): (Vec<_>, Vec<_>) = examples
        .into_iter()
        .zip(is_eval)
        .partition(|(_, eval)| *eval);
    (
        train.into_iter().map(|(e, _)| e).collect(),
        eval.into_iter().map(|(e, _)| e).collect(),
    )
}

/// All examples concatenated, cut into rows of `seq_len` tokens (the last may be shorter).
fn pack_rows(examples: &[Example], seq_len: usize) -> Vec<Example> {
    let ids: Vec<u32> = examples
        .iter()
        .flat_map(|e| e.ids.iter().copied())
        .collect();
    let labels: Vec<i64> = examples
        .iter()
        .flat_map(|e| e.labels.iter().copied())
        .collect();
    ids.chunks(seq_len)
        .zip(labels.chunks(seq_len))
        .map(|(ids, labels)| Example {
            ids: ids.to_vec(),
            labels: labels.to_vec(),
        })
        .collect()
}

/// Right-pads `rows` into a [`Batch`]; every token is a label.
///
/// # Errors
/// If `rows` is empty or candle cannot build the tensors.
pub fn collate(rows: &[&[u32]], device: &Device) -> Result<Batch> {
    let examples: Vec<Example> = rows.iter().map(|r| Example::text(r.to_vec())).collect();
    let refs: Vec<&Example> = examples.iter().collect();
    collate_examples(&refs, device)
}

/// Right-pads `rows` into a [`Batch`], with their labels.
///
/// # Errors
/// If `rows` is empty or candle cannot build the tensors.
pub fn collate_examples(rows: &[&Example], device: &Device) -> Result<Batch> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    if t == 0 {
        return Err(Error::Data("an empty batch".to_owned()));
    }
    let b = rows.len();
    let (mut ids, mut mask, mut labels) = (
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
    );
    let (mut tokens, mut targets) = (0, 0);
    for row in rows {
        for i in 0..t {
            match (row.ids.get(i), row.labels.get(i)) {
                (Some(&id), Some(&label)) => {
                    ids.push(id);
                    mask.push(1u32);
                    labels.push(label);
                    tokens += 1;
                    if i > 0 && label != IGNORE_INDEX {
                        targets += 1;
                    }
                }
                _ => {
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
        targets,
    })
}
