//! Gradient parity: `recompute` gives the gradients of the plain graph (`none`) bit for bit.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use checkpoint_runtime::{Checkpointer, Kwargs, Layer, Mode, Policy};
use checkpoint_tests::block::{Block, BlockConfig, BlockKwargs};
use checkpoint_tests::compare::{max_abs_diff, max_grad_diff, rel_err};
use checkpoint_tests::init::Init;
use checkpoint_tests::mlp::MlpBlock;

const DEPTHS: [usize; 4] = [1, 2, 5, 8];

/// One training step's results: the stack output and the complete gradient store.
struct Step {
    output: Tensor,
    grads: GradStore,
}

/// Runs `layers` on `input` through an engine with `policy` and back-propagates a loss that
/// weighs every output element differently (so that no gradient is uniform).
fn step<L: Layer<K>, K: Kwargs + Clone>(
    policy: Policy,
    layers: &[L],
    kwargs: &K,
    input: &Tensor,
) -> Result<Step> {
    step_with(&Checkpointer::new(policy), layers, kwargs, input)
}

/// [`step`] through a given engine.
fn step_with<L: Layer<K>, K: Kwargs + Clone>(
    ckpt: &Checkpointer,
    layers: &[L],
    kwargs: &K,
    input: &Tensor,
) -> Result<Step> {
    let output = ckpt.run_stack(input, layers.iter().map(|l| (l, kwargs.clone())))?;
    let weights = Tensor::arange(
        0u32,
        u32::try_from(output.elem_count()).unwrap_or(0),
        input.device(),
    )?
    .to_dtype(output.dtype())?
    .reshape(output.shape())?
    .affine(1e-3, -0.5)?
    .cos()?;
    let loss = (&output * weights)?.sum_all()?;
    let grads = ckpt.backward(&loss)?;
    Ok(Step { output, grads })
}

/// Asserts that `recompute` (and `recompute` in segments of 2) reproduce `none` exactly.
fn assert_exact<L: Layer<K>, K: Kwargs + Clone>(
    layers: &[L],
    kwargs: &K,
    input: &Var,
    params: &[Var],
) -> Result<()> {
    let plain = step(Policy::none(), layers, kwargs, input.as_tensor())?;
    for policy in [Policy::recompute(), Policy::recompute().segments(2)] {
        let ckpt = step(policy.clone(), layers, kwargs, input.as_tensor())?;
        let depth = layers.len();
        assert_eq!(
            max_abs_diff(&plain.output, &ckpt.output)?,
            0.0,
            "output, depth {depth}, {policy:?}"
        );
        let gi = |s: &Step| s.grads.get(input.as_tensor()).cloned();
        let (a, b) = (gi(&plain), gi(&ckpt));
        let (a, b) = (
            a.expect("plain input gradient"),
            b.expect("checkpointed input gradient"),
        );
        assert_eq!(
            max_abs_diff(&a, &b)?,
            0.0,
            "input gradient, depth {depth}, {policy:?}"
        );
        assert_eq!(
            max_grad_diff(&plain.grads, &ckpt.grads, params)?,
            0.0,
            "parameter gradients, depth {depth}, {policy:?}"
        );
        // Complete and clean: exactly the input and every parameter, nothing else.
        assert_eq!(
            ckpt.grads.get_ids().count(),
            params.len() + 1,
            "store size, depth {depth}"
        );
    }
    Ok(())
}

/// `depth` layers made by `make` from one generator seeded with `seed`, and all their parameters.
fn stack<L>(
    depth: usize,
    seed: u64,
    mut make: impl FnMut(&mut Init) -> Result<L>,
    vars: impl Fn(&L) -> &[Var],
) -> Result<(Vec<L>, Vec<Var>)> {
    let mut init = Init::new(seed);
    let layers = (0..depth)
        .map(|_| make(&mut init))
        .collect::<Result<Vec<_>>>()?;
    let params = layers
        .iter()
        .flat_map(|l| vars(l).iter().cloned())
        .collect();
    Ok((layers, params))
}

fn mlp_stack(depth: usize, hidden: usize, dtype: DType) -> Result<(Vec<MlpBlock>, Vec<Var>)> {
    let make = |init: &mut Init| MlpBlock::new(hidden, init, dtype, &Device::Cpu);
    stack(depth, 7, make, MlpBlock::vars)
}

fn block_stack(depth: usize, cfg: BlockConfig, dtype: DType) -> Result<(Vec<Block>, Vec<Var>)> {
    let make = |init: &mut Init| Block::new(cfg, init, dtype, &Device::Cpu);
    stack(depth, 11, make, Block::vars)
}

