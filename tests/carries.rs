//! Several carries, auxiliary outputs and mixed stacks: a layer returning `(hidden, router
//! logits)`, a `(hidden, residual)` pair carry (with and without an auxiliary output) and an enum
//! of different layers give, through the engine in every mode, segments and a budget, the
//! outputs and gradients of the plain calls (`engine = None`) bit for bit on CPU, with the loss
//! reading every layer's auxiliary output.
//!
//! One shape is exact in values but not bit for bit in gradients: an auxiliary output computed
//! from the very tensor the layer returns as its carry. There the plain graph sums the gradient
//! of that tensor over all its uses at once (the next layer's and the auxiliary output's), while
//! the engine sums the next layer's uses first, at the layer boundary: the same terms, grouped
//! differently, so equal up to rounding (the last test measures it).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use checkpoint_runtime::{Checkpointer, Mode, Policy, StackOutputs, checkpointable};
use checkpoint_tests::compare::max_abs_diff;
use checkpoint_tests::init::Init;

const D: usize = 6;
const EXPERTS: usize = 3;

/// A MoE-like block: the carry goes through a gated update, and the router logits come out.
#[checkpointable]
#[derive(Clone)]
struct Routed {
    w: Var,
    router: Var,
}

#[checkpointable]
impl Routed {
    fn forward(&self, xs: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
        let (b, t, d) = xs.dims3()?;
        let flat = xs.reshape((b * t, d))?; // (b*t, d)
        let logits = flat.matmul(self.router.as_tensor())?; // (b*t, e)
        let gate = candle_nn::ops::softmax_last_dim(&logits)?.narrow(1, 0, 1)?; // (b*t, 1)
        let h = flat
            .matmul(self.w.as_tensor())?
            .tanh()?
            .broadcast_mul(&gate)?;
        let ys = (xs + (h.reshape((b, t, d))? * scale)?)?;
        Ok((ys, logits))
    }
}

/// A block with a `(hidden, residual)` pair carry.
#[checkpointable]
#[derive(Clone)]
struct Pair {
    w: Var,
}

#[checkpointable]
impl Pair {
    fn forward(&self, carry: (&Tensor, &Tensor), scale: f64) -> Result<(Tensor, Tensor)> {
        let (hidden, residual) = carry;
        let residual = (residual + hidden)?;
        let hidden = (residual.broadcast_matmul(self.w.as_tensor())?.tanh()? * scale)?;
        Ok((hidden, residual))
    }
}

/// A pair carry and an auxiliary output.
#[checkpointable]
#[derive(Clone)]
struct PairAux {
    w: Var,
}

#[checkpointable]
impl PairAux {
    fn forward(&self, carry: (&Tensor, &Tensor)) -> Result<(Tensor, Tensor, Tensor)> {
        let (hidden, residual) = carry;
        let residual = (residual + hidden)?;
        let pre = residual.broadcast_matmul(self.w.as_tensor())?;
        let stat = pre.sqr()?.mean_keepdim(2)?; // (b, t, 1)
        let hidden = pre.tanh()?;
        Ok((hidden, residual, stat))
    }
}

/// A dense block for the mixed stack: its auxiliary output has another shape than the router's.
///
/// Its auxiliary output is computed inside the layer, not from the carry it returns: see
/// `an_auxiliary_output_of_the_returned_carry_is_exact_in_values_and_close_in_gradients`.
#[derive(Clone)]
struct Dense {
    w: Var,
}

impl Dense {
    fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = xs.broadcast_matmul(self.w.as_tensor())?.tanh()?;
        let norm = h.sqr()?.sum_keepdim(2)?; // (b, t, 1)
        Ok(((xs + h)?, norm))
    }
}

/// A mixed stack: layers of different types behind one checkpointable enum.
#[checkpointable]
#[derive(Clone)]
enum Mixed {
    Dense(Dense),
    Routed(Routed),
}

#[checkpointable]
impl Mixed {
    fn forward(&self, xs: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Dense(layer) => layer.forward(xs),
            Self::Routed(layer) => layer.forward(xs, scale),
        }
    }
}

struct Model {
    routed: Vec<Routed>,
    pairs: Vec<Pair>,
    pair_aux: Vec<PairAux>,
    mixed: Vec<Mixed>,
}

