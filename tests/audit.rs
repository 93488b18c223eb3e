//! The gradient audit names every trainable variable that a backward left without a gradient:
//! here the weights behind candle-nn's fused `ops::rms_norm`, which returns an untracked
//! tensor, and not those behind `ops::rms_norm_slow`.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::ops::{rms_norm, rms_norm_slow};
use candle_nn::{Linear, VarBuilder, VarMap};
use checkpoint_runtime::{Checkpointer, Error, GradientAudit, Layer, Mode, Policy};

/// `x + rms_norm(proj(x))`, with the fused or the differentiable norm.
#[derive(Clone)]
struct Block {
    proj: Linear,
    norm: Tensor,
    fused: bool,
}

impl Block {
    fn new(vb: &VarBuilder<'_>, fused: bool) -> Result<Self> {
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.3,
        };
        Ok(Self {
            proj: Linear::new(vb.get_with_hints((8, 8), "proj.weight", init)?, None),
            norm: vb.get_with_hints(8, "norm.weight", candle_nn::Init::Const(1.0))?,
            fused,
        })
    }
}

impl Layer for Block {
    fn forward_checkpointed(&self, x: &Tensor, (): &()) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        let h = if self.fused {
            rms_norm(&h, &self.norm, 1e-6)?
        } else {
            rms_norm_slow(&h, &self.norm, 1e-6)?
        };
        x + h
    }
}

#[test]
fn a_layer_using_the_fused_rms_norm_is_named_and_one_using_rms_norm_slow_is_not() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    // The fused layer sits between two differentiable ones: the residual still carries the
    // gradient past it, so only its own weights go without.
    let layers = [
        Block::new(&vb.pp("layers.0"), false)?,
        Block::new(&vb.pp("layers.1"), true)?,
        Block::new(&vb.pp("layers.2"), false)?,
    ];
    let x = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu)?;
    for mode in [Mode::None, Mode::Recompute, Mode::OffloadDisk] {
        let ckpt = Checkpointer::new(Policy::new(mode));
        let y = ckpt.run_stack(&x, layers.iter().map(|l| (l, ())))?;
        let grads = ckpt.backward(&y.sqr()?.mean_all()?)?;
        let audit = GradientAudit::of_varmap(&grads, &varmap)?;
        assert_eq!(audit.checked, 6, "{mode}");
        assert_eq!(
            audit.missing,
            ["layers.1.norm.weight", "layers.1.proj.weight"],
            "{mode}: {audit}"
        );
        assert!(audit.zero.is_empty(), "{mode}: {audit}");
        let report = audit.to_string();
        assert!(
            report.contains("2 got no gradient")
                && report.contains("no gradient: layers.1.proj.weight")
                && report.contains("rms_norm_slow"),
            "{report}"
        );
        let err = audit
            .into_result()
            .expect_err("two variables without gradient");
        assert!(matches!(err, Error::IncompleteGradients(_)), "{err:?}");
    }
    Ok(())
}

#[test]
fn a_model_without_fused_ops_passes_the_audit() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let layers = [
        Block::new(&vb.pp("layers.0"), false)?,
        Block::new(&vb.pp("layers.1"), false)?,
    ];
    let x = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu)?;
    let ckpt = Checkpointer::new(Policy::recompute());
    let y = ckpt.run_stack(&x, layers.iter().map(|l| (l, ())))?;
    let grads = ckpt.backward(&y.sqr()?.mean_all()?)?;
    let audit = GradientAudit::of_varmap(&grads, &varmap)?;
    assert!(audit.is_complete(), "{audit}");
    assert_eq!(audit.checked, 4);
    audit.into_result()?;
    Ok(())
}