#[test]
fn mlp_stack_recompute_matches_none_exactly() -> Result<()> {
    for depth in DEPTHS {
        let (layers, params) = mlp_stack(depth, 32, DType::F32)?;
        let x = Init::new(3).var((2, 5, 32), 1.0, DType::F32, &Device::Cpu)?;
        assert_exact(&layers, &(), &x, &params)?;
    }
    Ok(())
}

#[test]
fn qwen2_like_stack_recompute_matches_none_exactly() -> Result<()> {
    let cfg = BlockConfig::small(32);
    for depth in DEPTHS {
        let (layers, params) = block_stack(depth, cfg, DType::F32)?;
        let kwargs = BlockKwargs::new(&cfg, 6, DType::F32, &Device::Cpu)?;
        let x = Init::new(5).var((2, 6, 32), 1.0, DType::F32, &Device::Cpu)?;
        assert_exact(&layers, &kwargs, &x, &params)?;
    }
    Ok(())
}

/// bf16: CPU kernels are deterministic, so the stated tolerance is zero here too.
#[test]
fn qwen2_like_stack_bf16_recompute_matches_none_within_zero_tolerance() -> Result<()> {
    let cfg = BlockConfig::small(32);
    let (layers, params) = block_stack(4, cfg, DType::BF16)?;
    let kwargs = BlockKwargs::new(&cfg, 6, DType::BF16, &Device::Cpu)?;
    let x = Init::new(5).var((2, 6, 32), 1.0, DType::BF16, &Device::Cpu)?;
    assert_exact(&layers, &kwargs, &x, &params)
}

/// LoRA with frozen embeddings: the stack input needs no gradient, the parameters still do.
#[test]
fn parameters_get_gradients_when_the_input_is_frozen() -> Result<()> {
    let (layers, params) = mlp_stack(3, 16, DType::F32)?;
    let frozen = Init::new(9).uniform((2, 4, 16), 1.0, DType::F32, &Device::Cpu)?;
    let plain = step(Policy::none(), &layers, &(), &frozen)?;
    let ckpt = step(Policy::recompute(), &layers, &(), &frozen)?;
    assert_eq!(ckpt.grads.get_ids().count(), params.len());
    assert_eq!(max_grad_diff(&plain.grads, &ckpt.grads, &params)?, 0.0);
    Ok(())
}

/// A weight shared by two layers (and used outside the stack) gets the sum of all its uses.
#[test]
fn tied_weights_are_summed() -> Result<()> {
    let (mut layers, _) = mlp_stack(1, 16, DType::F32)?;
    layers.push(layers[0].clone()); // the same Vars twice in the stack
    let embed = Init::new(4).var((16, 16), 0.3, DType::F32, &Device::Cpu)?;
    let x = Init::new(5).uniform((3, 16), 1.0, DType::F32, &Device::Cpu)?;
    let run = |policy: Policy| -> Result<GradStore> {
        let ckpt = Checkpointer::new(policy);
        let h = x.matmul(embed.as_tensor())?; // embed used before the stack ...
        let y = ckpt.run_stack(&h, layers.iter().map(|l| (l, ())))?;
        let logits = y.matmul(&embed.as_tensor().t()?)?; // ... and tied as the head
        Ok(ckpt.backward(&logits.sqr()?.mean_all()?)?)
    };
    let (plain, ckpt) = (run(Policy::none())?, run(Policy::recompute())?);
    let mut params = layers[0].vars().to_vec();
    params.push(embed);
    assert_eq!(max_grad_diff(&plain, &ckpt, &params)?, 0.0);
    assert_eq!(ckpt.get_ids().count(), params.len());
    Ok(())
}

#[test]
fn two_stacks_in_one_graph_and_an_output_used_twice() -> Result<()> {
    let (layers, params) = mlp_stack(4, 16, DType::F32)?;
    let x = Init::new(5).var((2, 16), 1.0, DType::F32, &Device::Cpu)?;
    let run = |policy: Policy| -> Result<GradStore> {
        let ckpt = Checkpointer::new(policy);
        let a = ckpt.run_stack(x.as_tensor(), layers[..2].iter().map(|l| (l, ())))?;
        let b = ckpt.run_stack(&a, layers[2..].iter().map(|l| (l, ())))?;
        // `a` feeds the second stack and the loss directly.
        let loss = ((&a * &a)?.sum_all()? + b.tanh()?.sum_all()?)?;
        Ok(ckpt.backward(&loss)?)
    };
    let (plain, ckpt) = (run(Policy::none())?, run(Policy::recompute())?);
    let mut all = params;
    all.push(x);
    assert_eq!(max_grad_diff(&plain, &ckpt, &all)?, 0.0);
    Ok(())
}

