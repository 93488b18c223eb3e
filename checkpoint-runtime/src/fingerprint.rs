//! What the forward pass remembers of each checkpointed layer's output, so that recomputation
//! can be checked against it without keeping the output itself.

use std::fmt::Write as _;

use candle_core::{CpuStorage, DType, DeviceLocation, Shape, Storage, Tensor};

use crate::policy::RecomputeCheck;

/// The layout of one layer output and, when asked for, a digest of its values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fingerprint {
    shape: Shape,
    dtype: DType,
    device: DeviceLocation,
    values: Option<Values>,
}

/// A digest of a tensor's values.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Values {
    /// A hash of every element's bits (CPU: recomputation is bitwise reproducible there).
    Bits(u64),
    /// Sum and absolute sum, compared within `tolerance` × the absolute sum (other devices).
    Sums {
        sum: f64,
        abs_sum: f64,
        tolerance: f64,
    },
}

impl Fingerprint {
    /// The fingerprint of `t` that `check` asks for.
    pub(crate) fn of(t: &Tensor, check: RecomputeCheck) -> candle_core::Result<Self> {
        let values = match check {
            RecomputeCheck::Layout => None,
            RecomputeCheck::Values { tolerance } => Some(Values::of(t, tolerance)?),
        };
        Ok(Self {
            shape: t.shape().clone(),
            dtype: t.dtype(),
            device: t.device().location(),
            values,
        })
    }

    /// What differs between this (the forward's) fingerprint and `now`, the recomputed output,
    /// in words; `None` when nothing does.
    pub(crate) fn compare(&self, now: &Tensor) -> candle_core::Result<Option<String>> {
        let mut detail = String::new();
        if self.shape != *now.shape() {
            let _ = write!(
                detail,
                "its output has shape {:?} in the forward and {:?} now",
                self.shape.dims(),
                now.dims()
            );
        }
        for (what, then, now) in [
            (
                "dtype",
                format!("{:?}", self.dtype),
                format!("{:?}", now.dtype()),
            ),
            (
                "device",
                format!("{:?}", self.device),
                format!("{:?}", now.device().location()),
            ),
        ] {
            if then != now {
                let sep = if detail.is_empty() { "" } else { "; " };
                let _ = write!(
                    detail,
                    "{sep}its output's {what} is {then} in the forward and {now} now"
                );
            }
        }
        if !detail.is_empty() {
            return Ok(Some(detail));
        }
        let Some(then) = self.values else {
            return Ok(None);
        };
        let digest = match then {
            Values::Bits(_) => Values::Bits(bits_hash(now)?),
            Values::Sums { tolerance, .. } => sums(now, tolerance)?,
        };
        Ok(match (then, digest) {
            (Values::Bits(a), Values::Bits(b)) if a != b => Some(format!(
                "its output's values differ from the forward's (bit hash {a:#018x} then, \
                 {b:#018x} now; compared bit for bit on CPU)"
            )),
            (
                Values::Sums {
                    sum,
                    abs_sum,
                    tolerance,
                },
                Values::Sums {
                    sum: sum_now,
                    abs_sum: abs_now,
                    ..
                },
            ) if !within(sum, sum_now, abs_sum, tolerance)
                || !within(abs_sum, abs_now, abs_sum, tolerance) =>
            {
                Some(format!(
                    "its output's values differ from the forward's beyond the tolerance \
                     {tolerance:e} (sum {sum:e} then, {sum_now:e} now; absolute sum \
                     {abs_sum:e} then, {abs_now:e} now)"
                ))
            }
            _ => None,
        })
    }
}

/// Whether `now` is within `tolerance` × `scale` of `then` (exact equality for a zero scale).
fn within(then: f64, now: f64, scale: f64, tolerance: f64) -> bool {
    (then - now).abs() <= tolerance * scale.abs()
}

impl Values {
    /// The digest `check` asks for on `t`'s device.
    fn of(t: &Tensor, tolerance: f64) -> candle_core::Result<Self> {
        if t.device().is_cpu() {
            Ok(Self::Bits(bits_hash(t)?))
        } else {
            sums(t, tolerance)
        }
    }
}

/// The sum and absolute sum of `t`, reduced in `f32` on its device.
fn sums(t: &Tensor, tolerance: f64) -> candle_core::Result<Values> {
    let t = t.to_dtype(DType::F32)?;
    let scalar = |s: Tensor| s.to_dtype(DType::F64)?.to_scalar::<f64>();
    Ok(Values::Sums {
        sum: scalar(t.sum_all()?)?,
        abs_sum: scalar(t.abs()?.sum_all()?)?,
        tolerance,
    })
}

