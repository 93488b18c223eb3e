//! Comparing gradients.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

/// The largest absolute element-wise difference between two tensors, in f64.
///
/// # Errors
/// If the shapes differ or candle cannot compute the difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
}

/// ‖a − b‖ / ‖b‖, in f64.
///
/// # Errors
/// If the shapes differ or candle cannot compute the norms.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let num = (a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if den == 0.0 { num } else { num / den })
}

/// The largest difference between the gradients two stores hold for each of `vars`; fails if
/// either store lacks one.
///
/// # Errors
/// If a gradient is missing from either store, or shapes differ.
pub fn max_grad_diff(a: &GradStore, b: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut worst = 0.0f64;
    for (i, v) in vars.iter().enumerate() {
        let ga = a.get(v.as_tensor()).ok_or_else(|| {
            candle_core::Error::msg(format!("parameter {i} has no gradient in the first store"))
        })?;
        let gb = b.get(v.as_tensor()).ok_or_else(|| {
            candle_core::Error::msg(format!("parameter {i} has no gradient in the second store"))
        })?;
        worst = worst.max(max_abs_diff(ga, gb)?);
    }
    Ok(worst)
}

/// Checks that `other` holds, for each named parameter, the very gradient `plain` holds, bit for
/// bit, and that `plain`'s is not all zeros (against which any zero gradient would compare
/// equal). `label` names the run `other` came from.
///
/// # Errors
/// Naming the parameter: a gradient missing from either store, all zeros, or different.
pub fn same_nonzero_grads(
    params: &[(String, Var)],
    plain: &GradStore,
    other: &GradStore,
    label: &str,
) -> Result<()> {
    for (name, var) in params {
        let missing =
            |run: &str| candle_core::Error::msg(format!("no gradient for {name} ({run})"));
        let a = plain.get(var.as_tensor()).ok_or_else(|| missing("plain"))?;
        let b = other.get(var.as_tensor()).ok_or_else(|| missing(label))?;
        if a.abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            == 0.0
        {
            return Err(candle_core::Error::msg(format!("{name}: zero gradient")));
        }
        let diff = max_abs_diff(a, b)?;
        if diff != 0.0 {
            return Err(candle_core::Error::msg(format!(
                "{name}: {label} differs from the plain graph by up to {diff:e}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The gradient `scale` for each element of `var` (a tensor, so that 0 stays in the graph).
    fn store(var: &Var, scale: f32) -> Result<GradStore> {
        let scale = Tensor::full(scale, var.shape(), var.device())?;
        (var.as_tensor() * scale)?.sum_all()?.backward()
    }

    #[test]
    fn same_nonzero_grads_accepts_equal_and_names_what_differs_or_is_zero() -> Result<()> {
        let var = Var::new(&[1f32, 2.0], &Device::Cpu)?;
        let params = vec![("w".to_owned(), var.clone())];
        let plain = store(&var, 2.0)?;
        same_nonzero_grads(&params, &plain, &store(&var, 2.0)?, "again")?;
        let err = same_nonzero_grads(&params, &plain, &store(&var, 3.0)?, "other")
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("w: other differs")));
        let zero = store(&var, 0.0)?;
        let err = same_nonzero_grads(&params, &zero, &zero, "zero")
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_ref().is_some_and(|e| e.contains("w: zero gradient")),
            "{err:?}"
        );
        Ok(())
    }
}
