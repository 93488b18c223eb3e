//! Generated code is hygienic: it compiles next to user items named `Result`, `Tensor`, `Error`,
//! `engine`, `core` and `std`-like modules, with a carry named `kwargs` and a keyword argument
//! named `carry`, under `#![deny(missing_docs)]` and (with clippy) `clippy::pedantic`.

#![deny(missing_docs)]
#![warn(clippy::pedantic)]

pub mod shadowed {
    //! A module whose names collide with everything the generated code could use.

    use ::checkpoint_runtime::{Checkpointer, checkpointable};

    /// Not candle's tensor.
    #[derive(Debug)]
    pub struct Tensor;

    /// Not a result.
    #[derive(Debug)]
    pub struct Result;

    /// Not an error.
    #[derive(Debug)]
    pub struct Error;

    /// Not an engine.
    pub fn engine() {}

    /// Not the core library.
    pub mod core {}

    /// Not the runtime.
    pub mod checkpoint_runtime {}

    /// A layer whose argument names collide with the generated code's locals.
    #[checkpointable]
    #[derive(Debug, Clone)]
    pub struct Layer {
        w: candle_core::Tensor,
    }

    #[checkpointable(methods(forward, forward_twice))]
    impl Layer {
        /// A layer with a carry named `kwargs` and a keyword argument named `carry`.
        ///
        /// # Errors
        /// candle's.
        pub fn forward(
            &self,
            kwargs: &candle_core::Tensor,
            carry: f64,
            mask: Option<&candle_core::Tensor>,
        ) -> candle_core::Result<candle_core::Tensor> {
            let ys = (kwargs.broadcast_mul(&self.w)? * carry)?;
            match mask {
                Some(mask) => ys.broadcast_mul(mask),
                None => Ok(ys),
            }
        }

        /// The layer, twice.
        ///
        /// # Errors
        /// candle's.
        pub fn forward_twice(
            &self,
            xs: &candle_core::Tensor,
            label: &str,
        ) -> candle_core::Result<candle_core::Tensor> {
            let _ = label;
            self.forward(&self.forward(xs, 1.0, None)?, 1.0, None)
        }
    }

    /// A model whose engine is named `engine`.
    #[derive(Debug)]
    pub struct Model {
        /// The layers.
        pub layers: Vec<Layer>,
    }

    impl Model {
        /// Runs the layers through `engine`.
        ///
        /// # Errors
        /// candle's, or the engine's.
        #[checkpointable(engine = engine)]
        pub fn forward(
            &self,
            xs: &candle_core::Tensor,
            engine: Option<&Checkpointer>,
        ) -> candle_core::Result<candle_core::Tensor> {
            let mut xs = xs.clone();
            #[checkpoint]
            for layer in &self.layers {
                xs = layer.forward(&xs, 0.5, None)?;
            }
            #[checkpoint]
            let xs = self.layers[0].forward_twice(&xs, "twice")?;
            Ok(xs)
        }
    }

    /// `Layer`, built.
    ///
    /// # Errors
    /// candle's.
    pub fn layer(w: f32) -> candle_core::Result<Layer> {
        Ok(Layer {
            w: candle_core::Tensor::new(w, &candle_core::Device::Cpu)?,
        })
    }
}

#[test]
fn hygienic_expansion_runs() -> candle_core::Result<()> {
    use checkpoint_runtime::{Checkpointer, Policy};

    let model = shadowed::Model {
        layers: vec![shadowed::layer(2.0)?, shadowed::layer(3.0)?],
    };
    let xs = candle_core::Tensor::new(&[1f32, -1.0], &candle_core::Device::Cpu)?;
    let plain = model.forward(&xs, None)?;
    let ckpt = Checkpointer::new(Policy::recompute());
    let ys = model.forward(&xs, Some(&ckpt))?;
    assert_eq!(plain.to_vec1::<f32>()?, ys.to_vec1::<f32>()?);
    assert_eq!(plain.to_vec1::<f32>()?, [6.0, -6.0]);
    Ok(())
}
