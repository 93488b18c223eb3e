//! The on-disk form of one boundary: a safetensors file holding one tensor named `boundary`,
//! so that a file left behind by a crash can be inspected with ordinary tools.

use std::fmt::Write as _;

use candle_core::{DType, Device, Tensor};

/// Serializes `t` (on any device) into safetensors bytes.
pub(crate) fn encode(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let dims = t.dims().to_vec();
    let flat = t.to_device(&Device::Cpu)?.flatten_all()?;
    let (dtype, data): (&str, Vec<u8>) = match flat.dtype() {
        DType::F32 => ("F32", le_bytes(flat.to_vec1::<f32>()?, f32::to_le_bytes)),
        DType::F64 => ("F64", le_bytes(flat.to_vec1::<f64>()?, f64::to_le_bytes)),
        DType::BF16 => ("BF16", le_bytes(flat.to_vec1()?, half::bf16::to_le_bytes)),
        DType::F16 => ("F16", le_bytes(flat.to_vec1()?, half::f16::to_le_bytes)),
        other => {
            return Err(candle_core::Error::msg(format!(
                "boundaries of dtype {other:?} cannot be offloaded: use f16, bf16, f32 or f64"
            )));
        }
    };
    let mut shape = String::new();
    for (i, d) in dims.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(shape, "{sep}{d}");
    }
    let mut header = format!(
        r#"{{"boundary":{{"dtype":"{dtype}","shape":[{shape}],"data_offsets":[0,{}]}}}}"#,
        data.len()
    );
    // safetensors pads the header with spaces to a multiple of 8 bytes.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    Ok(out)
}

/// Parses bytes written by [`encode`] back into a tensor on `device`.
pub(crate) fn decode(bytes: &[u8], device: &Device) -> candle_core::Result<Tensor> {
    candle_core::safetensors::load_buffer(bytes, device)?
        .remove("boundary")
        .ok_or_else(|| candle_core::Error::msg("the file holds no tensor named `boundary`"))
}

fn le_bytes<T: Copy, const N: usize>(values: Vec<T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
    values.into_iter().flat_map(f).collect()
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
