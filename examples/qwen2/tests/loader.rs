//! Loader behaviour on small checkpoints written to a temporary directory: both config
//! spellings, sharded checkpoints, dtype conversion, untied heads, and the errors for missing or
//! misshapen tensors and for settings that are not implemented.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use checkpoint_tests::compare::max_abs_diff;
use checkpoint_tests::temp::TempDir;
use qwen2::error::TensorProblem;
use qwen2::{Config, Error, loader};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const ROPE_TOP: &str = r#""rope_theta": 10000.0"#;
const ROPE_NESTED: &str = r#""rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}"#;

fn config_json(rope: &str, tied: bool, extra: &str) -> String {
    format!(
        r#"{{"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": {tied}, "hidden_act": "silu",
            "use_sliding_window": false, "sliding_window": null, {rope}{extra}}}"#
    )
}

/// The tensors of a random model of the config `json` describes.
fn weights(json: &str) -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    let cfg = Config::from_json(json)?;
    let loaded = loader::random(&cfg, 3, DType::F32, &Device::Cpu)?;
    Ok(loaded
        .params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect())
}

fn write(dir: &Path, json: &str, tensors: &HashMap<String, Tensor>) -> TestResult {
    std::fs::write(dir.join("config.json"), json)?;
    candle_core::safetensors::save(tensors, dir.join("model.safetensors"))?;
    Ok(())
}

fn load(dir: &Path) -> qwen2::Result<loader::Loaded> {
    loader::load(dir, DType::F32, &Device::Cpu)
}

fn config_error_key(json: &str) -> Option<String> {
    match Config::from_json(json) {
        Err(Error::Config { key, .. }) => Some(key),
        _ => None,
    }
}

#[test]
fn both_rope_spellings_give_the_same_config() -> TestResult {
    let top = Config::from_json(&config_json(ROPE_TOP, true, ""))?;
    let nested = Config::from_json(&config_json(ROPE_NESTED, true, ""))?;
    assert_eq!(top, nested);
    assert!((top.rope_theta - 10000.0).abs() < f64::EPSILON);
    assert_eq!(top.head_dim, 4);
    let missing = config_json(r#""max_position_embeddings": 64"#, true, "");
    assert_eq!(config_error_key(&missing).as_deref(), Some("rope_theta"));
    Ok(())
}

#[test]
fn loads_a_checkpoint_in_either_spelling_with_the_files_values() -> TestResult {
    for rope in [ROPE_TOP, ROPE_NESTED] {
        let tmp = TempDir::new("qwen2-loader")?;
        let json = config_json(rope, true, "");
        let tensors = weights(&json)?;
        write(tmp.path(), &json, &tensors)?;
        let loaded = load(tmp.path())?;
        assert_trainable_copies(&loaded, &tensors)?;
    }
    Ok(())
}

/// Every file tensor became a trainable variable with exactly its values, and nothing else did.
fn assert_trainable_copies(
    loaded: &loader::Loaded,
    tensors: &HashMap<String, Tensor>,
) -> TestResult {
    assert_eq!(loaded.params.len(), tensors.len());
    for (name, var) in &loaded.params {
        assert!(var.as_tensor().is_variable(), "{name} is not trainable");
        assert_eq!(
            max_abs_diff(var.as_tensor(), &tensors[name])?,
            0.0,
            "{name}"
        );
    }
    Ok(())
}

#[test]
fn names_every_missing_and_misshapen_tensor() -> TestResult {
    let tmp = TempDir::new("qwen2-loader")?;
    let json = config_json(ROPE_TOP, true, "");
    let mut tensors = weights(&json)?;
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    tensors.insert(
        "model.layers.0.self_attn.k_proj.bias".into(),
        Tensor::zeros(16, DType::F32, &Device::Cpu)?,
    );
    write(tmp.path(), &json, &tensors)?;
    let err = load(tmp.path()).err().ok_or("loading should fail")?;
    let message = err.to_string();
    let Error::Tensors { problems, .. } = err else {
        return Err(format!("unexpected error: {message}").into());
    };
    assert_eq!(problems.len(), 2, "{message}");
    assert!(problems.iter().any(|p| matches!(p,
        TensorProblem::Missing { name, .. } if name == "model.layers.1.mlp.up_proj.weight")));
    assert!(problems.iter().any(|p| matches!(p,
        TensorProblem::Shape { name, expected, found }
            if name == "model.layers.0.self_attn.k_proj.bias" && expected == &[8] && found == &[16])));
    assert!(
        message.contains("model.layers.1.mlp.up_proj.weight"),
        "{message}"
    );
    Ok(())
}

#[test]
fn untied_heads_need_lm_head_and_load_it() -> TestResult {
    let tmp = TempDir::new("qwen2-loader")?;
    let json = config_json(ROPE_TOP, false, "");
    let mut tensors = weights(&json)?;
    assert!(tensors.contains_key("lm_head.weight"));
    write(tmp.path(), &json, &tensors)?;
    assert!(
        load(tmp.path())?
            .params
            .iter()
            .any(|(n, _)| n == "lm_head.weight")
    );

    tensors.remove("lm_head.weight");
    write(tmp.path(), &json, &tensors)?;
    let message = load(tmp.path())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("lm_head.weight") && message.contains("tie_word_embeddings"),
        "{message}"
    );
    Ok(())
}

