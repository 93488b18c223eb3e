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
