//! Chat examples: a conversation rendered with the checkpoint's own `chat_template` (Jinja,
//! through `minijinja`, configured as transformers configures Jinja), tokenized, and labelled so
//! that the loss counts the assistant's tokens only.
//!
//! Which tokens are the assistant's: those of each assistant turn's content **and the
//! end-of-turn token the template puts after it** (`<|im_end|>` in ChatML), as a Qwen template
//! with transformers' `{% generation %}` markers (`return_assistant_tokens_mask`) labels them.
//! The turn's header (`<|im_start|>assistant\n`, the generation prompt) and whatever the
//! template writes after the end-of-turn token (ChatML's `\n`) carry `-100`, like every
//! system and user token.
//!
//! The turns are found without markers, so that templates that have none (Qwen2's) work: the
//! assistant turn `i` is the text that rendering `messages[..=i]` adds to rendering
//! `messages[..i]` with `add_generation_prompt`; its labels run from its first token to its
//! last special token (the end of turn), or to its end if it has none. `{% generation %}`
//! markers, which `minijinja` does not know, are removed before compiling.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Value;
use minijinja::{Environment, ErrorKind};

use crate::data::Example;
use crate::error::{Error, Result};
use crate::loss::IGNORE_INDEX;
use crate::tokenizer::Tokenizer;

/// The file of a Hugging Face checkpoint that holds `chat_template` and the special tokens.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// The file in which recent transformers save the chat template (it takes precedence over
/// `tokenizer_config.json`'s, as in transformers).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// The role whose tokens the loss counts.
pub const ASSISTANT: &str = "assistant";

