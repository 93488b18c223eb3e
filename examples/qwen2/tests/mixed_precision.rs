//! Mixed precision: a bf16 model is stepped through f32 master copies, so that one small AdamW
//! step is the f32 reference step rounded once to bf16, and small updates that a pure-bf16 step
//! rounds away accumulate in the masters.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use qwen2::train::{ClippedAdamW, ClippedAdamWConfig};
use qwen2::{Config, loader};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LR: f64 = 1e-5;

fn config() -> ClippedAdamWConfig {
    ClippedAdamWConfig {
        adamw: ParamsAdamW {
            lr: LR,
            weight_decay: 0.1,
            ..ParamsAdamW::default()
        },
        clip: 1.0,
    }
}

/// A bf16 model and the gradients of one batch's loss (bf16, as the backward pass gives them).
fn bf16_model_and_grads() -> Result<(loader::Loaded, GradStore), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let model = loader::random(&Config::tiny_bytes(), 5, DType::BF16, &dev)?;
    let rows: Vec<Vec<u32>> = (0..2u32)
        .map(|r| (0..24).map(|i| (i * 7 + r * 13) % 250).collect())
        .collect();
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let batch = qwen2::data::collate(&rows, &dev)?;
    let logits = model
        .model
        .forward(&batch.input_ids, Some(&batch.attention_mask), None)?;
    let loss = qwen2::loss::causal_lm_loss(&logits, &batch.labels)?;
    let grads = loss.backward()?;
    Ok((model, grads))
}

/// f32 copies of `params` and of their gradients.
fn f32_copies(
    params: &[(String, Var)],
    grads: &GradStore,
) -> Result<(Vec<Var>, GradStore), Box<dyn std::error::Error>> {
    let mut vars = Vec::new();
    let mut g32 = GradStore::default();
    for (name, var) in params {
        let v = Var::from_tensor(&var.as_tensor().to_dtype(DType::F32)?)?;
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| format!("{name}: no gradient"))?;
        g32.insert(v.as_tensor(), g.to_dtype(DType::F32)?);
        vars.push(v);
    }
    Ok((vars, g32))
}

