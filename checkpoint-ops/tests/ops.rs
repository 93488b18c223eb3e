//! Each fused op against the composite candle ops it replaces (values and gradients), against
//! finite differences where the composite could share a mistake, for determinism (twice, and on
//! one thread against three: bit-equal), and for its errors.

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Result, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use checkpoint_ops::{AdamW, cross_entropy, masked_softmax, rms_norm, rope, silu_mul};

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

const DEV: Device = Device::Cpu;

/// `sum(f(inputs) · r)` for a fixed random `r`, differentiated: the output and the gradient of
/// every input, flattened to f32.
fn value_and_grads(
    inputs: &[&Var],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Vec<Vec<f32>>> {
    let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&xs)?;
    let r = seeded(y.dims(), 7)?.to_dtype(y.dtype())?;
    let loss = (y.to_dtype(DType::F32)? * r.to_dtype(DType::F32)?)?.sum_all()?;
    let grads = loss.backward()?;
    let mut out = vec![flat(&y)?];
    for v in inputs {
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("an input received no gradient".into()))?;
        out.push(flat(g)?);
    }
    Ok(out)
}

/// A deterministic pseudo-random tensor (the tests must not depend on candle's RNG state).
fn seeded(dims: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            #[allow(clippy::cast_precision_loss)]
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            2.0 * u - 1.0
        })
        .collect();
    Tensor::from_vec(data, dims, &DEV)
}

fn var(dims: &[usize], seed: u64, scale: f64) -> Result<Var> {
    Var::from_tensor(&(seeded(dims, seed)? * scale)?)
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(a, b)| {
            assert_eq!(a.len(), b.len());
            a.iter().zip(b).map(|(a, b)| (a - b).abs())
        })
        .fold(0.0, f32::max)
}

/// The error's message without the backtrace candle appends when `RUST_BACKTRACE` is set.
fn message(err: Option<candle_core::Error>) -> Option<String> {
    err.map(|e| e.to_string().lines().next().unwrap_or_default().to_owned())
}

fn bits(a: &[Vec<f32>]) -> Vec<Vec<u32>> {
    a.iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// Runs `f` twice on the global pool and once each on pools of one and three threads; all four
/// results must be bit-equal.
fn assert_deterministic(f: impl Fn() -> Result<Vec<Vec<f32>>> + Sync) -> TestResult {
    let first = bits(&f()?);
    assert_eq!(first, bits(&f()?), "two runs differ");
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        assert_eq!(
            first,
            bits(&pool.install(&f)?),
            "{threads} thread(s) differ"
        );
    }
    Ok(())
}

/// Central finite differences of `sum(f(x) · r)` at a few elements of `x`, against the
/// gradient the op computed.
fn check_finite_differences(
    x: &Var,
    grad: &[f32],
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> TestResult {
    let base = flat(x.as_tensor())?;
    let r = {
        let y = f(x.as_tensor())?;
        seeded(y.dims(), 7)?
    };
    let loss = |data: &[f32]| -> Result<f64> {
        let t = Tensor::from_slice(data, x.dims(), &DEV)?;
        let y = f(&t)?.to_dtype(DType::F32)?;
        Ok(f64::from((y * &r)?.sum_all()?.to_scalar::<f32>()?))
    };
    let h = 1e-2f32;
    for k in (0..base.len()).step_by(base.len() / 7 + 1) {
        let (mut plus, mut minus) = (base.clone(), base.clone());
        plus[k] += h;
        minus[k] -= h;
        let numeric = (loss(&plus)? - loss(&minus)?) / (2.0 * f64::from(h));
        let analytic = f64::from(grad[k]);
        let err = (numeric - analytic).abs() / analytic.abs().max(1.0);
        assert!(
            err < 5e-3,
            "element {k}: numeric {numeric}, analytic {analytic}"
        );
    }
    Ok(())
}

// ---- rms_norm ---------------------------------------------------------------------------------

fn rms_inputs() -> Result<(Var, Var)> {
    Ok((var(&[3, 5, 48], 1, 2.0)?, var(&[48], 2, 1.0)?))
}

#[test]
fn rms_norm_matches_the_composite_ops_and_their_gradients() -> TestResult {
    let (x, w) = rms_inputs()?;
    let fused = value_and_grads(&[&x, &w], &|t| rms_norm(&t[0], &t[1], 1e-6))?;
    let composite = value_and_grads(&[&x, &w], &|t| {
        candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-6)
    })?;
    let diff = max_abs_diff(&fused, &composite);
    assert!(diff < 1e-5, "max |diff| {diff}");
    check_finite_differences(&x, &fused[1], &|t| rms_norm(t, w.as_tensor(), 1e-6))?;
    check_finite_differences(&w, &fused[2], &|t| rms_norm(x.as_tensor(), t, 1e-6))
}

