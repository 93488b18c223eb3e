//! What every op shares: the float element types, argument checks that name the op and the fix,
//! and contiguous slices out of candle's CPU storage.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor, WithDType, bail};
use half::{bf16, f16};

/// Rows per parallel task. Each row is computed by one task in a fixed order, so the result does
/// not depend on this number or on the thread count; it only sets the scheduling grain.
pub(crate) const ROWS_PER_TASK: usize = 8;

/// Elements per parallel task for element-wise kernels (the optimizer).
pub(crate) const ELEMS_PER_TASK: usize = 1 << 14;

/// An element type the kernels read and write; arithmetic is always in f32.
pub(crate) trait Float: WithDType + Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// The elements of `storage` if it holds this type (candle has no generic mutable view).
    fn storage_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
}

impl Float for f32 {
    fn storage_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Float for bf16 {
    fn storage_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Float for f16 {
    fn storage_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F16(v) => Some(v),
            _ => None,
        }
    }
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Runs `$body` with `$t` bound to the Rust element type of `$dtype` (f32, bf16 or f16).
macro_rules! with_float {
    ($op:expr, $dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            other => candle_core::bail!(
                "{}: dtype {other:?} is not supported; convert to f32, bf16 or f16 with `to_dtype`",
                $op
            ),
        }
    };
}
pub(crate) use with_float;

/// The contiguous elements that `layout` views in `storage`.
pub(crate) fn slice<'a, T: WithDType>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: internal error, the kernel was handed a non-contiguous tensor")
    };
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// The contiguous elements that `layout` views in `storage`, writable.
pub(crate) fn slice_mut<'a, T: Float>(
    op: &str,
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> Result<&'a mut [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: internal error, the kernel was handed a non-contiguous tensor")
    };
    let dtype = storage.dtype();
    match T::storage_mut(storage) {
        Some(all) => Ok(&mut all[start..end]),
        None => bail!(
            "{op}: internal error, expected {:?} storage, found {dtype:?}",
            T::DTYPE
        ),
    }
}

/// Fails unless `t` is f32, bf16 or f16.
pub(crate) fn check_float(op: &str, name: &str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        other => bail!(
            "{op}: `{name}` has dtype {other:?}; use f32, bf16 or f16 (convert with `to_dtype`)"
        ),
    }
}

/// Fails unless `b` has the dtype and device of `a`.
pub(crate) fn check_like(
    op: &str,
    (na, a): (&str, &Tensor),
    (nb, b): (&str, &Tensor),
) -> Result<()> {
    if a.dtype() != b.dtype() {
        bail!(
            "{op}: `{nb}` is {:?} but `{na}` is {:?}; convert one with `to_dtype` so they match",
            b.dtype(),
            a.dtype()
        )
    }
    if !a.device().same_device(b.device()) {
        bail!(
            "{op}: `{nb}` is on {:?} but `{na}` on {:?}; move one with `to_device`",
            b.device().location(),
            a.device().location()
        )
    }
    Ok(())
}

/// Fails if `t` would need a gradient that `op` does not compute (rather than cut it silently).
pub(crate) fn check_no_grad(op: &str, name: &str, t: &Tensor) -> Result<()> {
    if t.track_op() {
        bail!(
            "{op}: `{name}` requires a gradient, which this op does not compute; pass a \
             detached tensor (`detach()`) or use the composite candle ops"
        )
    }
    Ok(())
}

/// Wraps a freshly computed vector as CPU storage.
pub(crate) fn storage<T: WithDType>(data: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(data)
}