#[test]
fn refuses_sliding_window_and_rope_scaling_naming_the_key() {
    let sliding = config_json(ROPE_TOP, true, "").replace(
        r#""use_sliding_window": false"#,
        r#""use_sliding_window": true"#,
    );
    assert_eq!(
        config_error_key(&sliding).as_deref(),
        Some("use_sliding_window")
    );

    let scaling = config_json(
        ROPE_TOP,
        true,
        r#", "rope_scaling": {"rope_type": "linear", "factor": 2.0}"#,
    );
    assert_eq!(config_error_key(&scaling).as_deref(), Some("rope_scaling"));

    let yarn = r#""rope_parameters": {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}"#;
    assert_eq!(
        config_error_key(&config_json(yarn, true, "")).as_deref(),
        Some("rope_parameters.rope_type")
    );

    let null_scaling = config_json(ROPE_TOP, true, r#", "rope_scaling": null"#);
    assert!(Config::from_json(&null_scaling).is_ok());
}

#[test]
fn reads_a_sharded_checkpoint() -> TestResult {
    let tmp = TempDir::new("qwen2-loader")?;
    let json = config_json(ROPE_TOP, true, "");
    let tensors = weights(&json)?;
    let (mut first, mut second) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (name, t) in &tensors {
        let (shard, file) = if name.contains("layers.1") {
            (&mut second, "model-00002-of-00002.safetensors")
        } else {
            (&mut first, "model-00001-of-00002.safetensors")
        };
        shard.insert(name.clone(), t.clone());
        weight_map.insert(name.clone(), file.into());
    }
    candle_core::safetensors::save(&first, tmp.path().join("model-00001-of-00002.safetensors"))?;
    candle_core::safetensors::save(&second, tmp.path().join("model-00002-of-00002.safetensors"))?;
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )?;
    std::fs::write(tmp.path().join("config.json"), &json)?;
    let loaded = load(tmp.path())?;
    assert_trainable_copies(&loaded, &tensors)
}

#[test]
fn converts_a_bf16_file_into_f32_variables() -> TestResult {
    let tmp = TempDir::new("qwen2-loader")?;
    let json = config_json(ROPE_NESTED, true, "");
    let tensors: HashMap<String, Tensor> = weights(&json)?
        .into_iter()
        .map(|(n, t)| t.to_dtype(DType::BF16).map(|t| (n, t)))
        .collect::<candle_core::Result<_>>()?;
    write(tmp.path(), &json, &tensors)?;
    let loaded = load(tmp.path())?;
    for (name, var) in &loaded.params {
        assert_eq!(var.dtype(), DType::F32, "{name}");
        let expected = tensors[name].to_dtype(DType::F32)?;
        assert_eq!(max_abs_diff(var.as_tensor(), &expected)?, 0.0, "{name}");
    }
    Ok(())
}

#[test]
fn a_directory_without_weights_is_a_clear_error() -> TestResult {
    let tmp = TempDir::new("qwen2-loader")?;
    std::fs::write(
        tmp.path().join("config.json"),
        config_json(ROPE_TOP, true, ""),
    )?;
    let message = load(tmp.path())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("model.safetensors.index.json"),
        "{message}"
    );
    Ok(())
}