#[test]
fn rms_norm_in_bf16_is_close_to_f32() -> TestResult {
    let (x, w) = rms_inputs()?;
    let f32_out = flat(&rms_norm(&x, &w, 1e-6)?)?;
    let bf16 = rms_norm(&x.to_dtype(DType::BF16)?, &w.to_dtype(DType::BF16)?, 1e-6)?;
    assert_eq!(bf16.dtype(), DType::BF16);
    let diff = max_abs_diff(&[f32_out], &[flat(&bf16)?]);
    assert!(diff < 0.05, "max |diff| {diff}");
    Ok(())
}

#[test]
fn rms_norm_is_deterministic() -> TestResult {
    // Enough rows for several partial sums of the weight gradient.
    let (x, w) = (var(&[300, 64], 3, 1.0)?, var(&[64], 4, 1.0)?);
    assert_deterministic(|| value_and_grads(&[&x, &w], &|t| rms_norm(&t[0], &t[1], 1e-6)))
}

#[test]
fn rms_norm_refuses_a_misshapen_weight() -> TestResult {
    let (x, _) = rms_inputs()?;
    let err = rms_norm(&x, &Tensor::ones(47, DType::F32, &DEV)?, 1e-6).err();
    assert_eq!(
        message(err).as_deref(),
        Some("rms_norm: `weight` has shape [47] but `xs` ends in 48; the weight must be (48,)")
    );
    let err = rms_norm(&x, &Tensor::ones(48, DType::BF16, &DEV)?, 1e-6).err();
    assert_eq!(
        message(err).as_deref(),
        Some(
            "rms_norm: `weight` is BF16 but `xs` is F32; convert one with `to_dtype` so they match"
        )
    );
    Ok(())
}

// ---- rope -------------------------------------------------------------------------------------

/// `(b, h, t, d)` as attention produces it: a transposed, non-contiguous view.
fn rope_inputs(t_max: usize) -> Result<(Var, Tensor, Tensor)> {
    let (t, half) = (6, 4);
    let x = var(&[2, t, 3, 2 * half], 5, 1.0)?;
    let angles = (seeded(&[t_max, half], 6)? * 3.0)?;
    Ok((x, angles.cos()?, angles.sin()?))
}

#[test]
fn rope_matches_rope_slow_and_its_gradient() -> TestResult {
    let (x, cos, sin) = rope_inputs(6)?;
    let fused = value_and_grads(&[&x], &|t| rope(&t[0].transpose(1, 2)?, &cos, &sin))?;
    let composite = value_and_grads(&[&x], &|t| {
        candle_nn::rotary_emb::rope_slow(&t[0].transpose(1, 2)?.contiguous()?, &cos, &sin)
    })?;
    let diff = max_abs_diff(&fused, &composite);
    assert!(diff < 1e-6, "max |diff| {diff}");
    Ok(())
}

#[test]
fn rope_uses_the_first_rows_of_longer_tables() -> TestResult {
    let (x, cos, sin) = rope_inputs(10)?;
    let xs = x.transpose(1, 2)?;
    let long = flat(&rope(&xs, &cos, &sin)?)?;
    let exact = flat(&rope(&xs, &cos.narrow(0, 0, 6)?, &sin.narrow(0, 0, 6)?)?)?;
    assert_eq!(bits(&[long]), bits(&[exact]));
    Ok(())
}

#[test]
fn rope_is_deterministic() -> TestResult {
    let (x, cos, sin) = rope_inputs(6)?;
    assert_deterministic(|| value_and_grads(&[&x], &|t| rope(&t[0], &cos, &sin)))
}

#[test]
fn rope_refuses_bad_tables() -> TestResult {
    let (x, cos, sin) = rope_inputs(6)?;
    let err = rope(&x, &cos.narrow(0, 0, 2)?, &sin).err();
    assert_eq!(
        message(err).as_deref(),
        Some(
            "rope: `cos` has shape [2, 4]; it must be (t_max, 4) with t_max >= 3, the sequence \
             length of `xs`"
        )
    );
    let trained = Var::from_tensor(&cos)?;
    let err = rope(&x, &trained, &sin).err();
    assert_eq!(
        message(err).as_deref(),
        Some(
            "rope: `cos` requires a gradient, which this op does not compute; pass a detached \
             tensor (`detach()`) or use the composite candle ops"
        )
    );
    Ok(())
}

