//! Deterministic parameters, so that every run of a test sees the same numbers.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};

/// A small deterministic generator (splitmix64): no global RNG state, no seeding of candle.
#[derive(Debug, Clone)]
pub struct Init {
    state: u64,
}

impl Init {
    /// A generator seeded with `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_unit(&mut self) -> f32 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 24 high bits → [0, 1), exactly representable in f32.
        #[allow(clippy::cast_precision_loss)]
        let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
        unit
    }

    /// A tensor of values uniform in `[-scale, scale)`.
    ///
    /// # Errors
    /// If candle cannot build or convert the tensor.
    pub fn uniform(
        &mut self,
        shape: impl Into<Shape>,
        scale: f32,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f32> = (0..shape.elem_count())
            .map(|_| (self.next_unit() * 2.0 - 1.0) * scale)
            .collect();
        Tensor::from_vec(data, shape, dev)?.to_dtype(dtype)
    }

    /// A trainable parameter of values uniform in `[-scale, scale)`.
    ///
    /// # Errors
    /// If candle cannot build the tensor.
    pub fn var(
        &mut self,
        shape: impl Into<Shape>,
        scale: f32,
        dtype: DType,
        dev: &Device,
    ) -> Result<Var> {
        Var::from_tensor(&self.uniform(shape, scale, dtype, dev)?)
    }

    /// A trainable parameter of values `1 + uniform(-scale, scale)` (for norm weights).
    ///
    /// # Errors
    /// If candle cannot build the tensor.
    pub fn var_around_one(
        &mut self,
        shape: impl Into<Shape>,
        scale: f32,
        dtype: DType,
        dev: &Device,
    ) -> Result<Var> {
        let t = (self.uniform(shape, scale, DType::F32, dev)? + 1.0)?.to_dtype(dtype)?;
        Var::from_tensor(&t)
    }
}