impl Model {
    fn new(depth: usize, dev: &Device) -> Result<Self> {
        let mut init = Init::new(7);
        let mut var = |shape: (usize, usize)| init.var(shape, 0.5, DType::F32, dev);
        let mut routed = Vec::new();
        let mut pairs = Vec::new();
        let mut pair_aux = Vec::new();
        let mut mixed = Vec::new();
        for i in 0..depth {
            routed.push(Routed {
                w: var((D, D))?,
                router: var((D, EXPERTS))?,
            });
            pairs.push(Pair { w: var((D, D))? });
            pair_aux.push(PairAux { w: var((D, D))? });
            mixed.push(if i % 2 == 0 {
                Mixed::Dense(Dense { w: var((D, D))? })
            } else {
                Mixed::Routed(Routed {
                    w: var((D, D))?,
                    router: var((D, EXPERTS))?,
                })
            });
        }
        Ok(Self {
            routed,
            pairs,
            pair_aux,
            mixed,
        })
    }

    fn vars(&self) -> Vec<Var> {
        let mut vars = Vec::new();
        for l in &self.routed {
            vars.extend([l.w.clone(), l.router.clone()]);
        }
        vars.extend(self.pairs.iter().map(|l| l.w.clone()));
        vars.extend(self.pair_aux.iter().map(|l| l.w.clone()));
        for l in &self.mixed {
            match l {
                Mixed::Dense(d) => vars.push(d.w.clone()),
                Mixed::Routed(r) => vars.extend([r.w.clone(), r.router.clone()]),
            }
        }
        vars
    }

    /// Four stacks in a row, each feeding the next; returns the final hidden state and every
    /// auxiliary output.
    #[checkpointable(engine = ckpt)]
    fn forward(&self, xs: &Tensor, ckpt: Option<&Checkpointer>) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut aux = Vec::new();
        #[checkpoint]
        for (i, layer) in self.routed.iter().enumerate() {
            let scale = 1.0 / (i + 1) as f64;
            let (h, logits) = layer.forward(&xs, scale)?;
            xs = h;
            aux.push(logits);
        }
        let mut residual = xs.zeros_like()?;
        #[checkpoint]
        for layer in &self.pairs {
            let (h, r) = layer.forward((&xs, &residual), 0.5)?;
            xs = h;
            residual = r;
        }
        #[checkpoint]
        for layer in &self.pair_aux {
            let (h, r, stat) = layer.forward((&xs, &residual))?;
            residual = r;
            aux.push(stat);
            xs = h;
        }
        let mut xs = (xs + residual)?;
        #[checkpoint]
        for layer in &self.mixed {
            let (h, extra) = layer.forward(&xs, 0.25)?;
            xs = h;
            aux.push(extra);
        }
        Ok((xs, aux))
    }
}

/// How a stack's layers are invoked: bound (`layer.forward(&xs, ..)`, or the path call
/// `Pair::forward(layer, ..)`), curried (`layer.partial(..)` then `.call(&xs)`) or kwargs-bound
/// (`layer.call_kw(&xs, RoutedKwargs { .. })`).
#[derive(Clone, Copy, Debug)]
enum Form {
    Bound,
    Partial,
    CallKw,
}

const FORMS: [Form; 3] = [Form::Bound, Form::Partial, Form::CallKw];

fn scale_of(i: usize) -> f64 {
    1.0 / (i + 1) as f64
}

