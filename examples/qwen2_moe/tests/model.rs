//! Configuration checks, dense layers among sparse ones, the load-balancing loss's known
//! values and its padding mask, and the loader naming a missing expert tensor.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use checkpoint_tests::temp::TempDir;
use qwen2_moe::router_loss::load_balancing_loss;
use qwen2_moe::{Config, loader};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2-moe-tiny")
}

/// The fixture's config.json with `key` set to `value`.
fn config_with(key: &str, value: serde_json::Value) -> Result<String, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(fixture().join("config.json"))?;
    let mut json: serde_json::Value = serde_json::from_str(&text)?;
    json[key] = value;
    Ok(json.to_string())
}

#[test]
fn unsupported_moe_settings_name_their_key() -> TestResult {
    for (key, value, words) in [
        ("num_experts", serde_json::json!(0), "at least one"),
        (
            "num_experts_per_tok",
            serde_json::json!(5),
            "between 1 and num_experts",
        ),
        ("decoder_sparse_step", serde_json::json!(0), "0: give 1"),
        (
            "mlp_only_layers",
            serde_json::json!([2]),
            "layer 2 does not exist",
        ),
    ] {
        let err = Config::from_json(&config_with(key, value)?)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains(&format!("config key `{key}`")) && err.contains(words),
            "{key}: {err}"
        );
    }
    Ok(())
}

#[test]
fn dense_layers_follow_decoder_sparse_step_and_mlp_only_layers() -> TestResult {
    let mut cfg = Config::tiny_bytes();
    cfg.base.num_hidden_layers = 4;
    cfg.decoder_sparse_step = 2; // layers 1 and 3 sparse ...
    cfg.mlp_only_layers = vec![3]; // ... but 3 dense
    let sparse: Vec<bool> = (0..4).map(|i| cfg.is_sparse(i)).collect();
    assert_eq!(sparse, [false, true, false, false]);
    let dev = Device::Cpu;
    let loaded = loader::random(&cfg, 1, DType::F32, &dev)?;
    let names: Vec<&str> = loaded.params.iter().map(|(n, _)| n.as_str()).collect();
    for (i, &is_sparse) in sparse.iter().enumerate() {
        let routed = format!("model.layers.{i}.mlp.gate.weight");
        let dense = format!("model.layers.{i}.mlp.gate_proj.weight");
        assert_eq!(
            names.contains(&routed.as_str()),
            is_sparse,
            "{i}: {names:?}"
        );
        assert_eq!(
            names.contains(&dense.as_str()),
            !is_sparse,
            "{i}: {names:?}"
        );
    }
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5]], &dev)?;
    let out = loaded.model.forward(&ids, None, None)?;
    assert_eq!(
        out.router_logits.len(),
        1,
        "one sparse layer, one set of logits"
    );
    assert_eq!(out.router_logits[0].dims(), [5, cfg.num_experts]);
    assert_eq!(out.logits.dims(), [1, 5, cfg.base.vocab_size]);
    Ok(())
}

#[test]
fn a_uniform_router_gives_a_load_balancing_loss_of_k() -> TestResult {
    // Every expert equally likely: P_e = 1/E, and the k slots' shares sum to k, so
    // aux = E · Σ_e f_e / E = k whatever the tie-breaking.
    let dev = Device::Cpu;
    let logits = Tensor::zeros((6, 4), DType::F32, &dev)?;
    let aux = load_balancing_loss(&[logits.clone(), logits], 4, 2, None)?;
    assert!((aux.to_scalar::<f32>()? - 2.0).abs() < 1e-6);
    Ok(())
}

#[test]
fn padding_is_left_out_of_the_load_balancing_loss() -> TestResult {
    let dev = Device::Cpu;
    // Two rows of three tokens; the last token of row 1 is padding.
    let mask = Tensor::new(&[[1i64, 1, 1], [1, 1, 0]], &dev)?;
    #[allow(clippy::cast_precision_loss)]
    let values: Vec<f32> = (0..48).map(|i| ((i * 7) % 11) as f32 * 0.3).collect();
    let layers = Tensor::from_vec(values, (12, 4), &dev)?; // 2 layers × 6 tokens
    let (a, b) = (layers.narrow(0, 0, 6)?, layers.narrow(0, 6, 6)?);
    let base = load_balancing_loss(&[a.clone(), b.clone()], 4, 2, Some(&mask))?;
    // Changing the padded token's logits (row 5 of each layer) changes nothing ...
    let bump = Tensor::new(&[[0f32, 0., 0., 0.]; 5], &dev)?;
    let bump = Tensor::cat(&[bump, Tensor::new(&[[9f32, -9., 4., 0.]], &dev)?], 0)?;
    let moved = load_balancing_loss(&[(&a + &bump)?, (&b + &bump)?], 4, 2, Some(&mask))?;
    assert_eq!(base.to_scalar::<f32>()?, moved.to_scalar::<f32>()?);
    // ... unless it counts.
    let unmasked = load_balancing_loss(&[a.clone(), b.clone()], 4, 2, None)?;
    let unmasked_moved = load_balancing_loss(&[(&a + &bump)?, (&b + &bump)?], 4, 2, None)?;
    assert_ne!(
        unmasked.to_scalar::<f32>()?,
        unmasked_moved.to_scalar::<f32>()?
    );
    Ok(())
}

#[test]
fn a_missing_expert_tensor_is_named() -> TestResult {
    let dir = TempDir::new("qwen2-moe-missing")?;
    std::fs::copy(
        fixture().join("config.json"),
        dir.path().join("config.json"),
    )?;
    let mut tensors =
        candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu)?;
    let name = "model.layers.1.mlp.experts.3.down_proj.weight";
    tensors.remove(name).ok_or("fixture lacks the expert")?;
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors"))?;
    let err = loader::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .ok_or("a missing expert must fail")?
        .to_string();
    assert!(err.contains(name), "{err}");
    Ok(())
}