// ---- masked_softmax ---------------------------------------------------------------------------

/// Causal, with the last key of batch 1 masked as padding (`f32::MIN`, as the Qwen2 mask).
fn softmax_mask(b: usize, t: usize) -> Result<Tensor> {
    let data: Vec<f32> = (0..b * t * t)
        .map(|k| {
            let (bi, i, j) = (k / (t * t), k / t % t, k % t);
            if j > i || (bi == 1 && j == t - 1) {
                f32::MIN
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(data, (b, 1, t, t), &DEV)
}

#[test]
fn masked_softmax_matches_the_composite_ops_and_their_gradient() -> TestResult {
    let (b, h, t) = (2, 3, 7);
    let scores = var(&[b, h, t, t], 8, 4.0)?;
    let mask = softmax_mask(b, t)?;
    let scale = 0.35;
    for mask in [Some(&mask), None] {
        let fused = value_and_grads(&[&scores], &|s| masked_softmax(&s[0], mask, scale))?;
        let composite = value_and_grads(&[&scores], &|s| {
            let mut xs = (&s[0] * scale)?;
            if let Some(mask) = mask {
                xs = xs.broadcast_add(mask)?;
            }
            candle_nn::ops::softmax(&xs, D::Minus1)
        })?;
        let diff = max_abs_diff(&fused, &composite);
        assert!(diff < 1e-6, "mask {}: max |diff| {diff}", mask.is_some());
    }
    Ok(())
}

#[test]
fn masked_softmax_in_bf16_returns_bf16_close_to_f32() -> TestResult {
    let scores = seeded(&[2, 2, 5, 5], 9)?;
    let mask = softmax_mask(2, 5)?;
    let f32_out = flat(&masked_softmax(&scores, Some(&mask), 1.0)?)?;
    let bf16 = masked_softmax(&scores.to_dtype(DType::BF16)?, Some(&mask), 1.0)?;
    assert_eq!(bf16.dtype(), DType::BF16);
    let diff = max_abs_diff(&[f32_out], &[flat(&bf16)?]);
    assert!(diff < 1e-2, "max |diff| {diff}");
    Ok(())
}

#[test]
fn masked_softmax_is_deterministic() -> TestResult {
    let scores = var(&[2, 3, 40, 40], 10, 4.0)?;
    let mask = softmax_mask(2, 40)?;
    assert_deterministic(|| {
        value_and_grads(&[&scores], &|s| masked_softmax(&s[0], Some(&mask), 0.5))
    })
}

#[test]
fn masked_softmax_refuses_a_mask_that_does_not_broadcast() -> TestResult {
    let scores = seeded(&[2, 3, 5, 5], 11)?;
    let err = masked_softmax(&scores, Some(&seeded(&[3, 1, 5, 5], 12)?), 1.0).err();
    assert_eq!(
        message(err).as_deref(),
        Some(
            "masked_softmax: `mask` has shape [3, 1, 5, 5], which does not broadcast to the \
             scores' [2, 3, 5, 5]; give it size 1 or the scores' size in each dimension"
        )
    );
    Ok(())
}

// ---- silu_mul ---------------------------------------------------------------------------------

#[test]
fn silu_mul_matches_the_composite_ops_and_their_gradients() -> TestResult {
    let (gate, up) = (var(&[4, 9, 33], 13, 4.0)?, var(&[4, 9, 33], 14, 1.0)?);
    let fused = value_and_grads(&[&gate, &up], &|t| silu_mul(&t[0], &t[1]))?;
    let composite = value_and_grads(&[&gate, &up], &|t| t[0].silu()? * &t[1])?;
    let diff = max_abs_diff(&fused, &composite);
    assert!(diff < 1e-6, "max |diff| {diff}");
    check_finite_differences(&gate, &fused[1], &|t| silu_mul(t, up.as_tensor()))
}

#[test]
fn silu_mul_is_deterministic() -> TestResult {
    // Larger than one parallel task (2^14 elements).
    let (gate, up) = (var(&[5, 100, 90], 15, 4.0)?, var(&[5, 100, 90], 16, 1.0)?);
    assert_deterministic(|| value_and_grads(&[&gate, &up], &|t| silu_mul(&t[0], &t[1])))
}

#[test]
fn silu_mul_refuses_different_shapes() -> TestResult {
    let err = silu_mul(&seeded(&[2, 3], 1)?, &seeded(&[3, 2], 2)?).err();
    assert_eq!(
        message(err).as_deref(),
        Some("silu_mul: `gate` has shape [2, 3] but `up` [3, 2]; they must be equal")
    );
    Ok(())
}

// ---- cross_entropy ----------------------------------------------------------------------------

fn ce_targets(n: usize, vocab: usize) -> Result<Tensor> {
    let data: Vec<i64> = (0..n)
        .map(|i| {
            if i % 5 == 3 {
                checkpoint_ops::IGNORE_INDEX
            } else {
                i64::try_from(i * 37 % vocab).unwrap_or(0)
            }
        })
        .collect();
    Tensor::from_vec(data, n, &DEV)
}

/// Today's composite: f32 copy, log-softmax, gather, weighted mean.
fn composite_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets: Vec<i64> = targets.to_vec1()?;
    let n = targets.len();
    let (index, weight): (Vec<u32>, Vec<f32>) = targets
        .iter()
        .map(|&y| u32::try_from(y).map_or((0, 0.0), |id| (id, 1.0)))
        .unzip();
    let count = f64::from(weight.iter().sum::<f32>());
    let index = Tensor::from_vec(index, (n, 1), &DEV)?;
    let weight = Tensor::from_vec(weight, n, &DEV)?;
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = log_probs.gather(&index, 1)?.squeeze(1)?;
    (picked * weight)?.sum_all()?.neg()? / count
}

#[test]
fn cross_entropy_matches_the_composite_loss_and_its_gradient() -> TestResult {
    let (n, vocab) = (23, 301);
    let logits = var(&[n, vocab], 17, 5.0)?;
    let targets = ce_targets(n, vocab)?;
    let fused = value_and_grads(&[&logits], &|t| cross_entropy(&t[0], &targets))?;
    let composite = value_and_grads(&[&logits], &|t| composite_cross_entropy(&t[0], &targets))?;
    // The loss (about 7) differs in its last bits: the fused op sums the rows in f64.
    let diff = max_abs_diff(&fused, &composite);
    assert!(diff < 1e-5, "max |diff| {diff}");
    let diff = max_abs_diff(&fused[1..], &composite[1..]);
    assert!(diff < 1e-7, "gradient max |diff| {diff}");
    // Ignored rows get exactly zero.
    assert!(fused[1][3 * vocab..4 * vocab].iter().all(|&g| g == 0.0));
    check_finite_differences(&logits, &fused[1], &|t| cross_entropy(t, &targets))
}

#[test]
fn cross_entropy_of_bf16_logits_has_a_bf16_gradient_close_to_f32() -> TestResult {
    let (n, vocab) = (9, 64);
    let half = Var::from_tensor(&(seeded(&[n, vocab], 18)? * 3.0)?.to_dtype(DType::BF16)?)?;
    let targets = ce_targets(n, vocab)?;
    // The same (rounded) logits in f32: only the gradient's rounding to bf16 differs.
    let logits = Var::from_tensor(&half.to_dtype(DType::F32)?)?;
    let reference = cross_entropy(&logits, &targets)?.backward()?;
    let reference = reference.get(logits.as_tensor()).ok_or("no gradient")?;
    let loss = cross_entropy(&half, &targets)?;
    assert_eq!(loss.dtype(), DType::F32);
    let grads = loss.backward()?;
    let g = grads.get(half.as_tensor()).ok_or("no gradient")?;
    assert_eq!(g.dtype(), DType::BF16);
    let diff = max_abs_diff(&[flat(reference)?], &[flat(g)?]);
    // |g| <= 1 / count (about 0.14 here), rounded to bf16 (8 bits): up to 5e-4.
    assert!(diff < 1e-3, "max |diff| {diff}");
    Ok(())
}

#[test]
fn cross_entropy_is_deterministic() -> TestResult {
    let (n, vocab) = (37, 500);
    let logits = var(&[n, vocab], 19, 5.0)?;
    let targets = ce_targets(n, vocab)?;
    assert_deterministic(|| {
        let loss = cross_entropy(&logits, &targets)?;
        let grads = loss.backward()?;
        let g = grads
            .get(logits.as_tensor())
            .ok_or(candle_core::Error::Msg("no gradient".into()))?;
        Ok(vec![flat(&loss)?, flat(g)?])
    })
}

#[test]
fn cross_entropy_refuses_bad_targets() -> TestResult {
    let logits = seeded(&[2, 4], 1)?;
    let err = cross_entropy(&logits, &Tensor::new(&[1i64, 4], &DEV)?).err();
    assert_eq!(
        message(err).as_deref(),
        Some(
            "cross_entropy: target 4 (row 1) is outside the vocabulary 0..4; use -100 for rows \
             that are not counted"
        )
    );
    let err = cross_entropy(&logits, &Tensor::new(&[1f32, 2.0], &DEV)?).err();
    assert_eq!(
        message(err).as_deref(),
        Some("cross_entropy: `targets` has dtype F32; use an integer dtype (u32 or i64)")
    );
    let err = cross_entropy(&logits, &Tensor::new(&[-100i64, -100], &DEV)?).err();
    assert_eq!(
        message(err).as_deref(),
        Some("cross_entropy: every target is -100: there is no token to predict")
    );
    Ok(())
}

// ---- AdamW ------------------------------------------------------------------------------------

/// Three steps of `opt` on `sum((w − target)²)` plus `sum(w)` (so every element moves).
fn train<O: Optimizer>(w: &Var, opt: &mut O) -> Result<()> {
    let target = seeded(w.dims(), 21)?.to_dtype(w.dtype())?;
    for _ in 0..3 {
        let loss = ((w.as_tensor() - &target)?.sqr()?.sum_all()? + w.as_tensor().sum_all()?)?;
        opt.backward_step(&loss)?;
    }
    Ok(())
}

fn adam_params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 0.05,
        weight_decay: 0.1,
        ..ParamsAdamW::default()
    }
}

