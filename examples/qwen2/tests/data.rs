//! Real tokens and real data for `qwen2 train`, on `tests/fixtures/qwen2-lora-tiny` (a Qwen2
//! with a byte-level BPE tokenizer and a ChatML chat template, made with Hugging Face
//! transformers): tokenizer ids equal Hugging Face's, chat examples are labelled on the
//! assistant's tokens only, JSONL errors name the file and line, long examples are truncated or
//! packed, an eval split reports loss and perplexity, and the CLI trains on a chat file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use checkpoint_runtime::{Checkpointer, Policy};
use checkpoint_tests::temp::TempDir;
use qwen2::chat::{ChatTemplate, Message};
use qwen2::data::{self, DataOptions, Dataset, Example};
use qwen2::loss::{IGNORE_INDEX, causal_lm_loss};
use qwen2::tokenizer::Tokenizer;
use qwen2::train::{TrainConfig, evaluate, train};
use qwen2::{Error, loader};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2-lora-tiny")
}

fn template() -> Result<ChatTemplate, Box<dyn std::error::Error>> {
    Ok(ChatTemplate::from_dir(&fixture())?.ok_or("the fixture has a chat_template")?)
}

fn two_turns() -> Vec<Message> {
    vec![
        Message::new("system", "You are terse."),
        Message::new("user", "Is it a truth universally acknowledged?"),
        Message::new("assistant", "It is, café owner."),
        Message::new("user", "Two  spaces\tand a tab?"),
        Message::new("assistant", "Fine 🙂"),
    ]
}

#[test]
fn tokenizer_ids_equal_the_hugging_face_reference() -> TestResult {
    let tokenizer = Tokenizer::from_dir(&fixture())?;
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        fixture().join("tokenizer_reference.json"),
    )?)?;
    let texts = reference["texts"].as_array().ok_or("texts")?;
    let ids = reference["ids"].as_array().ok_or("ids")?;
    assert_eq!(texts.len(), ids.len());
    assert!(
        texts.len() >= 4,
        "the reference covers specials and non-ASCII"
    );
    for (text, want) in texts.iter().zip(ids) {
        let text = text.as_str().ok_or("text")?;
        let want: Vec<u32> = serde_json::from_value(want.clone())?;
        assert_eq!(tokenizer.encode(text)?, want, "ids of {text:?}");
    }
    tokenizer.check_vocab(384)?;
    assert!(matches!(
        tokenizer.check_vocab(256),
        Err(Error::Tokenizer { .. })
    ));
    Ok(())
}

/// Exactly the assistant turns' tokens carry labels: each turn's content and the `<|im_end|>`
/// after it; not the `<|im_start|>assistant\n` header, not the `\n` after `<|im_end|>`, nothing
/// of the system and user turns. The expected labels are built from the ChatML pieces,
/// tokenized one by one (every piece boundary is a special token or a newline, where byte-level
/// BPE never merges).
#[test]
fn a_two_turn_chat_labels_exactly_the_assistant_turns() -> TestResult {
    let tokenizer = Tokenizer::from_dir(&fixture())?;
    let template = template()?;
    let messages = two_turns();
    let rendered = template.render(&messages, false)?;
    let expected_text: String = messages
        .iter()
        .map(|m| format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content))
        .collect();
    assert_eq!(rendered, expected_text, "ChatML as transformers renders it");

    let mut want_ids = Vec::new();
    let mut want_labels = Vec::new();
    let mut piece = |text: &str, labelled: bool| -> Result<(), Box<dyn std::error::Error>> {
        for id in tokenizer.encode(text)? {
            want_ids.push(id);
            want_labels.push(if labelled {
                i64::from(id)
            } else {
                IGNORE_INDEX
            });
        }
        Ok(())
    };
    for m in &messages {
        piece(&format!("<|im_start|>{}\n", m.role), false)?;
        let assistant = m.role == "assistant";
        piece(&format!("{}<|im_end|>", m.content), assistant)?;
        piece("\n", false)?;
    }

    let example = template.encode(&tokenizer, &messages)?;
    assert_eq!(example.ids, tokenizer.encode(&rendered)?);
    assert_eq!(example.ids, want_ids);
    assert_eq!(example.labels, want_labels);

    // The same, stated as runs: two labelled runs, each one turn's content + <|im_end|>.
    let im_end = tokenizer.token_id("<|im_end|>").ok_or("<|im_end|>")?;
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut previous = false;
    for (&id, &label) in example.ids.iter().zip(&example.labels) {
        let labelled = label != IGNORE_INDEX;
        if labelled {
            assert_eq!(label, i64::from(id));
            if !previous {
                runs.push(Vec::new());
            }
            if let Some(run) = runs.last_mut() {
                run.push(id);
            }
        }
        previous = labelled;
    }
    let mut turn1 = tokenizer.encode("It is, café owner.")?;
    turn1.push(im_end);
    let mut turn2 = tokenizer.encode("Fine 🙂")?;
    turn2.push(im_end);
    assert_eq!(runs, [turn1, turn2]);
    Ok(())
}