impl Model {
    /// `forward`'s four stacks, each a `#[checkpoint]` loop (one stack each) invoking its layers
    /// in `form`.
    #[checkpointable(engine = ckpt)]
    fn forward_loops(
        &self,
        xs: &Tensor,
        ckpt: Option<&Checkpointer>,
        form: Form,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut aux = Vec::new();
        let mut residual = xs.zeros_like()?;
        match form {
            Form::Bound => {
                #[checkpoint]
                for (i, layer) in self.routed.iter().enumerate() {
                    let (h, logits) = layer.forward(&xs, scale_of(i))?;
                    xs = h;
                    aux.push(logits);
                }
                #[checkpoint]
                for layer in &self.pairs {
                    let (h, r) = Pair::forward(layer, (&xs, &residual), 0.5)?;
                    xs = h;
                    residual = r;
                }
                #[checkpoint]
                for layer in &self.pair_aux {
                    let (h, r, stat) = layer.forward((&xs, &residual))?;
                    xs = h;
                    residual = r;
                    aux.push(stat);
                }
            }
            Form::Partial => {
                let routed: Vec<_> = (self.routed.iter().enumerate())
                    .map(|(i, l)| l.partial(scale_of(i)))
                    .collect();
                #[checkpoint]
                for f in &routed {
                    let (h, logits) = f.call(&xs)?;
                    xs = h;
                    aux.push(logits);
                }
                let pairs: Vec<_> = self.pairs.iter().map(|l| l.partial(0.5)).collect();
                #[checkpoint]
                for f in &pairs {
                    let (h, r) = f.call((&xs, &residual))?;
                    xs = h;
                    residual = r;
                }
                let pair_aux: Vec<_> = self.pair_aux.iter().map(PairAux::partial).collect();
                #[checkpoint]
                for f in &pair_aux {
                    let (h, r, stat) = f.call((&xs, &residual))?;
                    xs = h;
                    residual = r;
                    aux.push(stat);
                }
            }
            Form::CallKw => {
                #[checkpoint]
                for (i, layer) in self.routed.iter().enumerate() {
                    let (h, logits) = layer.call_kw(&xs, RoutedKwargs { scale: scale_of(i) })?;
                    xs = h;
                    aux.push(logits);
                }
                #[checkpoint]
                for layer in &self.pairs {
                    let (h, r) = layer.call_kw((&xs, &residual), PairKwargs { scale: 0.5 })?;
                    xs = h;
                    residual = r;
                }
                #[checkpoint]
                for layer in &self.pair_aux {
                    let (h, r, stat) = layer.call_kw((&xs, &residual), PairAuxKwargs {})?;
                    xs = h;
                    residual = r;
                    aux.push(stat);
                }
            }
        }
        let mut xs = (xs + residual)?;
        match form {
            Form::Bound =>
            {
                #[checkpoint]
                for layer in &self.mixed {
                    let (h, extra) = layer.forward(&xs, 0.25)?;
                    xs = h;
                    aux.push(extra);
                }
            }
            Form::Partial => {
                let mixed: Vec<_> = self.mixed.iter().map(|l| l.partial(0.25)).collect();
                #[checkpoint]
                for f in &mixed {
                    let (h, extra) = f.call(&xs)?;
                    xs = h;
                    aux.push(extra);
                }
            }
            Form::CallKw =>
            {
                #[checkpoint]
                for layer in &self.mixed {
                    let (h, extra) = layer.call_kw(&xs, MixedKwargs { scale: 0.25 })?;
                    xs = h;
                    aux.push(extra);
                }
            }
        }
        Ok((xs, aux))
    }