#[test]
fn adamw_matches_candle_nn_adamw() -> TestResult {
    let (a, b) = (var(&[7, 300], 20, 1.0)?, var(&[7, 300], 20, 1.0)?);
    train(&a, &mut AdamW::new(vec![a.clone()], adam_params())?)?;
    train(
        &b,
        &mut candle_nn::AdamW::new(vec![b.clone()], adam_params())?,
    )?;
    let diff = max_abs_diff(&[flat(&a)?], &[flat(&b)?]);
    assert!(diff < 1e-6, "max |diff| {diff}");
    assert!(max_abs_diff(&[flat(&a)?], &[flat(&seeded(&[7, 300], 20)?)?]) > 0.1);
    Ok(())
}

#[test]
fn adamw_keeps_f32_master_weights_for_bf16_parameters() -> TestResult {
    // Updates of 1e-4 on weights near 1 are below bf16's resolution (2^-7): a bf16 optimizer
    // state would lose every one of them; the master copy follows the f32 run.
    let params = ParamsAdamW {
        lr: 1e-4,
        weight_decay: 0.0,
        ..ParamsAdamW::default()
    };
    let base = ((seeded(&[64], 22)? * 0.01)? + 1.0)?;
    let half = Var::from_tensor(&base.to_dtype(DType::BF16)?)?;
    let mut opt = AdamW::new(vec![half.clone()], params)?;
    // The f32 run started from the bf16-rounded values too.
    let full_from_half = Var::from_tensor(&half.to_dtype(DType::F32)?)?;
    train(&half, &mut opt)?;
    train(
        &full_from_half,
        &mut AdamW::new(vec![full_from_half.clone()], opt.params().clone())?,
    )?;
    let master = opt
        .master(&half)?
        .ok_or("a bf16 variable has no master copy")?;
    let diff = max_abs_diff(&[flat(&master)?], &[flat(&full_from_half)?]);
    assert!(diff < 1e-6, "master max |diff| {diff}");
    let rounded = flat(&master.to_dtype(DType::BF16)?)?;
    assert_eq!(bits(&[rounded]), bits(&[flat(&half)?]));
    Ok(())
}

