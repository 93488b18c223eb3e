//! The on-disk form of one boundary: a safetensors file holding one tensor named `boundary`,
//! so that a file left behind by a crash can be inspected with ordinary tools.

use std::fmt::Write as _;

use candle_core::{DType, Device, Tensor};

/// An element type a boundary file can hold: its safetensors dtype and its little-endian bytes.
pub(crate) trait Element: Copy {
    /// The dtype's name in the safetensors header.
    const DTYPE: &'static str;
    /// Appends `values` to `out`, little-endian.
    fn extend_le(values: &[Self], out: &mut Vec<u8>);
}

macro_rules! element {
    ($ty:ty, $name:literal) => {
        impl Element for $ty {
            const DTYPE: &'static str = $name;
            fn extend_le(values: &[Self], out: &mut Vec<u8>) {
                out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            }
        }
    };
}
element!(f32, "F32");
element!(f64, "F64");
element!(half::bf16, "BF16");
element!(half::f16, "F16");

/// Serializes `t`, a tensor in host memory, into safetensors bytes.
///
/// Only host tensors: a device tensor is copied off its device by the thread that queued its
/// kernels, where the copy is ordered after them (the disk store's `Payload`), never here.
pub(crate) fn encode(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    if !t.device().is_cpu() {
        return Err(candle_core::Error::msg(
            "internal: a boundary reached the file encoder while still on its device",
        ));
    }
    let dims = t.dims();
    let flat = t.flatten_all()?;
    match flat.dtype() {
        DType::F32 => Ok(encode_slice(dims, &flat.to_vec1::<f32>()?)),
        DType::F64 => Ok(encode_slice(dims, &flat.to_vec1::<f64>()?)),
        DType::BF16 => Ok(encode_slice(dims, &flat.to_vec1::<half::bf16>()?)),
        DType::F16 => Ok(encode_slice(dims, &flat.to_vec1::<half::f16>()?)),
        other => Err(candle_core::Error::msg(format!(
            "boundaries of dtype {other:?} cannot be offloaded: use f16, bf16, f32 or f64"
        ))),
    }
}

/// Serializes `data`, the row-major elements of a tensor of shape `dims`, into safetensors
/// bytes.
pub(crate) fn encode_slice<T: Element>(dims: &[usize], data: &[T]) -> Vec<u8> {
    let mut shape = String::new();
    for (i, d) in dims.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(shape, "{sep}{d}");
    }
    let len = std::mem::size_of_val(data);
    let mut header = format!(
        r#"{{"boundary":{{"dtype":"{}","shape":[{shape}],"data_offsets":[0,{len}]}}}}"#,
        T::DTYPE
    );
    // safetensors pads the header with spaces to a multiple of 8 bytes.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + len);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    T::extend_le(data, &mut out);
    out
}

/// Parses bytes written by [`encode`] back into a tensor on `device`.
pub(crate) fn decode(bytes: &[u8], device: &Device) -> candle_core::Result<Tensor> {
    candle_core::safetensors::load_buffer(bytes, device)?
        .remove("boundary")
        .ok_or_else(|| candle_core::Error::msg("the file holds no tensor named `boundary`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_float_dtype_bit_for_bit() -> candle_core::Result<()> {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((2, 3, 4))?;
        let t = (t * 0.37)?.sin()?;
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let t = t.to_dtype(dtype)?;
            let back = decode(&encode(&t)?, &Device::Cpu)?;
            assert_eq!(back.dims(), t.dims());
            assert_eq!(back.dtype(), dtype);
            let same = back.eq(&t)?.flatten_all()?.min(0)?.to_scalar::<u8>()?;
            assert_eq!(same, 1, "{dtype:?}");
        }
        Ok(())
    }
}
