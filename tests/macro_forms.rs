//! Every invocation form of a `#[checkpointable]` layer reaches the engine with its keyword
//! arguments intact: outputs equal the plain calls', gradients through `Policy::recompute()`
//! equal the plain graph's (`Policy::none()`) exactly, every loop is one stack, and with no
//! engine the rewritten model computes exactly what the plain calls do.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use checkpoint_runtime::{Checkpointer, Policy, checkpointable};
use checkpoint_tests::compare::{max_abs_diff, max_grad_diff};
use checkpoint_tests::init::Init;

const HIDDEN: usize = 8;
const LAYERS: usize = 4;

/// A residual layer whose output depends on every keyword argument.
#[checkpointable]
#[derive(Debug, Clone)]
struct Gated {
    w: Var,
    b: Var,
    /// The layer's position in the stack.
    index: usize,
}

#[checkpointable]
impl Gated {
    /// `xs + scale * (tanh(xs W + b) ⊙ mask)`, where `mask` (if any) zeroes some features.
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
        let h = xs.broadcast_matmul(self.w.as_tensor())?;
        let h = h.broadcast_add(self.b.as_tensor())?.tanh()?;
        let h = match mask {
            Some(mask) => h.broadcast_mul(mask)?,
            None => h,
        };
        xs + (h * scale)?
    }
}

struct Model {
    layers: Vec<Gated>,
}

/// The scale of layer `i`: keyword arguments may differ per layer.
#[allow(clippy::cast_precision_loss)]
fn scale_of(i: usize) -> f64 {
    0.5 + 0.25 * i as f64
}

impl Model {
    fn new(dev: &Device) -> Result<Self> {
        let mut init = Init::new(7);
        let layers = (0..LAYERS)
            .map(|index| {
                Ok(Gated {
                    index,
                    w: init.var((HIDDEN, HIDDEN), 0.5, DType::F32, dev)?,
                    b: init.var(HIDDEN, 0.5, DType::F32, dev)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| [l.w.clone(), l.b.clone()])
            .collect()
    }

    /// The reference: plain calls, no macro, no engine.
    fn plain(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, Some(mask), scale_of(i))?;
        }
        Ok(xs)
    }

    #[checkpointable(engine = ckpt)]
    fn bound_loop(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        ckpt: Option<&Checkpointer>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        #[checkpoint]
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, Some(mask), scale_of(i))?;
        }
        Ok(xs)
    }

    #[checkpointable(engine = ckpt)]
    fn ufcs_loop(&self, xs: &Tensor, mask: &Tensor, ckpt: Option<&Checkpointer>) -> Result<Tensor> {
        let scales: Vec<f64> = (0..LAYERS).map(scale_of).collect();
        let mut xs = xs.clone();
        #[checkpoint]
        for (layer, scale) in self.layers.iter().zip(&scales) {
            let scale = *scale;
            xs = Gated::forward(layer, &xs, Some(mask), scale)?;
        }
        Ok(xs)
    }

    #[checkpointable(engine = ckpt)]
    fn partial_loop(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        ckpt: Option<&Checkpointer>,
    ) -> Result<Tensor> {
        // Bound here, called later: the partials carry their keyword arguments.
        let partials: Vec<_> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| layer.partial(Some(mask), scale_of(i)))
            .collect();
        let mut xs = xs.clone();
        #[checkpoint]
        for f in &partials {
            xs = f.call(&xs)?;
        }
        Ok(xs)
    }

    #[checkpointable(engine = ckpt)]
    fn kwargs_loop(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        ckpt: Option<&Checkpointer>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        #[checkpoint]
        for layer in &self.layers {
            xs = layer.call_kw(
                &xs,
                GatedKwargs {
                    mask: Some(mask),
                    scale: scale_of(layer.index),
                },
            )?;
        }
        Ok(xs)
    }

    #[checkpointable(engine = ckpt)]
    fn fold(&self, xs: &Tensor, mask: &Tensor, ckpt: Option<&Checkpointer>) -> Result<Tensor> {
        #[checkpoint]
        let ys = self
            .layers
            .iter()
            .enumerate()
            .try_fold(xs.clone(), |xs, (i, layer)| {
                layer.forward(&xs, Some(mask), scale_of(i))
            })?;
        Ok(ys)
    }

    /// One invocation per statement, each form once: four stacks of one.
    #[checkpointable(engine = ckpt)]
    fn singles(&self, xs: &Tensor, mask: &Tensor, ckpt: Option<&Checkpointer>) -> Result<Tensor> {
        let [l0, l1, l2, l3] = &self.layers[..] else {
            unreachable!("the model has four layers")
        };
        #[checkpoint]
        let xs = l0.forward(xs, Some(mask), scale_of(0))?;
        #[checkpoint]
        let xs = Gated::forward(l1, &xs, Some(mask), scale_of(1))?;
        let f = l2.partial(Some(mask), scale_of(2));
        #[checkpoint]
        let xs = f.call(&xs)?;
        #[checkpoint]
        let ys = self.layers[3].call_kw(
            &xs,
            GatedKwargs {
                mask: Some(mask),
                scale: scale_of(3),
            },
        )?;
        let _ = l3;
        Ok(ys)
    }
}