#[test]
fn adamw_is_deterministic() -> TestResult {
    assert_deterministic(|| {
        let w = var(&[40, 1000], 23, 1.0)?;
        train(&w, &mut AdamW::new(vec![w.clone()], adam_params())?)?;
        Ok(vec![flat(&w)?])
    })
}

#[test]
fn adamw_refuses_bad_hyper_parameters() -> TestResult {
    let w = var(&[3], 1, 1.0)?;
    let params = ParamsAdamW {
        beta1: 1.0,
        ..ParamsAdamW::default()
    };
    let err = AdamW::new(vec![w], params).err();
    assert_eq!(
        message(err).as_deref(),
        Some(
            "adamw: hyper-parameters out of range (lr 0.001, beta1 1, beta2 0.999, eps 0.00000001, \
             weight decay 0.01); need lr >= 0, betas in [0, 1), eps > 0, weight decay >= 0"
        )
    );
    Ok(())
}

/// The gradients of `w` for the loss [`train`] uses, and those gradients in f32.
fn grads_of(w: &Var) -> Result<(GradStore, GradStore)> {
    let target = seeded(w.dims(), 24)?.to_dtype(w.dtype())?;
    let loss = ((w.as_tensor() - &target)?.sqr()?.sum_all()? + w.as_tensor().sum_all()?)?;
    let grads = loss.backward()?;
    let mut f32_grads = GradStore::default();
    if let Some(g) = grads.get(w.as_tensor()) {
        f32_grads.insert(w.as_tensor(), g.to_dtype(DType::F32)?);
    }
    Ok((grads, f32_grads))
}