fn f32_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Elements of `a` and `b` that differ.
fn changed(a: &[f32], b: &[f32]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

#[test]
fn a_bf16_step_is_the_f32_step_rounded_once() -> TestResult {
    let (model, grads) = bf16_model_and_grads()?;
    let (ref_vars, ref_grads) = f32_copies(&model.params, &grads)?;
    let mut reference = ClippedAdamW::new(ref_vars.clone(), config())?;
    reference.step(&ref_grads)?;

    let vars: Vec<Var> = model.params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = ClippedAdamW::new(vars, config())?;
    opt.step(&grads)?;
    // Both clipped with the same global norm (the bf16 gradients' values, in f32).
    assert_eq!(opt.last_norm(), reference.last_norm());

    for ((name, var), want) in model.params.iter().zip(&ref_vars) {
        let want = f32_values(want.as_tensor())?;
        // The master is the f32 reference step itself.
        let master = opt
            .master(var)?
            .ok_or_else(|| format!("{name}: a bf16 parameter without an f32 master"))?;
        let master = master.to_vec1::<f32>()?;
        assert_eq!(
            changed(&master, &want),
            0,
            "{name}: master differs from f32"
        );
        // The bf16 weight is that result rounded once to bf16: within half a bf16 ulp (at most
        // 2^-8 relative) of the f32 reference, and equal to its rounding.
        let got = f32_values(var.as_tensor())?;
        let rounded =
            f32_values(&Tensor::new(want.as_slice(), &Device::Cpu)?.to_dtype(DType::BF16)?)?;
        for (i, ((g, w), r)) in got.iter().zip(&want).zip(&rounded).enumerate() {
            let bound = w.abs() * 2f32.powi(-8) + f32::MIN_POSITIVE;
            assert!(
                (g - w).abs() <= bound && g == r,
                "{name}[{i}]: bf16 {g} vs f32 reference {w} (rounded {r})"
            );
        }
    }
    Ok(())
}

/// At lr 1e-5 an AdamW step (about lr per element) is below a bf16 ulp of a typical weight:
/// the old pure-bf16 update (candle-nn's AdamW on bf16 variables) leaves the weights where they
/// were, step after step; the f32 masters take every step and the bf16 weights follow.
#[test]
fn small_steps_that_bf16_rounds_away_accumulate_in_the_masters() -> TestResult {
    const STEPS: usize = 40;
    let (model, grads) = bf16_model_and_grads()?;
    let start: Vec<Vec<f32>> = model
        .params
        .iter()
        .map(|(_, v)| f32_values(v.as_tensor()))
        .collect::<candle_core::Result<_>>()?;
    // Matrices only: they hold almost all the weights, and their magnitude (N(0, 0.02)) puts
    // a bf16 ulp well above the step.
    let matrices: Vec<&(String, Var)> =
        model.params.iter().filter(|(_, v)| v.rank() >= 2).collect();
    let total: usize = matrices.iter().map(|(_, v)| v.elem_count()).sum();

    // The old update, on bf16 copies.
    let mut pure_vars = Vec::new();
    let mut pure_grads = GradStore::default();
    for (_, var) in &matrices {
        let v = Var::from_tensor(&var.as_tensor().copy()?)?;
        if let Some(g) = grads.get(var.as_tensor()) {
            pure_grads.insert(v.as_tensor(), g.clone());
        }
        pure_vars.push(v);
    }
    let mut pure = candle_nn::AdamW::new(pure_vars.clone(), config().adamw)?;
    for _ in 0..STEPS {
        pure.step(&pure_grads)?;
    }

    let vars: Vec<Var> = model.params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = ClippedAdamW::new(vars, config())?;
    opt.step(&grads)?;
    let mut masters_moved = 0;
    let mut after_one = 0;
    for ((_, var), before) in model.params.iter().zip(&start) {
        if var.rank() >= 2 {
            let master = opt.master(var)?.ok_or("no master")?.to_vec1::<f32>()?;
            masters_moved += changed(&master, before);
            after_one += changed(&f32_values(var.as_tensor())?, before);
        }
    }
    for _ in 1..STEPS {
        opt.step(&grads)?;
    }

    let (mut pure_changed, mut mixed_changed) = (0, 0);
    let start_of = |var: &Var| {
        model
            .params
            .iter()
            .position(|(_, v)| v.as_tensor().id() == var.as_tensor().id())
            .map(|i| &start[i])
    };
    for ((_, var), pure_var) in matrices.iter().zip(&pure_vars) {
        let before = start_of(var).ok_or("parameter not found")?;
        pure_changed += changed(&f32_values(pure_var.as_tensor())?, before);
        mixed_changed += changed(&f32_values(var.as_tensor())?, before);
    }
    println!(
        "{total} matrix weights: one step moves {masters_moved} masters and {after_one} bf16 \
         weights; after {STEPS} steps pure bf16 changed {pure_changed}, mixed {mixed_changed}"
    );
    // One step: nearly every master moves; almost no bf16 weight does (only those near 0).
    assert!(
        masters_moved * 100 >= total * 95,
        "{masters_moved} of {total} masters moved"
    );
    assert!(
        after_one * 100 <= total * 20,
        "{after_one} of {total} moved in one step"
    );
    // Pure bf16 stays stuck; the masters carry most weights across a bf16 ulp.
    assert!(
        pure_changed * 100 <= total * 20,
        "pure bf16 changed {pure_changed} of {total}"
    );
    assert!(
        mixed_changed * 2 >= total,
        "mixed precision changed only {mixed_changed} of {total}"
    );
    assert!(mixed_changed > 3 * pure_changed);
    Ok(())
}