#[test]
fn stacks_of_length_zero_and_one() -> Result<()> {
    let (layers, params) = mlp_stack(1, 8, DType::F32)?;
    let x = Init::new(5).var((2, 8), 1.0, DType::F32, &Device::Cpu)?;
    for mode in [Mode::None, Mode::Recompute] {
        let ckpt = Checkpointer::new(Policy::new(mode));
        let same = ckpt.run_stack(x.as_tensor(), std::iter::empty::<(&MlpBlock, ())>())?;
        assert_eq!(
            max_abs_diff(&same, x.as_tensor())?,
            0.0,
            "{mode}: empty stack is identity"
        );
        let grads = ckpt.backward(&same.sum_all()?)?;
        let ones = x.as_tensor().ones_like()?;
        assert_eq!(
            max_abs_diff(grads.get(x.as_tensor()).expect("input grad"), &ones)?,
            0.0
        );
    }
    let plain = step(Policy::none(), &layers, &(), x.as_tensor())?;
    let one = step(Policy::recompute(), &layers, &(), x.as_tensor())?;
    assert_eq!(max_grad_diff(&plain.grads, &one.grads, &params)?, 0.0);
    Ok(())
}

/// A keyword argument computed from a trainable tensor (a learned attention bias) passes its
/// gradient on. The layers' gradients stay exact; the bias's is summed per segment through
/// `tanh` rather than once after the sum, so it may differ in the last bits.
#[test]
fn trainable_keyword_arguments_get_their_gradients() -> Result<()> {
    let cfg = BlockConfig::small(32);
    let (layers, mut params) = block_stack(3, cfg, DType::F32)?;
    let x = Init::new(5).var((2, 6, 32), 1.0, DType::F32, &Device::Cpu)?;
    let bias = Init::new(6).var((6, 6), 0.5, DType::F32, &Device::Cpu)?;
    let base = BlockKwargs::new(&cfg, 6, DType::F32, &Device::Cpu)?;
    let kwargs = BlockKwargs {
        mask: (&base.mask + bias.as_tensor().tanh()?)?,
        ..base
    };
    let plain = step(Policy::none(), &layers, &kwargs, x.as_tensor())?;
    let ckpt = step(
        Policy::new(Mode::OffloadDisk).segments(2),
        &layers,
        &kwargs,
        x.as_tensor(),
    )?;
    params.push(x);
    assert_eq!(max_grad_diff(&plain.grads, &ckpt.grads, &params)?, 0.0);
    let grad = |s: &Step| {
        s.grads
            .get(bias.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::msg("no bias gradient"))
    };
    let err = rel_err(&grad(&ckpt)?, &grad(&plain)?)?;
    assert!(err < 1e-6, "bias gradient off by {err:e}");
    assert_eq!(ckpt.grads.get_ids().count(), params.len() + 1);
    Ok(())
}

/// A layer that runs a stack of its own through the same engine: the inner stack runs again
/// inside the outer stack's recomputed segments, and the gradients are still the plain graph's.
#[test]
fn a_stack_nested_in_a_layer_matches_none_exactly() -> Result<()> {
    #[derive(Clone)]
    struct Outer {
        inner: Vec<MlpBlock>,
        ckpt: Option<Checkpointer>,
    }
    impl Layer for Outer {
        fn forward_checkpointed(&self, x: &Tensor, (): &()) -> Result<Tensor> {
            match &self.ckpt {
                Some(ckpt) => Ok(ckpt.run_stack(x, self.inner.iter().map(|l| (l, ())))?),
                None => self
                    .inner
                    .iter()
                    .try_fold(x.clone(), |h, l| l.forward_checkpointed(&h, &())),
            }
        }
    }
    let (inner, params) = mlp_stack(6, 8, DType::F32)?;
    let x = Init::new(5).var((2, 8), 1.0, DType::F32, &Device::Cpu)?;
    let outers = |ckpt: Option<&Checkpointer>| -> Vec<Outer> {
        inner
            .chunks(2)
            .map(|c| Outer {
                inner: c.to_vec(),
                ckpt: ckpt.cloned(),
            })
            .collect()
    };
    let plain = step(Policy::none(), &outers(None), &(), x.as_tensor())?;
    for policy in [Policy::recompute(), Policy::new(Mode::OffloadDisk)] {
        let ckpt = Checkpointer::new(policy.clone());
        let nested = step_with(&ckpt, &outers(Some(&ckpt)), &(), x.as_tensor())?;
        assert_eq!(
            max_grad_diff(&plain.grads, &nested.grads, &params)?,
            0.0,
            "{policy:?}"
        );
        assert_eq!(nested.grads.get_ids().count(), params.len() + 1);
    }
    Ok(())
}
