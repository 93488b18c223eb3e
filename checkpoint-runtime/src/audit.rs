//! Which trainable variables a backward pass left without a gradient.
//!
//! candle reports nothing when an op cuts the graph: several fused candle-nn ops return
//! untracked tensors, and every weight behind them then simply gets no gradient, so an
//! optimizer silently never updates it. Auditing the gradient store after the first backward
//! names those weights.

use std::fmt;

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};
use candle_nn::VarMap;

use crate::error::{Error, Result};
use crate::sync::lock;

/// The trainable variables a backward pass gave no gradient, or one that is zero everywhere.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use checkpoint_runtime::GradientAudit;
///
/// # fn main() -> checkpoint_runtime::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let used = vb.get_with_hints(2, "used", candle_nn::Init::Const(1.0))?;
/// let _unused = vb.get_with_hints(2, "unused", candle_nn::Init::Const(1.0))?;
/// let loss = (used * Tensor::new(&[1f32, 2.0], &Device::Cpu)?)?.sum_all()?;
/// let audit = GradientAudit::of_varmap(&loss.backward()?, &varmap)?;
/// assert_eq!(audit.missing, ["unused"]);
/// assert!(audit.into_result().is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GradientAudit {
    /// How many variables were checked.
    pub checked: usize,
    /// The variables the store holds no gradient for, by name.
    pub missing: Vec<String>,
    /// The variables whose gradient is zero everywhere, by name.
    pub zero: Vec<String>,
}

impl GradientAudit {
    /// Audits every variable of `varmap`, named as in the map, in name order.
    ///
    /// # Errors
    /// If candle cannot reduce a gradient (a device error).
    pub fn of_varmap(grads: &GradStore, varmap: &VarMap) -> Result<Self> {
        let mut vars: Vec<(String, Var)> = lock(varmap.data())
            .iter()
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect();
        vars.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Self::of_named(grads, vars.iter().map(|(name, var)| (name.as_str(), var)))
    }

    /// Audits the given variables under the given names, in that order.
    ///
    /// # Errors
    /// If candle cannot reduce a gradient (a device error).
    pub fn of_named<'a, S: fmt::Display>(
        grads: &GradStore,
        vars: impl IntoIterator<Item = (S, &'a Var)>,
    ) -> Result<Self> {
        let mut audit = Self::default();
        for (name, var) in vars {
            audit.checked += 1;
            match grads.get(var.as_tensor()) {
                None => audit.missing.push(name.to_string()),
                Some(grad) => {
                    let largest = grad
                        .abs()?
                        .max_all()?
                        .to_dtype(DType::F32)?
                        .to_scalar::<f32>()?;
                    // NaN compares unequal: a non-finite gradient is not reported as zero.
                    if largest == 0.0 {
                        audit.zero.push(name.to_string());
                    }
                }
            }
        }
        Ok(audit)
    }

    /// Audits unnamed variables, each named by its position and shape (`variable 3 [64, 64]`).
    ///
    /// # Errors
    /// If candle cannot reduce a gradient (a device error).
    pub fn of_vars(grads: &GradStore, vars: &[Var]) -> Result<Self> {
        Self::of_named(
            grads,
            vars.iter()
                .enumerate()
                .map(|(i, var)| (format!("variable {i} {:?}", var.dims()), var)),
        )
    }

    /// Whether every variable got a gradient that is nonzero somewhere.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.zero.is_empty()
    }

    /// `Ok` when every variable got a gradient, [`Error::IncompleteGradients`] otherwise.
    /// All-zero gradients are reported by [`Display`](fmt::Display) but are no error: they can
    /// be legitimate on one step (a LoRA `A` whose `B` starts at zero).
    ///
    /// # Errors
    /// [`Error::IncompleteGradients`], naming every variable without a gradient.
    pub fn into_result(self) -> Result<()> {
        if self.missing.is_empty() {
            Ok(())
        } else {
            Err(Error::IncompleteGradients(Box::new(self)))
        }
    }
}

impl fmt::Display for GradientAudit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let checked = self.checked;
        if self.is_complete() {
            return write!(
                f,
                "gradient audit: all {checked} trainable variables got a nonzero gradient"
            );
        }
        write!(
            f,
            "gradient audit: of {checked} trainable variables, {} got no gradient and {} an \
             all-zero one:",
            self.missing.len(),
            self.zero.len()
        )?;
        for name in &self.missing {
            write!(f, "\n  no gradient: {name}")?;
        }
        for name in &self.zero {
            write!(f, "\n  all zero:    {name}")?;
        }
        if !self.missing.is_empty() {
            write!(
                f,
                "\nNo gradient: something on the variable's path to the loss cuts the graph. \
                 candle-nn's fused ops return untracked tensors (ops::rms_norm, \
                 RmsNorm::forward, ops::layer_norm, LayerNorm::forward, ops::softmax_last_dim, \
                 rotary_emb::rope, rope_i, rope_thd, ops::sdpa): use ops::rms_norm_slow or \
                 RmsNorm::forward_diff, ops::softmax, rope_slow. So do `detach()` and \
                 `Var::as_detached_tensor`. A variable the loss does not use belongs out of the \
                 optimizer"
            )?;
        }
        if !self.zero.is_empty() {
            write!(
                f,
                "\nAll zero: the variable's contribution is multiplied by zero (a zero-initialised \
                 weight after it, such as LoRA's B on the first step, or a dead activation)"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn names_missing_and_all_zero_gradients_in_order() -> Result<()> {
        let dev = Device::Cpu;
        let used = Var::new(&[1f32, 2.0], &dev)?;
        let zeroed = Var::new(&[3f32, 4.0], &dev)?;
        let unused = Var::new(&[5f32], &dev)?;
        // `z - z`: the two paths' gradients cancel, leaving an all-zero one.
        let cancelled = (zeroed.as_tensor() - zeroed.as_tensor())?;
        let loss = (used.as_tensor().sum_all()? + cancelled.sum_all()?)?;
        let grads = loss.backward()?;
        let audit = GradientAudit::of_named(
            &grads,
            [("used", &used), ("zeroed", &zeroed), ("unused", &unused)],
        )?;
        assert_eq!(audit.checked, 3);
        assert_eq!(audit.missing, ["unused"]);
        assert_eq!(audit.zero, ["zeroed"]);
        let text = audit.to_string();
        assert!(
            text.contains("no gradient: unused") && text.contains("all zero:    zeroed"),
            "{text}"
        );
        let err = audit.into_result().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("rms_norm_slow")));

        let unnamed = GradientAudit::of_vars(&grads, &[used, unused])?;
        assert_eq!(unnamed.missing, ["variable 1 [1]"]);
        Ok(())
    }

    #[test]
    fn a_complete_store_passes() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, -2.0], &dev)?;
        let grads = (w.as_tensor() * Tensor::new(&[0f32, 1.0], &dev)?)?
            .sum_all()?
            .backward()?;
        let audit = GradientAudit::of_vars(&grads, &[w])?;
        assert!(audit.is_complete(), "{audit}");
        assert_eq!(
            audit.to_string(),
            "gradient audit: all 1 trainable variables got a nonzero gradient"
        );
        audit.into_result()
    }
}