type Form = fn(&Model, &Tensor, &Tensor, Option<&Checkpointer>) -> Result<Tensor>;

const FORMS: [(&str, Form, u64); 6] = [
    ("bound loop", Model::bound_loop, 1),
    ("UFCS loop", Model::ufcs_loop, 1),
    ("partial loop", Model::partial_loop, 1),
    ("kwargs loop", Model::kwargs_loop, 1),
    ("try_fold", Model::fold, 1),
    ("single invocations", Model::singles, 4),
];

fn inputs(dev: &Device) -> Result<(Tensor, Tensor)> {
    let xs = Init::new(3).uniform((2, 3, HIDDEN), 1.0, DType::F32, dev)?;
    let keep: Vec<f32> = (0..HIDDEN)
        .map(|j| if j % 3 == 0 { 0.0 } else { 1.0 })
        .collect();
    let mask = Tensor::new(keep.as_slice(), dev)?;
    Ok((xs, mask))
}

fn loss(ys: &Tensor) -> Result<Tensor> {
    ys.sqr()?.sum_all()
}

fn grads_through(
    model: &Model,
    form: Form,
    policy: Policy,
    stacks: u64,
) -> Result<(Tensor, Tensor, GradStore)> {
    let (xs, mask) = inputs(&Device::Cpu)?;
    let xs = Var::from_tensor(&xs)?;
    let ckpt = Checkpointer::new(policy);
    let ys = form(model, xs.as_tensor(), &mask, Some(&ckpt))?;
    assert_eq!(
        ckpt.take_stats().stacks,
        stacks,
        "one engine stack per loop"
    );
    let grads = ckpt.backward(&loss(&ys)?)?;
    let input_grad = grads
        .get(xs.as_tensor())
        .cloned()
        .ok_or_else(|| candle_core::Error::msg("the input has no gradient"))?;
    Ok((ys, input_grad, grads))
}

#[test]
fn keyword_arguments_change_the_output() -> Result<()> {
    let dev = Device::Cpu;
    let model = Model::new(&dev)?;
    let (xs, mask) = inputs(&dev)?;
    let layer = &model.layers[0];
    let full = layer.forward(&xs, Some(&mask), 0.5)?;
    assert!(max_abs_diff(&full, &layer.forward(&xs, None, 0.5)?)? > 1e-3);
    assert!(max_abs_diff(&full, &layer.forward(&xs, Some(&mask), 1.5)?)? > 1e-3);
    Ok(())
}

#[test]
fn without_an_engine_every_form_is_the_plain_call() -> Result<()> {
    let dev = Device::Cpu;
    let model = Model::new(&dev)?;
    let (xs, mask) = inputs(&dev)?;
    let plain = model.plain(&xs, &mask)?;
    for (name, form, _) in FORMS {
        let ys = form(&model, &xs, &mask, None)?;
        assert_eq!(
            max_abs_diff(&ys, &plain)?,
            0.0,
            "{name}: output without an engine"
        );
    }
    Ok(())
}

#[test]
fn every_form_recomputes_with_exact_gradients() -> Result<()> {
    let dev = Device::Cpu;
    let model = Model::new(&dev)?;
    let (xs, mask) = inputs(&dev)?;
    let plain = model.plain(&xs, &mask)?;
    let vars = model.vars();
    for (name, form, stacks) in FORMS {
        let (ys_none, dx_none, g_none) = grads_through(&model, form, Policy::none(), stacks)?;
        let (ys_rec, dx_rec, g_rec) = grads_through(&model, form, Policy::recompute(), stacks)?;
        assert_eq!(
            max_abs_diff(&ys_none, &plain)?,
            0.0,
            "{name}: output, plain graph"
        );
        assert_eq!(
            max_abs_diff(&ys_rec, &plain)?,
            0.0,
            "{name}: output, recompute"
        );
        assert_eq!(
            max_abs_diff(&dx_rec, &dx_none)?,
            0.0,
            "{name}: input gradient"
        );
        let diff = max_grad_diff(&g_rec, &g_none, &vars)?;
        assert_eq!(
            diff, 0.0,
            "{name}: parameter gradients, recompute vs plain graph"
        );
    }
    Ok(())
}