    /// `forward`'s four stacks, layer by layer: each layer a marked `let` of a tuple (a stack
    /// of one), invoked in `form`.
    #[checkpointable(engine = ckpt)]
    fn forward_one_by_one(
        &self,
        xs: &Tensor,
        ckpt: Option<&Checkpointer>,
        form: Form,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut aux = Vec::new();
        let mut residual = xs.zeros_like()?;
        for (i, layer) in self.routed.iter().enumerate() {
            let (h, logits) = match form {
                Form::Bound => {
                    #[checkpoint]
                    let (h, logits) = layer.forward(&xs, scale_of(i))?;
                    (h, logits)
                }
                Form::Partial => {
                    let f = layer.partial(scale_of(i));
                    #[checkpoint]
                    let (h, logits) = f.call(&xs)?;
                    (h, logits)
                }
                Form::CallKw => {
                    #[checkpoint]
                    let (h, logits) = layer.call_kw(&xs, RoutedKwargs { scale: scale_of(i) })?;
                    (h, logits)
                }
            };
            xs = h;
            aux.push(logits);
        }
        for layer in &self.pairs {
            (xs, residual) = match form {
                Form::Bound => {
                    #[checkpoint]
                    let (h, r) = Pair::forward(layer, (&xs, &residual), 0.5)?;
                    (h, r)
                }
                Form::Partial => {
                    let f = layer.partial(0.5);
                    #[checkpoint]
                    let (h, r) = f.call((&xs, &residual))?;
                    (h, r)
                }
                Form::CallKw => {
                    #[checkpoint]
                    let (h, r) = layer.call_kw((&xs, &residual), PairKwargs { scale: 0.5 })?;
                    (h, r)
                }
            };
        }
        for layer in &self.pair_aux {
            let (h, r, stat) = match form {
                Form::Bound => {
                    #[checkpoint]
                    let (h, r, stat) = layer.forward((&xs, &residual))?;
                    (h, r, stat)
                }
                Form::Partial => {
                    let f = layer.partial();
                    #[checkpoint]
                    let (h, r, stat) = f.call((&xs, &residual))?;
                    (h, r, stat)
                }
                Form::CallKw => {
                    #[checkpoint]
                    let (h, r, stat) = layer.call_kw((&xs, &residual), PairAuxKwargs {})?;
                    (h, r, stat)
                }
            };
            (xs, residual) = (h, r);
            aux.push(stat);
        }
        let mut xs = (xs + residual)?;
        for layer in &self.mixed {
            let (h, extra) = match form {
                Form::Bound => {
                    #[checkpoint]
                    let (h, extra) = layer.forward(&xs, 0.25)?;
                    (h, extra)
                }
                Form::Partial => {
                    let f = layer.partial(0.25);
                    #[checkpoint]
                    let (h, extra) = f.call(&xs)?;
                    (h, extra)
                }
                Form::CallKw => {
                    #[checkpoint]
                    let (h, extra) = layer.call_kw(&xs, MixedKwargs { scale: 0.25 })?;
                    (h, extra)
                }
            };
            xs = h;
            aux.push(extra);
        }
        Ok((xs, aux))
    }
}

/// A loss weighing every element differently, reading the output and every auxiliary output.
impl Model {
    /// The routed layers as one stack through `engine`, without the macro.
    fn routed_outputs(&self, engine: &Checkpointer, xs: &Tensor) -> Result<StackOutputs> {
        let calls = self
            .routed
            .iter()
            .map(|l| (l, RoutedKwargsOwned { scale: 0.5 }));
        engine
            .run_stack_outputs(std::slice::from_ref(xs), calls)
            .map_err(candle_core::Error::from)
    }
}

fn loss(ys: &Tensor, aux: &[Tensor]) -> Result<Tensor> {
    let weigh = |t: &Tensor| -> Result<Tensor> {
        let n = u32::try_from(t.elem_count()).unwrap_or(u32::MAX);
        let w = Tensor::arange(0u32, n, t.device())?
            .to_dtype(t.dtype())?
            .reshape(t.shape())?
            .affine(1e-2, -0.3)?
            .cos()?;
        (t * w)?.sum_all()
    };
    let mut total = weigh(ys)?;
    for a in aux {
        total = (total + weigh(&a.tanh()?)?)?;
    }
    Ok(total)
}

struct Step {
    ys: Tensor,
    aux: Vec<Tensor>,
    grads: GradStore,
}

fn step(model: &Model, xs: &Var, ckpt: Option<&Checkpointer>) -> Result<Step> {
    step_with(model, xs, ckpt, Model::forward)
}

/// A model forward: the model, the input and the engine to its output and auxiliary outputs.
type Forward<'f> =
    &'f dyn Fn(&Model, &Tensor, Option<&Checkpointer>) -> Result<(Tensor, Vec<Tensor>)>;

fn step_with(
    model: &Model,
    xs: &Var,
    ckpt: Option<&Checkpointer>,
    forward: impl Fn(&Model, &Tensor, Option<&Checkpointer>) -> Result<(Tensor, Vec<Tensor>)>,
) -> Result<Step> {
    let (ys, aux) = forward(model, xs.as_tensor(), ckpt)?;
    let l = loss(&ys, &aux)?;
    let grads = match ckpt {
        Some(ckpt) => ckpt.backward(&l)?,
        None => l.backward()?,
    };
    Ok(Step { ys, aux, grads })
}