const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message of `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    fn to_value(&self) -> Value {
        let map: BTreeMap<String, Value> = [
            ("role".to_owned(), Value::from(self.role.as_str())),
            ("content".to_owned(), Value::from(self.content.as_str())),
        ]
        .into_iter()
        .collect();
        Value::from(map)
    }
}

/// A checkpoint's compiled chat template, with the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, ... from `tokenizer_config.json`.
    specials: BTreeMap<String, Value>,
    /// Where the template came from (for errors).
    path: PathBuf,
}

impl ChatTemplate {
    /// The chat template of the checkpoint in `dir`: `chat_template.jinja` if present, else
    /// `tokenizer_config.json`'s `chat_template`; `None` if it has neither.
    ///
    /// # Errors
    /// [`Error::Io`]/[`Error::Json`] for unreadable files, [`Error::ChatTemplate`] if the
    /// template does not compile.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = if config_path.is_file() {
            let text =
                std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            serde_json::from_str::<serde_json::Value>(&text).map_err(|e| Error::Json {
                path: config_path.clone(),
                source: e,
            })?
        } else {
            serde_json::Value::Null
        };
        let jinja_path = dir.join(CHAT_TEMPLATE_FILE);
        let (source, path) = if jinja_path.is_file() {
            let source =
                std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?;
            (source, jinja_path)
        } else {
            match template_in_config(&config, &config_path)? {
                Some(source) => (source, config_path),
                None => return Ok(None),
            }
        };
        let specials = special_tokens(&config);
        Self::new(&source, specials, path).map(Some)
    }

    /// Compiles `source` (a Jinja chat template). `specials` are the template's variables
    /// besides `messages` and `add_generation_prompt` (`eos_token`, ...); `path` names the
    /// template in errors.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] if the template does not compile.
    pub fn new(source: &str, specials: BTreeMap<String, String>, path: PathBuf) -> Result<Self> {
        let compile_error = |e: minijinja::Error| Error::ChatTemplate {
            path: path.clone(),
            message: format!("does not compile: {e:#}"),
        };
        let mut env = Environment::new();
        // transformers compiles chat templates with these two set (and loop controls on).
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(compile_error)?;
        env.set_syntax(syntax);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, strip_generation_markers(source))
            .map_err(compile_error)?;
        Ok(Self {
            env,
            specials: specials
                .into_iter()
                .map(|(k, v)| (k, Value::from(v)))
                .collect(),
            path,
        })
    }

    /// The text of `messages`, followed by the assistant's turn header if
    /// `add_generation_prompt`.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] if rendering fails (the template's `raise_exception` included).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let error = |e: minijinja::Error| Error::ChatTemplate {
            path: self.path.clone(),
            message: format!("cannot render the conversation: {e:#}"),
        };
        let template = self.env.get_template(TEMPLATE_NAME).map_err(error)?;
        let mut ctx = self.specials.clone();
        ctx.insert(
            "messages".to_owned(),
            messages.iter().map(Message::to_value).collect(),
        );
        ctx.insert(
            "add_generation_prompt".to_owned(),
            Value::from(add_generation_prompt),
        );
        template.render(Value::from(ctx)).map_err(error)
    }

    /// The tokens of the rendered conversation, labelled on the assistant's turns only (see
    /// the module docs for which tokens those are).
    ///
    /// # Errors
    /// A rendering or tokenizer error, or [`Error::ChatTemplate`] if the template renders a
    /// conversation differently from its prefixes (the assistant turns cannot be located).
    pub fn encode(&self, tokenizer: &Tokenizer, messages: &[Message]) -> Result<Example> {
        let full = self.render(messages, false)?;
        let encoded = tokenizer.encode_with_offsets(&full, false)?;
        let mut labels = vec![IGNORE_INDEX; encoded.ids.len()];
        for (i, message) in messages.iter().enumerate() {
            if message.role != ASSISTANT {
                continue;
            }
            let prompt = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&prompt) || !full.starts_with(&through) {
                return Err(Error::ChatTemplate {
                    path: self.path.clone(),
                    message: format!(
                        "it renders message {i} (assistant) differently depending on what \
                         follows it, so its tokens cannot be located for the loss; training \
                         needs a template whose rendering of a conversation starts with the \
                         rendering of each of its prefixes (with add_generation_prompt before \
                         an assistant turn)"
                    ),
                });
            }
            let turn: Vec<usize> = (0..encoded.ids.len())
                .filter(|&k| (prompt.len()..through.len()).contains(&encoded.offsets[k].start))
                .collect();
            let end = turn
                .iter()
                .rposition(|&k| tokenizer.is_special(encoded.ids[k]))
                .map_or(turn.len(), |last| last + 1);
            for &k in &turn[..end] {
                labels[k] = i64::from(encoded.ids[k]);
            }
        }
        Ok(Example {
            ids: encoded.ids,
            labels,
        })
    }
}

/// `chat_template` of a `tokenizer_config.json`: a string, or a list of named templates (the
/// one named `default`, else the first).
fn template_in_config(config: &serde_json::Value, path: &Path) -> Result<Option<String>> {
    let bad = || Error::ChatTemplate {
        path: path.to_path_buf(),
        message: "`chat_template` must be a string or a list of {\"name\", \"template\"} \
                  objects"
            .to_owned(),
    };
    match config.get(TEMPLATE_NAME) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(named)) => {
            let pick = named
                .iter()
                .find(|t| t.get("name").and_then(serde_json::Value::as_str) == Some("default"))
                .or_else(|| named.first());
            match pick.map(|t| t.get("template").and_then(serde_json::Value::as_str)) {
                Some(Some(s)) => Ok(Some(s.to_owned())),
                Some(None) => Err(bad()),
                None => Ok(None),
            }
        }
        Some(_) => Err(bad()),
    }
}

/// The `*_token` entries of a `tokenizer_config.json` (a string, or an added-token object with
/// `content`), which transformers passes to the template.
fn special_tokens(config: &serde_json::Value) -> BTreeMap<String, String> {
    let Some(map) = config.as_object() else {
        return BTreeMap::new();
    };
    map.iter()
        .filter(|(key, _)| key.ends_with("_token"))
        .filter_map(|(key, value)| {
            let content = match value {
                serde_json::Value::String(s) => Some(s.as_str()),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()),
                _ => None,
            };
            content.map(|c| (key.clone(), c.to_owned()))
        })
        .collect()
}

/// Removes `{% generation %}` and `{% endgeneration %}` tags (transformers' assistant-mask
/// markers), keeping what is between them.
fn strip_generation_markers(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let Some(close) = rest[open..].find("%}") else {
            break;
        };
        let tag = &rest[open + 2..open + close];
        let name = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..open]);
        if name != "generation" && name != "endgeneration" {
            out.push_str(&rest[open..open + close + 2]);
        }
        rest = &rest[open + close + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::strip_generation_markers;

    #[test]
    fn generation_markers_are_removed_and_other_tags_kept() {
        let src = "{% for m in messages %}{%- generation -%}{{ m }}{% endgeneration %}{% endfor %}";
        assert_eq!(
            strip_generation_markers(src),
            "{% for m in messages %}{{ m }}{% endfor %}"
        );
    }
}