/// A template with transformers' `{% generation %}` markers compiles, and labels the same.
#[test]
fn generation_markers_do_not_change_the_labels() -> TestResult {
    let tokenizer = Tokenizer::from_dir(&fixture())?;
    let marked = "{% for message in messages %}{% if message['role'] == 'assistant' %}\
        {{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}\
        {% endgeneration %}{{ '\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + \
        message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}\
        {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let marked = ChatTemplate::new(marked, Default::default(), "marked.jinja".into())?;
    let messages = two_turns();
    assert_eq!(
        marked.encode(&tokenizer, &messages)?,
        template()?.encode(&tokenizer, &messages)?
    );
    Ok(())
}

fn write(dir: &TempDir, name: &str, contents: &str) -> Result<PathBuf, std::io::Error> {
    let path = dir.path().join(name);
    std::fs::write(&path, contents)?;
    Ok(path)
}

#[test]
fn a_malformed_jsonl_line_is_named_with_its_file() -> TestResult {
    let tmp = TempDir::new("qwen2-data-malformed")?;
    let tokenizer = Tokenizer::from_dir(&fixture())?;
    let template = template()?;
    let good = r#"{"text": "It is a truth"}"#;
    let chat = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
    let cases = [
        ("{\"text\": \"unterminated", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (r#"{"text": 3}"#, "\"text\" must be a string"),
        (r#"{"messages": "hi"}"#, "\"messages\" must be a list"),
        (r#"{"messages": [{"role": "user"}]}"#, "messages[0]"),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
            "no \"assistant\" message",
        ),
        (r#"{"text": "a", "messages": []}"#, "both"),
        (r#"{"prompt": "a"}"#, "expected a JSON object"),
    ];
    for (bad, why) in cases {
        // Line 3 is bad; a blank line 2 still counts.
        let path = write(&tmp, "data.jsonl", &format!("{good}\n\n{bad}\n{chat}\n"))?;
        let err = data::file_examples(&path, &tokenizer, Some(&template), 64)
            .expect_err("a malformed line");
        assert!(
            matches!(&err, Error::DataLine { path: p, line: 3, .. } if p == &path),
            "{bad}: {err}"
        );
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("{}, line 3: ", path.display())) && message.contains(why),
            "{bad}: {message}"
        );
    }
    let path = write(&tmp, "data.jsonl", &format!("{good}\n\n{chat}\n"))?;
    assert_eq!(
        data::file_examples(&path, &tokenizer, Some(&template), 64)?.len(),
        2
    );
    // A chat line needs a template: byte-level training (or a checkpoint without one) has none.
    let err = data::file_examples(&path, &Tokenizer::bytes(), None, 64)
        .expect_err("chat without a template");
    assert!(matches!(err, Error::DataLine { line: 3, .. }), "{err}");
    assert!(err.to_string().contains("chat template"), "{err}");
    Ok(())
}

fn example(len: usize, first: u32) -> Example {
    Example::text((first..first + u32::try_from(len).unwrap_or(0)).collect())
}

fn options(seq_len: usize, pack: bool, eval_fraction: f64) -> DataOptions {
    DataOptions {
        seq_len,
        pack,
        eval_fraction,
        vocab_size: 1000,
        seed: 5,
    }
}

#[test]
fn long_examples_are_truncated_or_packed() -> TestResult {
    let examples = vec![example(10, 0), example(3, 100), example(7, 200)];
    let cut = Dataset::new(examples.clone(), &options(4, false, 0.0))?;
    let lens: Vec<usize> = cut.train_rows().iter().map(Example::len).collect();
    assert_eq!(lens, [4, 3, 4]);
    assert_eq!(cut.truncated(), 2);
    assert_eq!(
        cut.train_rows()[0],
        example(4, 0),
        "the first tokens are kept"
    );

    let packed = Dataset::new(examples.clone(), &options(4, true, 0.0))?;
    let lens: Vec<usize> = packed.train_rows().iter().map(Example::len).collect();
    assert_eq!(lens, [4, 4, 4, 4, 4]);
    let stream: Vec<u32> = packed
        .train_rows()
        .iter()
        .flat_map(|r| r.ids.clone())
        .collect();
    let all: Vec<u32> = examples.iter().flat_map(|e| e.ids.clone()).collect();
    assert_eq!(stream, all, "packing keeps every token, in order");
    assert_eq!(packed.truncated(), 0);

    // Labels travel with their tokens: a chat-like example keeps its -100s when packed.
    let mut chat = example(6, 300);
    chat.labels[..3].fill(IGNORE_INDEX);
    let packed = Dataset::new(vec![example(2, 0), chat], &options(4, true, 0.0))?;
    assert_eq!(
        packed.train_rows()[0].labels,
        [0, 1, IGNORE_INDEX, IGNORE_INDEX]
    );
    assert_eq!(packed.train_rows()[1].labels, [IGNORE_INDEX, 303, 304, 305]);

    // A row with nothing to predict (a one-token piece) is dropped, and counted.
    let dropped = Dataset::new(vec![example(5, 0), example(1, 9)], &options(8, false, 0.0))?;
    assert_eq!((dropped.len(), dropped.dropped()), (1, 1));
    Ok(())
}

#[test]
fn the_eval_split_is_held_out_and_seeded() -> TestResult {
    let examples: Vec<Example> = (0..8).map(|i| example(5, i * 10)).collect();
    let data = Dataset::new(examples.clone(), &options(16, false, 0.25))?;
    assert_eq!((data.len(), data.eval_rows().len()), (6, 2));
    for row in data.eval_rows() {
        assert!(
            !data.train_rows().contains(row),
            "eval rows are not trained on"
        );
    }
    let again = Dataset::new(examples.clone(), &options(16, false, 0.25))?;
    assert_eq!(again.eval_rows(), data.eval_rows(), "same seed, same split");
    for bad in [1.0, -0.1, f64::NAN] {
        let err = Dataset::new(examples.clone(), &options(16, false, bad)).expect_err("bad");
        assert!(err.to_string().contains("--eval-fraction"), "{err}");
    }
    let err = Dataset::new(vec![example(5, 0)], &options(16, false, 0.5)).expect_err("none left");
    assert!(err.to_string().contains("none to train on"), "{err}");
    Ok(())
}

/// Evaluations come every N steps and after the last; the eval loss is the mean over every
/// held-out predicted token (equal to one batch holding all held-out rows), and the perplexity
/// its exponential.
#[test]
fn eval_reports_loss_and_perplexity_every_n_steps() -> TestResult {
    let dev = Device::Cpu;
    let tokenizer = Tokenizer::from_dir(&fixture())?;
    let loaded = loader::load(&fixture(), DType::F32, &dev)?;
    let examples = data::text_examples(qwen2::data::BUNDLED_TEXT, &tokenizer, 24)?;
    let options = DataOptions {
        vocab_size: loaded.config.vocab_size,
        ..options(24, false, 0.2)
    };
    let mut data = Dataset::new(examples, &options)?;
    assert!(data.eval_rows().len() > 2);

    // The eval loss, batched by 2, is the token-weighted mean: one batch of all rows agrees.
    let rows: Vec<&Example> = data.eval_rows().iter().collect();
    let all = data::collate_examples(&rows, &dev)?;
    let logits = loaded
        .model
        .forward(&all.input_ids, Some(&all.attention_mask), None)?;
    let whole = f64::from(causal_lm_loss(&logits, &all.labels)?.to_scalar::<f32>()?);
    let batched = evaluate(&loaded.model, &data, 2, 0, &dev)?.ok_or("eval rows")?;
    assert!((batched.loss - whole).abs() < 1e-5, "{batched} vs {whole}");
    assert_eq!(batched.targets, all.targets);

    let cfg = TrainConfig {
        steps: 5,
        batch: 2,
        eval_every: Some(2),
        ..TrainConfig::default()
    };
    let ckpt = Checkpointer::new(Policy::recompute());
    let summary = train(
        &loaded.model,
        &loaded.params,
        &mut data,
        &ckpt,
        &cfg,
        &dev,
        |_| Ok(()),
    )?;
    let steps: Vec<usize> = summary.evals.iter().map(|e| e.step).collect();
    assert_eq!(steps, [2, 4, 5]);
    for eval in &summary.evals {
        assert!(eval.loss.is_finite() && eval.loss > 0.0, "{eval}");
        assert!((eval.perplexity - eval.loss.exp()).abs() < 1e-9 * eval.perplexity);
    }
    Ok(())
}

fn qwen2(args: &[&str]) -> std::io::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_qwen2"))
        .arg("train")
        .args(args)
        .output()
}

fn path_arg(path: &Path) -> Result<&str, &'static str> {
    path.to_str().ok_or("temp path is not UTF-8")
}

/// The first and last loss of `train`'s summary line `loss A -> B (...)`.
fn losses(stdout: &str) -> Option<(f32, f32)> {
    let line = stdout.lines().find(|l| l.starts_with("loss "))?;
    let mut words = line.split_whitespace();
    let first = words.nth(1)?.parse().ok()?;
    let last = words.nth(1)?.parse().ok()?;
    Some((first, last))
}

/// `train --model <fixture> --data <chat jsonl>` runs on the checkpoint's tokens with a finite
/// loss and an eval line; a checkpoint without tokenizer.json is refused (unless --bytes), and
/// a malformed line is named.
#[test]
fn the_cli_trains_a_checkpoint_on_chat_data() -> TestResult {
    let tmp = TempDir::new("qwen2-data-cli")?;
    let chats: String = (0..6)
        .map(|i| {
            format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"Question {i}?\"}}, \
                 {{\"role\": \"assistant\", \"content\": \"Answer {i}, café.\"}}]}}\n"
            )
        })
        .collect();
    let chat_file = write(&tmp, "chat.jsonl", &chats)?;
    let model = fixture();
    let common = ["--steps", "2", "--batch", "2", "--seq-len", "64"];
    let out = qwen2(
        &[
            &common[..],
            &[
                "--model",
                path_arg(&model)?,
                "--data",
                path_arg(&chat_file)?,
                "--eval-fraction",
                "0.34",
            ],
        ]
        .concat(),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (first, last) = losses(&stdout).ok_or_else(|| format!("no loss line in {stdout}"))?;
    assert!(first.is_finite() && last.is_finite(), "{stdout}");
    assert!(stderr.contains("tokenizer.json"), "{stderr}");
    assert!(stderr.contains("eval after step 2: loss"), "{stderr}");

    // The same weights without tokenizer.json: refused before training, naming the fix.
    let bare = tmp.path().join("bare");
    std::fs::create_dir(&bare)?;
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(file), bare.join(file))?;
    }
    let text_file = write(
        &tmp,
        "text.txt",
        "It is a truth universally acknowledged.\n",
    )?;
    let bare_args = ["--model", path_arg(&bare)?, "--data", path_arg(&text_file)?];
    let out = qwen2(&[&common[..], &bare_args[..]].concat())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("error: {} has no tokenizer.json", bare.display()))
            && stderr.contains("--bytes")
            && !stderr.contains("] step"),
        "{stderr}"
    );
    let out = qwen2(&[&common[..], &bare_args[..], &["--bytes"][..]].concat())?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = write(&tmp, "bad.jsonl", "{\"text\": \"fine\"}\n{\"text\": \n")?;
    let out = qwen2(
        &[
            &common[..],
            &["--model", path_arg(&model)?, "--data", path_arg(&bad)?],
        ]
        .concat(),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("{}, line 2: not valid JSON", bad.display())),
        "{stderr}"
    );
    Ok(())
}