fn assert_same(plain: &Step, other: &Step, model: &Model, xs: &Var, what: &str) -> Result<()> {
    assert_eq!(max_abs_diff(&plain.ys, &other.ys)?, 0.0, "output, {what}");
    assert_eq!(plain.aux.len(), other.aux.len(), "aux count, {what}");
    for (i, (a, b)) in plain.aux.iter().zip(&other.aux).enumerate() {
        assert_eq!(a.dims(), b.dims(), "aux {i} shape, {what}");
        assert_eq!(max_abs_diff(a, b)?, 0.0, "aux {i}, {what}");
    }
    let mut vars = model.vars();
    vars.push(xs.clone());
    for (i, v) in vars.iter().enumerate() {
        let a = plain.grads.get(v.as_tensor());
        let b = other.grads.get(v.as_tensor());
        let (Some(a), Some(b)) = (a, b) else {
            panic!(
                "gradient {i} missing ({what}): plain {}, other {}",
                a.is_some(),
                b.is_some()
            );
        };
        assert_eq!(max_abs_diff(a, b)?, 0.0, "gradient of variable {i}, {what}");
    }
    Ok(())
}

fn setup(depth: usize) -> Result<(Model, Var)> {
    let dev = Device::Cpu;
    let model = Model::new(depth, &dev)?;
    let xs = Init::new(99).var((2, 5, D), 1.0, DType::F32, &dev)?;
    Ok((model, xs))
}

#[test]
fn every_mode_matches_the_plain_calls_bit_for_bit() -> Result<()> {
    for depth in [1, 2, 5] {
        let (model, xs) = setup(depth)?;
        let plain = step(&model, &xs, None)?;
        assert_eq!(
            plain.aux.len(),
            3 * depth,
            "one aux per layer of three stacks"
        );
        for mode in [
            Mode::None,
            Mode::Recompute,
            Mode::OffloadHost,
            Mode::OffloadDisk,
        ] {
            for policy in [Policy::new(mode), Policy::new(mode).segments(2)] {
                let ckpt = Checkpointer::new(policy.clone());
                let other = step(&model, &xs, Some(&ckpt))?;
                assert_same(
                    &plain,
                    &other,
                    &model,
                    &xs,
                    &format!("depth {depth}, {policy:?}"),
                )?;
            }
        }
    }
    Ok(())
}

/// The modes (and segmentings) that `every_mode_matches_the_plain_calls_bit_for_bit` runs.
fn policies() -> Vec<Policy> {
    let modes = [
        Mode::None,
        Mode::Recompute,
        Mode::OffloadHost,
        Mode::OffloadDisk,
    ];
    modes
        .into_iter()
        .flat_map(|mode| [Policy::new(mode), Policy::new(mode).segments(2)])
        .collect()
}