/// A 64-bit hash of the bits of every element of `t`, a CPU tensor, in logical order.
fn bits_hash(t: &Tensor) -> candle_core::Result<u64> {
    // A no-op for the contiguous outputs layers usually return.
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::msg("bits_hash: not a CPU tensor"));
    };
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::msg("bits_hash: a contiguous tensor has no contiguous offsets")
    })?;
    fn hash<T>(data: &[T], range: (usize, usize), bits: impl Fn(&T) -> u64) -> u64 {
        let slice = data.get(range.0..range.1).unwrap_or_default();
        // FxHash's step per element, and a final mix so that every bit reaches every bit.
        let h = slice.iter().fold(slice.len() as u64, |h, x| {
            (h.rotate_left(5) ^ bits(x)).wrapping_mul(0x517c_c1b7_2722_0a95)
        });
        crate::rng::mix(h)
    }
    let r = (start, end);
    Ok(match cpu {
        CpuStorage::U8(v)
        | CpuStorage::F6E2M3(v)
        | CpuStorage::F6E3M2(v)
        | CpuStorage::F4(v)
        | CpuStorage::F8E8M0(v) => hash(v, r, |x| u64::from(*x)),
        CpuStorage::U32(v) => hash(v, r, |x| u64::from(*x)),
        CpuStorage::I16(v) => hash(v, r, |x| u64::from(x.cast_unsigned())),
        CpuStorage::I32(v) => hash(v, r, |x| u64::from(x.cast_unsigned())),
        CpuStorage::I64(v) => hash(v, r, |x| x.cast_unsigned()),
        CpuStorage::BF16(v) => hash(v, r, |x| u64::from(x.to_bits())),
        CpuStorage::F16(v) => hash(v, r, |x| u64::from(x.to_bits())),
        CpuStorage::F32(v) => hash(v, r, |x| u64::from(x.to_bits())),
        CpuStorage::F64(v) => hash(v, r, |x| x.to_bits()),
        CpuStorage::F8E4M3(v) => hash(v, r, |x| u64::from(x.to_bits())),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn one_changed_bit_is_a_different_output() -> candle_core::Result<()> {
        let t = Tensor::arange(0f32, 64.0, &Device::Cpu)?.reshape((8, 8))?;
        let print = Fingerprint::of(&t, RecomputeCheck::values())?;
        assert_eq!(print.compare(&t.copy()?)?, None);
        let mut v = t.flatten_all()?.to_vec1::<f32>()?;
        v[37] = f32::from_bits(v[37].to_bits() ^ 1);
        let changed = Tensor::from_vec(v, (8, 8), &Device::Cpu)?;
        let detail = print.compare(&changed)?;
        assert!(detail.is_some_and(|d| d.contains("values differ")));
        // The layout check alone does not look at values.
        assert_eq!(
            Fingerprint::of(&t, RecomputeCheck::Layout)?.compare(&changed)?,
            None
        );
        Ok(())
    }

    #[test]
    fn layouts_are_compared_in_logical_order() -> candle_core::Result<()> {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((2, 3))?;
        let print = Fingerprint::of(&t.t()?, RecomputeCheck::values())?;
        // The same values, laid out contiguously.
        assert_eq!(print.compare(&t.t()?.contiguous()?)?, None);
        let detail = print.compare(&t)?;
        assert!(detail.is_some_and(|d| d.contains("shape [3, 2] in the forward and [2, 3] now")));
        let detail = print.compare(&t.t()?.to_dtype(DType::F64)?)?;
        assert!(detail.is_some_and(|d| d.contains("dtype is F32 in the forward and F64 now")));
        Ok(())
    }

    #[test]
    fn sums_agree_within_the_tolerance() -> candle_core::Result<()> {
        let t = Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu)?;
        // The digest other devices use, here on the CPU.
        let print = Fingerprint {
            values: Some(sums(&t, 1e-3)?),
            ..Fingerprint::of(&t, RecomputeCheck::Layout)?
        };
        assert_eq!(print.compare(&(&t + 1e-4)?)?, None);
        let detail = print.compare(&(&t + 1e-2)?)?;
        assert!(detail.is_some_and(|d| d.contains("beyond the tolerance 1e-3")));
        Ok(())
    }
}
