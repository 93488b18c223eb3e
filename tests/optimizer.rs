//! The optimiser trap: candle-nn's `opt.backward_step(&loss)` cannot see the gradients of
//! checkpointed weights. It fails on the step where it would have skipped them, and
//! `ckpt.backward_step(&mut opt, &loss)` steps every weight as the plain graph does.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use checkpoint_runtime::{Checkpointer, Error, Mode, Policy};
use checkpoint_tests::init::Init;
use checkpoint_tests::mlp::MlpBlock;

/// A checkpointed MLP stack and a plain head after it: both kinds of weight in one model.
struct Model {
    layers: Vec<MlpBlock>,
    head: Var,
}

impl Model {
    fn new(seed: u64) -> Result<Self> {
        let mut init = Init::new(seed);
        let layers = (0..3)
            .map(|_| MlpBlock::new(8, &mut init, DType::F32, &Device::Cpu))
            .collect::<Result<Vec<_>>>()?;
        let head = init.var((8, 1), 0.5, DType::F32, &Device::Cpu)?;
        Ok(Self { layers, head })
    }

    fn vars(&self) -> Vec<Var> {
        let mut vars: Vec<Var> = self.layers.iter().flat_map(|l| l.vars().to_vec()).collect();
        vars.push(self.head.clone());
        vars
    }

    fn loss(&self, ckpt: &Checkpointer, x: &Tensor) -> checkpoint_runtime::Result<Tensor> {
        let h = ckpt.run_stack(x, self.layers.iter().map(|l| (l, ())))?;
        Ok(h.matmul(self.head.as_tensor())?.sqr()?.mean_all()?)
    }

    fn weights(&self) -> Result<Vec<Vec<f32>>> {
        self.vars()
            .iter()
            .map(|v| v.as_tensor().flatten_all()?.to_vec1::<f32>())
            .collect()
    }
}

fn adamw(model: &Model) -> Result<AdamW> {
    AdamW::new(
        model.vars(),
        ParamsAdamW {
            lr: 1e-2,
            ..ParamsAdamW::default()
        },
    )
}

fn input() -> Result<Tensor> {
    Init::new(99).uniform((4, 8), 1.0, DType::F32, &Device::Cpu)
}

#[test]
fn adamw_backward_step_fails_on_the_first_step_and_steps_nothing() -> Result<()> {
    let x = input()?;
    for mode in [Mode::Recompute, Mode::OffloadHost, Mode::OffloadDisk] {
        let model = Model::new(1)?;
        let mut opt = adamw(&model)?;
        let before = model.weights()?;
        let ckpt = Checkpointer::new(Policy::new(mode));
        let loss = model.loss(&ckpt, &x)?;
        let err = opt
            .backward_step(&loss)
            .expect_err("candle-nn's backward_step would skip the checkpointed weights");
        let msg = err.to_string();
        assert!(
            msg.contains("layer 0 (`MlpBlock::forward`)")
                && msg.contains(&format!("mode {mode}"))
                && msg.contains("ckpt.backward_step(&mut opt, &loss)"),
            "{msg}"
        );
        // Not one weight moved, the plain head included: the optimizer never stepped.
        assert_eq!(model.weights()?, before, "{mode}");
    }
    Ok(())
}

/// Every weight's values, in a fixed order.
type Weights = Vec<Vec<f32>>;

#[test]
fn ckpt_backward_step_updates_every_weight_as_mode_none_does() -> Result<()> {
    let x = input()?;
    let train = |mode: Mode| -> checkpoint_runtime::Result<(Weights, Weights)> {
        let model = Model::new(1)?;
        let initial = model.weights()?;
        let mut opt = adamw(&model)?;
        let ckpt = Checkpointer::new(Policy::new(mode));
        for _ in 0..3 {
            let loss = model.loss(&ckpt, &x)?;
            ckpt.backward_step(&mut opt, &loss)?;
        }
        Ok((initial, model.weights()?))
    };
    let (initial, plain) = train(Mode::None)?;
    // Every weight moved in the plain run: the comparison below covers each one.
    for (i, (a, b)) in initial.iter().zip(&plain).enumerate() {
        assert_ne!(a, b, "weight {i} did not move under Mode::None");
    }
    for mode in [Mode::Recompute, Mode::OffloadHost, Mode::OffloadDisk] {
        let (_, stepped) = train(mode)?;
        assert_eq!(stepped, plain, "{mode}: weights differ from Mode::None's");
    }
    // Candle-nn's own call is the plain graph's step where nothing is checkpointed.
    let model = Model::new(1)?;
    let mut opt = adamw(&model)?;
    let ckpt = Checkpointer::new(Policy::none());
    for _ in 0..3 {
        opt.backward_step(&model.loss(&ckpt, &x)?)?;
    }
    assert_eq!(model.weights()?, plain);
    Ok(())
}

/// A failed backward hands the optimizer nothing: `ckpt.backward_step` propagates the error
/// and the weights stay where they were.
#[test]
fn a_failed_backward_steps_nothing() -> Result<()> {
    let x = input()?;
    let model = Model::new(2)?;
    let mut opt = adamw(&model)?;
    let before = model.weights()?;
    let ckpt = Checkpointer::new(Policy::recompute());
    let loss = model.loss(&ckpt, &x)?;
    ckpt.backward_step(&mut opt, &loss)?;
    let after_one = model.weights()?;
    assert_ne!(after_one, before);
    let err = ckpt
        .backward_step(&mut opt, &loss)
        .expect_err("the stack's boundaries were released by the first backward");
    assert!(matches!(err, Error::BackwardTwice { .. }), "{err:?}");
    assert_eq!(model.weights()?, after_one);
    Ok(())
}