#[test]
fn adamw_step_scaled_is_the_step_on_scaled_f32_gradients() -> TestResult {
    let scale = 0.37;
    let (a, b) = (var(&[7, 300], 25, 1.0)?, var(&[7, 300], 25, 1.0)?);
    let (mut opt_a, mut opt_b) = (
        AdamW::new(vec![a.clone()], adam_params())?,
        AdamW::new(vec![b.clone()], adam_params())?,
    );
    for _ in 0..3 {
        let (grads, _) = grads_of(&a)?;
        opt_a.step_scaled(&grads, scale)?;
        let (grads, _) = grads_of(&b)?;
        let mut scaled = GradStore::default();
        let g = grads.get(b.as_tensor()).ok_or("no gradient")?;
        #[allow(clippy::cast_possible_truncation)]
        scaled.insert(b.as_tensor(), (g * f64::from(scale as f32))?);
        opt_b.step(&scaled)?;
    }
    assert_eq!(bits(&[flat(&a)?]), bits(&[flat(&b)?]));
    // Scaling changes the step: the moments see the scaled gradients.
    let c = var(&[7, 300], 25, 1.0)?;
    let mut opt_c = AdamW::new(vec![c.clone()], adam_params())?;
    for _ in 0..3 {
        opt_c.step(&grads_of(&c)?.0)?;
    }
    assert_ne!(bits(&[flat(&a)?]), bits(&[flat(&c)?]));
    assert!(opt_a.step_scaled(&grads_of(&a)?.0, f64::NAN).is_err());
    Ok(())
}

#[test]
fn adamw_takes_f32_gradients_for_bf16_parameters() -> TestResult {
    let base = seeded(&[64], 26)?.to_dtype(DType::BF16)?;
    let (a, b) = (Var::from_tensor(&base)?, Var::from_tensor(&base)?);
    let (mut opt_a, mut opt_b) = (
        AdamW::new(vec![a.clone()], adam_params())?,
        AdamW::new(vec![b.clone()], adam_params())?,
    );
    opt_a.step(&grads_of(&a)?.0)?;
    opt_b.step(&grads_of(&b)?.1)?;
    assert_eq!(bits(&[flat(&a)?]), bits(&[flat(&b)?]));
    Ok(())
}

#[test]
fn adamw_restored_from_its_state_continues_exactly() -> TestResult {
    for dtype in [DType::F32, DType::BF16] {
        let base = seeded(&[5, 40], 27)?.to_dtype(dtype)?;
        let a = Var::from_tensor(&base)?;
        let mut opt_a = AdamW::new(vec![a.clone()], adam_params())?;
        opt_a.step(&grads_of(&a)?.0)?;
        let saved_state = opt_a.state(&a).ok_or("no state")?.copy()?;
        let saved_value = a.as_tensor().copy()?;
        let step = opt_a.step_count();
        opt_a.step(&grads_of(&a)?.0)?;

        // Another start, then the saved state: the same second step.
        let b = Var::from_tensor(&base.zeros_like()?)?;
        let mut opt_b = AdamW::new(vec![b.clone()], adam_params())?;
        b.set(&saved_value)?;
        opt_b.restore(step, [(&b, saved_state.clone())])?;
        assert_eq!(opt_b.step_count(), 1);
        opt_b.step(&grads_of(&b)?.0)?;
        assert_eq!(bits(&[flat(&a)?]), bits(&[flat(&b)?]), "{dtype:?}");

        let wrong = Tensor::zeros((1, 200), DType::F32, &DEV)?;
        let err = opt_b.restore(step, [(&b, wrong)]).err();
        assert!(
            message(err).is_some_and(|m| m.contains("restore")),
            "{dtype:?}"
        );
    }
    Ok(())
}