#[test]
fn every_form_as_a_loop_and_one_layer_at_a_time_matches_the_plain_calls_bit_for_bit() -> Result<()>
{
    for depth in [1, 3] {
        let (model, xs) = setup(depth)?;
        let plain = step(&model, &xs, None)?;
        for form in FORMS {
            let loops =
                |m: &Model, x: &Tensor, c: Option<&Checkpointer>| m.forward_loops(x, c, form);
            let one_by_one =
                |m: &Model, x: &Tensor, c: Option<&Checkpointer>| m.forward_one_by_one(x, c, form);
            // Four stacks of all the layers, or one stack per layer.
            let shapes: [(&str, Forward<'_>, u64); 2] = [
                ("loops", &loops, 4),
                ("one layer at a time", &one_by_one, 4 * depth as u64),
            ];
            for (shape, forward, stacks) in shapes {
                // Without an engine, every form is the plain calls.
                let other = step_with(&model, &xs, None, forward)?;
                let what = format!("depth {depth}, {form:?} {shape}, no engine");
                assert_same(&plain, &other, &model, &xs, &what)?;
                for policy in policies() {
                    let ckpt = Checkpointer::new(policy.clone());
                    let other = step_with(&model, &xs, Some(&ckpt), forward)?;
                    let what = format!("depth {depth}, {form:?} {shape}, {policy:?}");
                    assert_same(&plain, &other, &model, &xs, &what)?;
                    // Every layer ran through the engine, not the plain branch.
                    assert_eq!(ckpt.take_stats().stacks, stacks, "{what}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn segments_that_keep_their_graph_beside_checkpointed_ones_match_the_plain_calls() -> Result<()> {
    // `first(n)`: the first n layers are checkpointed, the rest keep their graph, so one stack
    // hands back auxiliary outputs both from recomputed layers and from kept graphs.
    let (model, xs) = setup(4)?;
    let plain = step(&model, &xs, None)?;
    for policy in [
        Policy::recompute().first(1),
        Policy::new(Mode::OffloadDisk).segments(2).first(2),
        Policy::new(Mode::OffloadHost).first(3),
    ] {
        let ckpt = Checkpointer::new(policy.clone());
        let other = step(&model, &xs, Some(&ckpt))?;
        assert_same(&plain, &other, &model, &xs, &format!("{policy:?}"))?;
    }
    Ok(())
}

#[test]
fn a_memory_budget_matches_the_plain_calls_bit_for_bit() -> Result<()> {
    let (model, xs) = setup(4)?;
    let plain = step(&model, &xs, None)?;
    // A probe with an unlimited budget measures the costs (and keeps every graph).
    let probe = Checkpointer::new(Policy::new(Mode::OffloadDisk).budget(u64::MAX));
    let probed = step(&model, &xs, Some(&probe))?;
    assert_same(&plain, &probed, &model, &xs, "probe")?;
    let plans = probe.budget_plans();
    let sum = |f: &dyn Fn(&checkpoint_runtime::LayerCost) -> u64| -> Vec<u64> {
        plans.iter().map(|p| p.costs.iter().map(f).sum()).collect()
    };
    let everything = sum(&|c| c.graph_bytes + c.boundary_bytes);
    let boundaries = sum(&|c| c.boundary_bytes);
    let min = |v: &[u64]| v.iter().copied().min().unwrap_or(0);
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
    for (mode, budget) in [
        (Mode::Recompute, max(&boundaries) + min(&everything) / 4),
        (Mode::OffloadDisk, min(&everything) / 2),
        (Mode::OffloadDisk, min(&boundaries) / 2),
    ] {
        let ckpt = Checkpointer::new(Policy::new(mode).budget(budget));
        // Twice: the probe step, then a step with the plan.
        for run in 0..2 {
            let other = step(&model, &xs, Some(&ckpt))?;
            assert_same(
                &plain,
                &other,
                &model,
                &xs,
                &format!("{mode} budget {budget}, run {run}"),
            )?;
        }
        // The budget is tight enough that the plans checkpoint something.
        let placements: Vec<_> = ckpt
            .budget_plans()
            .into_iter()
            .flat_map(|p| p.placements)
            .collect();
        assert!(
            placements
                .iter()
                .any(|p| *p != checkpoint_runtime::Placement::Graph),
            "{mode} budget {budget}: {placements:?}"
        );
    }
    Ok(())
}

#[test]
fn recompute_keeps_only_packed_boundaries_and_recomputes() -> Result<()> {
    let (model, xs) = setup(3)?;
    let ckpt = Checkpointer::new(Policy::recompute());
    let (ys, aux) = model.forward(xs.as_tensor(), Some(&ckpt))?;
    let stats = ckpt.take_stats();
    assert_eq!(stats.stacks, 4, "four loops, four stacks");
    let l = loss(&ys, &aux)?;
    ckpt.backward(&l)?;
    let stats = ckpt.take_stats();
    assert!(
        stats.recompute > std::time::Duration::ZERO,
        "backward recomputed the layers"
    );
    Ok(())
}

#[test]
fn each_boundary_holds_one_carry_and_at_most_one_layers_auxiliary_outputs() -> Result<()> {
    let (model, xs) = setup(6)?;
    let ckpt = Checkpointer::new(Policy::recompute());
    let out = model.routed_outputs(&ckpt, xs.as_tensor())?;
    let stats = ckpt.take_stats();
    let (carry, logits) = (xs.elem_count(), out.aux[0][0].elem_count());
    assert_eq!(stats.segments, 6, "one boundary per layer");
    // The first boundary is the carry; each later one, the carry and the previous layer's
    // router logits: growing with depth would mean every boundary re-holds earlier layers'.
    let f32_bytes = 4;
    let expected = f32_bytes * (carry + 5 * (carry + logits));
    assert_eq!(
        stats.device_bytes,
        u64::try_from(expected).unwrap_or(u64::MAX)
    );
    // And the auxiliary outputs still carry their gradients back into their layers.
    let l = loss(&out.carry[0], &out.aux.concat())?;
    let grads = ckpt.backward(&l)?;
    for layer in &model.routed {
        assert!(grads.get(layer.router.as_tensor()).is_some());
    }
    Ok(())
}

#[test]
fn a_loss_of_auxiliary_outputs_alone_goes_through_the_engine_after_a_refused_backward() -> Result<()>
{
    let (model, xs) = setup(3)?;
    // A loss of the router logits alone, never of the final carry.
    let aux_loss = |engine: &Checkpointer| -> Result<Tensor> {
        let out = model.routed_outputs(engine, xs.as_tensor())?;
        let logits = out.aux.concat();
        loss(&logits[0].zeros_like()?, &logits)
    };
    let router_grads = |engine: &Checkpointer, l: &Tensor| -> Result<Vec<Tensor>> {
        let grads = engine.backward(l).map_err(candle_core::Error::from)?;
        model
            .routed
            .iter()
            .map(|layer| {
                grads
                    .get(layer.router.as_tensor())
                    .cloned()
                    .ok_or_else(|| candle_core::Error::msg("no router gradient"))
            })
            .collect()
    };
    let plain_engine = Checkpointer::new(Policy::none());
    let plain = router_grads(&plain_engine, &aux_loss(&plain_engine)?)?;

    let ckpt = Checkpointer::new(Policy::recompute());
    let l = aux_loss(&ckpt)?;
    // candle's own backward is refused (it would lose the checkpointed gradients) ...
    assert!(l.backward().is_err());
    // ... and the same loss then goes through the engine, as if nothing had happened.
    let ours = router_grads(&ckpt, &l)?;
    for (a, b) in plain.iter().zip(&ours) {
        assert_eq!(max_abs_diff(a, b)?, 0.0);
    }
    Ok(())
}

#[test]
fn a_backward_that_failed_in_another_stack_can_be_retried_without_a_panic() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use checkpoint_runtime::MultiLayer;

    /// A routed layer whose recomputation fails the first time (its second call).
    #[derive(Clone)]
    struct FailsOnce(Routed, Arc<AtomicUsize>);

    impl MultiLayer for FailsOnce {
        const CARRIES: usize = 1;
        fn forward_outputs(&self, carry: &[Tensor], (): &()) -> Result<Vec<Tensor>> {
            if self.1.fetch_add(1, Ordering::SeqCst) == 1 {
                return Err(candle_core::Error::msg("injected recompute failure"));
            }
            let (ys, logits) = self.0.forward(&carry[0], 0.5)?;
            Ok(vec![ys, logits])
        }
    }

    let (model, xs) = setup(2)?;
    let ckpt = Checkpointer::new(Policy::recompute());
    // Two stacks whose losses read only their router logits.
    let first = model.routed_outputs(&ckpt, xs.as_tensor())?;
    let flaky = [FailsOnce(model.routed[0].clone(), Arc::default())];
    let second = ckpt
        .run_stack_outputs(&[xs.as_tensor().clone()], flaky.iter().map(|l| (l, ())))
        .map_err(candle_core::Error::from)?;
    // Interleaved, so that candle runs a tap of the first stack, then the failing second stack,
    // before the first stack's own backward.
    let (a, b) = (first.aux.concat(), second.aux.concat());
    let logits = vec![a[0].clone(), b[0].clone(), a[1].clone()];
    let l = loss(&logits[0].zeros_like()?, &logits)?;
    let err = ckpt
        .backward(&l)
        .expect_err("the second stack fails to recompute");
    assert!(
        err.to_string().contains("injected recompute failure"),
        "{err}"
    );
    // Again: an error (a stack's backward cannot run twice), not a panic in candle.
    assert!(ckpt.backward(&l).is_err());
    Ok(())
}

#[test]
fn an_auxiliary_output_of_another_dtype_is_refused_naming_the_layer() -> Result<()> {
    #[checkpointable]
    #[derive(Clone)]
    struct Ids;

    #[checkpointable]
    impl Ids {
        fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
            Ok((xs.clone(), xs.argmax_keepdim(1)?))
        }
    }

    #[checkpointable(engine = ckpt)]
    fn run(layers: &[Ids], xs: &Tensor, ckpt: &Checkpointer) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut ids = Vec::new();
        #[checkpoint]
        for layer in layers {
            let (h, i) = layer.forward(&xs)?;
            xs = h;
            ids.push(i);
        }
        Ok((xs, ids))
    }

    let xs = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
    let err = run(&[Ids, Ids], &xs, &Checkpointer::new(Policy::recompute()))
        .expect_err("u32 ids cannot travel with an f32 carry");
    let msg = err.to_string();
    assert!(msg.contains("layer 0 (`"), "{msg}");
    assert!(msg.contains("auxiliary output 0 is a U32 tensor"), "{msg}");
    assert!(msg.contains("cast it in the layer"), "{msg}");
    Ok(())
}

#[test]
fn a_carry_that_changes_shape_is_refused_naming_the_layer() -> Result<()> {
    #[checkpointable]
    #[derive(Clone)]
    struct Grow;

    #[checkpointable]
    impl Grow {
        fn forward(&self, carry: (&Tensor, &Tensor)) -> Result<(Tensor, Tensor)> {
            Ok((Tensor::cat(&[carry.0, carry.0], 0)?, carry.1.clone()))
        }
    }

    let xs = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
    let ckpt = Checkpointer::new(Policy::recompute());
    let err = ckpt
        .run_stack_outputs(&[xs.clone(), xs], [(&Grow, GrowKwargsOwned {})])
        .expect_err("the carry doubles");
    let msg = err.to_string();
    assert!(msg.contains("layer 0 (`"), "{msg}");
    assert!(msg.contains("carry output 0 has shape [4]"), "{msg}");
    Ok(())
}

/// A layer whose auxiliary output is computed from the carry it returns.
#[checkpointable]
#[derive(Clone)]
struct OutputStat {
    w: Var,
}

#[checkpointable]
impl OutputStat {
    fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let ys = (xs + xs.broadcast_matmul(self.w.as_tensor())?.tanh()?)?;
        let norm = ys.sqr()?.sum_keepdim(2)?; // (b, t, 1), from the returned carry
        Ok((ys, norm))
    }
}

#[checkpointable(engine = ckpt)]
fn output_stats(
    layers: &[OutputStat],
    xs: &Tensor,
    ckpt: Option<&Checkpointer>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut xs = xs.clone();
    let mut norms = Vec::new();
    #[checkpoint]
    for layer in layers {
        let (h, norm) = layer.forward(&xs)?;
        xs = h;
        norms.push(norm);
    }
    Ok((xs, norms))
}

#[test]
fn an_auxiliary_output_of_the_returned_carry_is_exact_in_values_and_close_in_gradients()
-> Result<()> {
    let dev = Device::Cpu;
    let mut init = Init::new(3);
    let layers = (0..4)
        .map(|_| {
            Ok(OutputStat {
                w: init.var((D, D), 0.5, DType::F32, &dev)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let xs = Init::new(5).var((2, 5, D), 1.0, DType::F32, &dev)?;
    let run = |ckpt: Option<&Checkpointer>| -> Result<(Tensor, Vec<Tensor>, GradStore)> {
        let (ys, norms) = output_stats(&layers, xs.as_tensor(), ckpt)?;
        let l = loss(&ys, &norms)?;
        let grads = match ckpt {
            Some(ckpt) => ckpt.backward(&l)?,
            None => l.backward()?,
        };
        Ok((ys, norms, grads))
    };
    let (ys, norms, plain) = run(None)?;
    for mode in [Mode::Recompute, Mode::OffloadDisk] {
        let ckpt = Checkpointer::new(Policy::new(mode));
        let (ys2, norms2, grads) = run(Some(&ckpt))?;
        assert_eq!(max_abs_diff(&ys, &ys2)?, 0.0, "{mode}");
        for (a, b) in norms.iter().zip(&norms2) {
            assert_eq!(max_abs_diff(a, b)?, 0.0, "{mode}");
        }
        let mut worst = 0.0f64;
        for v in layers.iter().map(|l| &l.w).chain([&xs]) {
            let (Some(a), Some(b)) = (plain.get(v.as_tensor()), grads.get(v.as_tensor())) else {
                panic!("a gradient is missing ({mode})");
            };
            worst = worst.max(checkpoint_tests::compare::rel_err(b, a)?);
        }
        println!("{mode}: largest relative gradient error {worst:e}");
        assert!(worst < 1e-6, "{mode}: {worst:e}");
    }
    Ok(())
}
