//! The engine model code calls: [`Checkpointer`].

use std::collections::HashMap;
use std::mem;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, ThreadId};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};
use candle_nn::Optimizer;

use std::time::Instant;

use crate::autograd::{Kept, Outputs, Ran, Stack, StackOp, Tap, TapGrads, TapOp, run_segment};
use crate::budget::{BudgetPlan, LayerCost, graph_bytes, plan_budget};
use crate::error::{Error, Result};
use crate::layer::{Kwargs, Layer, describe};
use crate::policy::{Mode, Placement, Policy, Segment};
use crate::rng::{StackKey, Streams};
use crate::stats::Stats;
use crate::store::disk::DiskConfig;
use crate::store::{Boundary, Readers, Saved, Stores, tensor_bytes};
use crate::sync::lock;

/// Runs layer stacks under a checkpointing [`Policy`] and computes complete gradients.
///
/// Use one `Checkpointer` per model and step loop: run the stacks through it during the forward
/// pass, then call [`Checkpointer::backward_step`] (not candle-nn's `opt.backward_step(&loss)`)
/// to step an optimizer, or [`Checkpointer::backward`] (not `loss.backward()`) for the
/// gradients themselves.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use checkpoint_runtime::{Checkpointer, Layer, Policy};
///
/// #[derive(Clone)]
/// struct Scale(Var);
///
/// impl Layer for Scale {
///     fn forward_checkpointed(&self, x: &Tensor, (): &()) -> candle_core::Result<Tensor> {
///         x.broadcast_mul(self.0.as_tensor())?.tanh()
///     }
/// }
///
/// # fn main() -> checkpoint_runtime::Result<()> {
/// let dev = Device::Cpu;
/// let layers = [Scale(Var::new(&[0.5f32], &dev)?), Scale(Var::new(&[2.0f32], &dev)?)];
/// let ckpt = Checkpointer::new(Policy::recompute());
/// let x = Tensor::new(&[[1.0f32, -1.0]], &dev)?;
/// let y = ckpt.run_stack(&x, layers.iter().map(|l| (l, ())))?;
/// let grads = ckpt.backward(&y.sum_all()?)?;
/// assert!(grads.get(layers[0].0.as_tensor()).is_some());
/// # Ok(())
/// # }
/// ```
///
/// # Gradients that `loss.backward()` cannot see
///
/// Parameter gradients of checkpointed layers are computed while candle's backward recomputes
/// them, and handed to this engine rather than to candle's store. A plain `loss.backward()`
/// would return a store without them, and an optimizer stepped with it (candle-nn's
/// `opt.backward_step(&loss)` does exactly that) would silently skip every checkpointed weight.
/// So a checkpointed stack refuses to run its backward outside [`Checkpointer::backward`] of
/// its engine, on the thread that called it: `loss.backward()` and `opt.backward_step(&loss)`
/// fail on that very step with [`Error::BackwardOutsideEngine`], before anything is
/// recomputed, and the optimizer never steps. The graph is left intact: the same loss can
/// still go through the engine.
///
/// ```
/// # use candle_core::{Device, Tensor, Var};
/// # use candle_nn::{Optimizer, SGD};
/// # use checkpoint_runtime::{Checkpointer, Layer, Policy};
/// # #[derive(Clone)]
/// # struct Scale(Var);
/// # impl Layer for Scale {
/// #     fn forward_checkpointed(&self, x: &Tensor, (): &()) -> candle_core::Result<Tensor> {
/// #         x.broadcast_mul(self.0.as_tensor())?.tanh()
/// #     }
/// # }
/// # fn main() -> checkpoint_runtime::Result<()> {
/// let layer = Scale(Var::new(&[0.5f32], &Device::Cpu)?);
/// let mut opt = SGD::new(vec![layer.0.clone()], 0.1)?;
/// let ckpt = Checkpointer::new(Policy::recompute());
/// let x = Tensor::new(&[[1.0f32, 2.0]], &Device::Cpu)?;
/// let loss = ckpt.run(&layer, &x, ())?.sum_all()?;
/// let err = opt.backward_step(&loss).expect_err("would skip the checkpointed weight");
/// assert!(err.to_string().contains("ckpt.backward_step(&mut opt, &loss)"));
/// assert_eq!(layer.0.to_vec1::<f32>()?, [0.5]); // not stepped
/// ckpt.backward_step(&mut opt, &loss)?; // the same graph, through the engine
/// assert_ne!(layer.0.to_vec1::<f32>()?, [0.5]);
/// # Ok(())
/// # }
/// ```
///
/// # Stacks inside stacks
///
/// A layer may run a stack of its own through the same engine: it runs again inside each
/// recomputed segment, and the gradients are still the plain graph's. A stack whose *output*
/// is a keyword argument of another stack (an encoder feeding cross-attention) works when that
/// other stack is one segment; with more segments, each segment's backward would need the
/// first stack again, and [`Error::StackInKeywordArgument`] says so.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    shared: Arc<Shared>,
}

/// State shared by the engine and the stack nodes it put into candle's graph.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) policy: Policy,
    /// Parameter gradients produced by recomputation, not yet merged into a store.
    collected: Mutex<HashMap<TensorId, Tensor>>,
    /// The typed error behind a failed backward (candle only carries its message).
    fault: Mutex<Option<Error>>,
    stats: Mutex<Stats>,
    pub(crate) stores: Stores,
    /// Budget plans from probe steps, per stack length and carry size bucket (see
    /// [`PlanKey`]), each with the carry element count it was probed at.
    plans: Mutex<HashMap<PlanKey, (usize, BudgetPlan)>>,
    /// How many stack backwards are running (more than one: nested in a recomputed segment).
    depth: AtomicUsize,
    /// The thread running [`Checkpointer::backward`], while it runs: the only backward whose
    /// stack gradients reach a store.
    collecting: Mutex<Option<ThreadId>>,
    /// The seed and stack count that key the layers' random draws.
    rng: Streams,
}

/// What a budget plan is kept under: the number of layers and the carry's element count
/// rounded up to a power of two. Padded batches change the sequence length nearly every step;
/// probing each length anew would measure every layer again and again, while a bucket is
/// probed once (or again on a carry larger than any it was probed on, see
/// [`Checkpointer::budget_plans`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PlanKey {
    layers: usize,
    bucket: usize,
}

impl PlanKey {
    fn new(layers: usize, carry: &Tensor) -> Self {
        Self {
            layers,
            bucket: carry.elem_count().next_power_of_two(),
        }
    }
}

/// Marks [`Checkpointer::backward`] as running on this thread until it drops, unwinding
/// included.
struct Collecting<'a>(&'a Shared);

impl Drop for Collecting<'_> {
    fn drop(&mut self) {
        *lock(&self.0.collecting) = None;
    }
}

/// Counts one stack backward for as long as it runs, unwinding included.
pub(crate) struct BackwardDepth<'a> {
    depth: &'a AtomicUsize,
    /// Whether another stack's backward was already running (this one is nested in it).
    pub(crate) nested: bool,
}

impl Drop for BackwardDepth<'_> {
    fn drop(&mut self) {
        self.depth.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    pub(crate) fn collect(&self, var: &Tensor, grad: Tensor) -> candle_core::Result<()> {
        let mut collected = lock(&self.collected);
        let grad = match collected.remove(&var.id()) {
            Some(prev) => prev.add(&grad)?.detach(),
            None => grad,
        };
        collected.insert(var.id(), grad);
        Ok(())
    }

    /// Keeps `hidden` as the boundary of `seg`, wherever the segment's placement says.
    pub(crate) fn store(&self, hidden: &Tensor, seg: Segment, layer: &str) -> Result<Boundary> {
        let started = Instant::now();
        let boundary = self.stores.put(hidden, seg.placement, layer)?;
        let bytes = boundary.bytes();
        let mut stats = self.stats_mut();
        stats.add_boundary(seg.placement, bytes);
        match seg.placement {
            Placement::Device => {
                stats.peak_device_bytes = stats.peak_device_bytes.max(self.stores.resident_bytes());
            }
            // The copy to host memory happens here.
            Placement::Host => stats.transfer += started.elapsed(),
            // Only a hand-over to the writer: its write time is counted when the file is read
            // back, and counting the wait here as well would count it twice.
            Placement::Disk | Placement::Graph => {}
        }
        Ok(boundary)
    }

    /// Brings a boundary back to the compute device, accounting for it.
    pub(crate) fn fetch(
        &self,
        boundary: Boundary,
        readers: &Readers,
        layer: &str,
    ) -> Result<Tensor> {
        let fetched = boundary.fetch(readers, layer)?;
        let mut stats = self.stats_mut();
        stats.transfer += fetched.transfer;
        match fetched.waited {
            Some(true) => stats.prefetch_waits += 1,
            Some(false) => stats.prefetch_hits += 1,
            None => {}
        }
        Ok(fetched.tensor)
    }

    /// Records a typed error for [`Checkpointer::backward`] and hands candle its message.
    pub(crate) fn fail(&self, err: Error) -> candle_core::Error {
        let message = candle_core::Error::msg(err.to_string());
        let mut fault = lock(&self.fault);
        if fault.is_none() {
            *fault = Some(err);
        }
        message
    }

    /// Refuses a stack backward that no [`Checkpointer::backward`] of this engine runs on this
    /// thread: its parameter gradients could reach no store (see [`Checkpointer`]).
    pub(crate) fn ensure_collecting(&self, layer: impl FnOnce() -> String) -> Result<()> {
        if *lock(&self.collecting) == Some(thread::current().id()) {
            Ok(())
        } else {
            Err(Error::BackwardOutsideEngine {
                layer: layer(),
                mode: self.policy.mode(),
            })
        }
    }

    /// Marks a [`Checkpointer::backward`] as running on this thread, unless one already runs.
    fn start_collecting(&self) -> Result<Collecting<'_>> {
        let mut owner = lock(&self.collecting);
        let me = thread::current().id();
        match *owner {
            None => {
                *owner = Some(me);
                Ok(Collecting(self))
            }
            Some(other) => Err(Error::ConcurrentBackward {
                mode: self.policy.mode(),
                where_: if other == me {
                    "on this thread (called from inside a layer)"
                } else {
                    "on another thread"
                },
            }),
        }
    }

    /// How many stack backwards are running now.
    pub(crate) fn backward_depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Counts a stack backward until the returned guard drops.
    pub(crate) fn enter_backward(&self) -> BackwardDepth<'_> {
        let outer = self.depth.fetch_add(1, Ordering::SeqCst);
        BackwardDepth {
            depth: &self.depth,
            nested: outer > 0,
        }
    }

    pub(crate) fn stats_mut(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }

    /// Fails if a previous backward left parameter gradients behind, and forgets them.
    fn check_collected(&self) -> Result<()> {
        let count = mem::take(&mut *lock(&self.collected)).len();
        if count == 0 {
            Ok(())
        } else {
            Err(Error::UncollectedGradients {
                count,
                mode: self.policy.mode(),
            })
        }
    }
}

/// Forgets what a backward collected if a panic unwinds through it, so that half a step's
/// gradients are neither merged into the next step nor reported as uncollected by it.
struct ForgetOnUnwind<'a>(&'a Shared);

impl Drop for ForgetOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            lock(&self.0.collected).clear();
            *lock(&self.0.fault) = None;
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let left = lock(&self.collected).len();
        if left > 0 && !std::thread::panicking() {
            eprintln!(
                "checkpointable: warning: {}",
                Error::UncollectedGradients {
                    count: left,
                    mode: self.policy.mode()
                }
            );
        }
    }
}

impl Checkpointer {
    /// An engine that applies `policy` to every stack it runs. Disk boundaries, if the policy
    /// uses any, go under the system's temporary directory.
    #[must_use]
    pub fn new(policy: Policy) -> Self {
        Self::with_disk(policy, DiskConfig::default())
    }

    /// An engine whose disk boundaries follow `disk`. The private directory is created when the
    /// first boundary goes to disk.
    #[must_use]
    pub fn with_disk(policy: Policy, disk: DiskConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                policy,
                collected: Mutex::default(),
                fault: Mutex::default(),
                stats: Mutex::default(),
                stores: Stores::new(disk),
                plans: Mutex::default(),
                depth: AtomicUsize::new(0),
                collecting: Mutex::default(),
                rng: Streams::default(),
            }),
        }
    }

    /// This engine, drawing its layers' randomness ([`rng`](crate::rng)) from `seed`, and
    /// counting stacks from zero again. Without it the seed is 0.
    ///
    /// The masks a layer draws are a function of the seed, how many stacks the engine ran
    /// before (since it was created or reseeded), the layer's position in its stack and the
    /// draw's position in the layer. So each step draws new masks, and a training run started
    /// again from the same seed draws the same ones, in every mode. Clones of an engine share
    /// its seed.
    #[must_use]
    pub fn with_seed(self, seed: u64) -> Self {
        self.shared.rng.reseed(seed);
        self
    }

    /// The seed of the layers' random draws; see [`with_seed`](Self::with_seed).
    #[must_use]
    pub fn seed(&self) -> u64 {
        self.shared.rng.seed()
    }

    /// Waits until every boundary sent to disk so far is written.
    ///
    /// # Errors
    /// The first failed write, naming the layer and the file.
    pub fn flush(&self) -> Result<()> {
        self.shared.stores.disk.flush()
    }

    /// The engine's private directory for disk boundaries, once created.
    #[must_use]
    pub fn disk_dir(&self) -> Option<PathBuf> {
        self.shared.stores.disk.dir()
    }

    /// The policy this engine applies.
    #[must_use]
    pub fn policy(&self) -> &Policy {
        &self.shared.policy
    }

    /// The mode of the checkpointed layers.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.shared.policy.mode()
    }

    /// Runs one layer invocation: a stack of one.
    ///
    /// # Errors
    /// The layer's error, naming it.
    pub fn run<L, K>(&self, layer: &L, carry: &Tensor, kwargs: K) -> Result<Tensor>
    where
        L: Layer<K>,
        K: Kwargs,
    {
        self.run_stack(carry, [(layer, kwargs)])
    }

    /// Runs a stack of layer invocations, each with its own keyword arguments, feeding each
    /// layer's output to the next. The result is an ordinary tensor of candle's graph; an empty
    /// stack returns the carry itself.
    ///
    /// # Errors
    /// A layer's error, naming the layer and the mode; a candle error for a carry that is not a
    /// float tensor.
    pub fn run_stack<'a, L, K, I>(&self, carry: &Tensor, calls: I) -> Result<Tensor>
    where
        L: Layer<K>,
        K: Kwargs,
        I: IntoIterator<Item = (&'a L, K)>,
    {
        Ok(self.run_tapped(carry, calls, None)?.output)
    }

    /// [`run_stack`](Self::run_stack), also handing back the `tap`ped part of every layer's
    /// output (one per layer, in [`Ran::taps`]), each in candle's graph: gradients reaching a
    /// part flow back into its layer, recomputed or not.
    pub(crate) fn run_tapped<'a, L, K, I>(
        &self,
        carry: &Tensor,
        calls: I,
        tap: Option<Tap>,
    ) -> Result<Ran>
    where
        L: Layer<K>,
        K: Kwargs,
        I: IntoIterator<Item = (&'a L, K)>,
    {
        let shared = &self.shared;
        // A stack run while a recomputed segment runs (a stack nested in a layer) belongs to
        // that backward, whose gradients are being collected: they are not left over.
        if shared.backward_depth() == 0 {
            shared.check_collected()?;
        }
        let calls: Vec<(L, K)> = calls
            .into_iter()
            .map(|(layer, kwargs)| (layer.clone(), kwargs))
            .collect();
        let mode = shared.policy.mode();
        // Keyed in every mode, so that each layer draws the same randomness in all of them.
        let key = shared.rng.next_stack();
        let plan = match shared.policy.memory_budget() {
            Some(budget) => self.budget_segments(&calls, carry, budget, key)?,
            None => shared.policy.plan(calls.len()),
        };
        shared.stats_mut().stacks += 1;
        if plan.iter().all(|seg| seg.placement == Placement::Graph) {
            let whole = Segment {
                start: 0,
                end: calls.len(),
                placement: Placement::Graph,
            };
            return run_segment(&calls, whole, carry, key, mode, Outputs::Keep, tap);
        }
        if !carry.dtype().is_float() {
            return Err(Error::Config(format!(
                "the carry of the checkpointed stack starting at {} (mode {mode}) is a {:?} \
                 tensor, but gradients flow only through float tensors: pass the float hidden \
                 states as the carry (token ids belong in a keyword argument), or run the stack \
                 with Mode::None",
                describe::<L, K>(0),
                carry.dtype()
            )));
        }

        let check = shared.policy.recompute_check();
        let mut hidden = carry.detach();
        let mut saved = Vec::with_capacity(plan.len());
        // The tapped parts' values, handed out by the tap nodes below.
        let mut parts = Vec::new();
        for seg in plan {
            let mut prints = Vec::new();
            let (kept, taps) = if seg.placement == Placement::Graph {
                let input = Var::from_tensor(&hidden)?;
                let ran = run_segment(
                    &calls,
                    seg,
                    input.as_tensor(),
                    key,
                    mode,
                    Outputs::Keep,
                    tap,
                )?;
                hidden = ran.output.detach();
                parts.extend(ran.taps.iter().map(|t| t.as_ref().map(Tensor::detach)));
                let output = ran.output;
                (Saved::Graph { input, output }, ran.taps)
            } else {
                let boundary = shared.store(&hidden, seg, &describe::<L, K>(seg.start))?;
                let record = Outputs::Record(&mut prints, check);
                let ran = run_segment(&calls, seg, &hidden, key, mode, record, tap)?;
                hidden = ran.output;
                parts.extend(ran.taps);
                (Saved::Boundary(boundary), Vec::new())
            };
            saved.push(Kept {
                seg,
                saved: kept,
                prints,
                taps,
            });
        }

        let anchor = Var::zeros(1, carry.dtype(), carry.device())?;
        let grads = tap.map(|_| Arc::new(TapGrads::new(calls.len())));
        let op = StackOp {
            shared: Arc::clone(shared),
            output: Mutex::new(Some(hidden)),
            stack: Mutex::new(Some(Stack { calls, saved, key })),
            taps: tap.zip(grads.clone()),
        };
        let output = carry.apply_op2(anchor.as_tensor(), op)?;
        let taps = match grads {
            None => Vec::new(),
            Some(grads) => parts
                .into_iter()
                .enumerate()
                .map(|(index, part)| {
                    part.map(|part| {
                        output.apply_op1(TapOp {
                            index,
                            part: Mutex::new(Some(part)),
                            grads: Arc::clone(&grads),
                        })
                    })
                    .transpose()
                })
                .collect::<candle_core::Result<_>>()?,
        };
        Ok(Ran { output, taps })
    }

    /// The budget plan for `calls` on `carry`: its bucket's plan (see [`PlanKey`]), probing the
    /// layers on the bucket's first carry and on any carry larger than the one probed, so that
    /// the plan is made for the largest carry its bucket has run and fits the smaller ones.
    /// Probes run inside the invocations of `stack`, so that they draw what the forward will.
    fn budget_segments<L: Layer<K>, K: Kwargs>(
        &self,
        calls: &[(L, K)],
        carry: &Tensor,
        budget: u64,
        stack: StackKey,
    ) -> Result<Vec<Segment>> {
        let key = PlanKey::new(calls.len(), carry);
        let elems = carry.elem_count();
        if let Some((probed, plan)) = lock(&self.shared.plans).get(&key)
            && *probed >= elems
        {
            return Ok(plan.segments());
        }
        let mode = self.mode();
        if mode == Mode::OffloadHost && carry.device().is_cpu() {
            return Err(Error::Config(format!(
                "a memory budget in mode {mode} on a CPU device: host memory is the CPU's own \
                 memory, so offloading to it frees nothing and no plan could honestly fit. Use \
                 offload-disk (or recompute) for a budget on the CPU; offload-host budgets are \
                 for GPUs"
            )));
        }
        let mut hidden = carry.detach();
        let mut costs = Vec::with_capacity(calls.len());
        for (index, (layer, kwargs)) in calls.iter().enumerate() {
            let input = Var::from_tensor(&hidden)?;
            let started = Instant::now();
            let output = stack
                .invoke(index, || {
                    layer.forward_checkpointed(input.as_tensor(), kwargs)
                })
                .map_err(|source| Error::Layer {
                    layer: describe::<L, K>(index),
                    phase: "probe",
                    mode,
                    source: Box::new(source),
                })?;
            costs.push(LayerCost {
                forward: started.elapsed(),
                graph_bytes: graph_bytes(&output),
                boundary_bytes: tensor_bytes(&hidden),
            });
            hidden = output.detach();
        }
        let plan = plan_budget(&costs, budget, mode)?;
        let segments = plan.segments();
        lock(&self.shared.plans).insert(key, (elems, plan));
        Ok(segments)
    }

    /// The plans a budget policy made, in increasing stack length and carry size.
    ///
    /// A plan is made from costs measured on a probe step (every layer run once more, keeping
    /// its graph) and kept per stack length and *bucket* of carry sizes: the carry's element
    /// count rounded up to a power of two. Padded batches whose lengths fall in one bucket
    /// share one plan instead of probing every length. A bucket's plan is made for the largest
    /// carry it has run: a carry no larger reuses it (its layers cost no more), a larger one
    /// is probed and its plan replaces the bucket's. Sorting batches from long to short, or
    /// starting with the longest, probes each bucket once.
    #[must_use]
    pub fn budget_plans(&self) -> Vec<BudgetPlan> {
        let plans = lock(&self.shared.plans);
        let mut keys: Vec<_> = plans.keys().collect();
        keys.sort_unstable();
        keys.into_iter()
            .filter_map(|k| plans.get(k).map(|(_, plan)| plan.clone()))
            .collect()
    }

    /// Runs the backward pass from `loss` and returns every parameter's gradient: those of the
    /// plain graph and those computed by recomputation, summed where a weight is shared, detached,
    /// and only for `Var`s, so that the store keeps no activation alive.
    ///
    /// To step an optimizer with them, [`Checkpointer::backward_step`] is the one call.
    ///
    /// # Errors
    /// A layer's error during recomputation (naming the layer), [`Error::BackwardTwice`] for a
    /// graph whose checkpointed stacks already ran backward, [`Error::ConcurrentBackward`]
    /// while another backward of this engine runs, or a store fault. On error no gradient is
    /// returned and none is left behind.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let shared = &self.shared;
        let collecting = shared.start_collecting()?;
        shared.check_collected()?;
        *lock(&shared.fault) = None;
        let _unwinding = ForgetOnUnwind(shared);
        let raw = loss.backward();
        drop(collecting);
        let collected = mem::take(&mut *lock(&shared.collected));
        let raw = match raw {
            Ok(raw) => raw,
            Err(err) => return Err(lock(&shared.fault).take().unwrap_or(Error::Candle(err))),
        };

        let mut grads = GradStore::default();
        for node in loss.sorted_nodes() {
            if node.is_variable()
                && let Some(grad) = raw.get(node)
            {
                grads.insert(node, grad.detach());
            }
        }
        drop(raw);
        for (id, grad) in collected {
            let grad = match grads.get_id(id) {
                Some(plain) => plain.add(&grad)?.detach(),
                None => grad,
            };
            grads.insert_id(id, grad);
        }
        Ok(grads)
    }

    /// Runs the backward pass from `loss` through this engine and steps `opt` with every
    /// gradient: the checkpointed layers' included, which candle-nn's own
    /// `opt.backward_step(&loss)` cannot see (it fails with [`Error::BackwardOutsideEngine`]).
    /// Returns the gradients the optimizer stepped with, for logging or a [`GradientAudit`].
    ///
    /// ```
    /// # use candle_core::{Device, Tensor, Var};
    /// # use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    /// # use checkpoint_runtime::{Checkpointer, Layer, Policy};
    /// # #[derive(Clone)]
    /// # struct Scale(Var);
    /// # impl Layer for Scale {
    /// #     fn forward_checkpointed(&self, x: &Tensor, (): &()) -> candle_core::Result<Tensor> {
    /// #         x.broadcast_mul(self.0.as_tensor())?.tanh()
    /// #     }
    /// # }
    /// # fn main() -> checkpoint_runtime::Result<()> {
    /// let layer = Scale(Var::new(&[0.5f32], &Device::Cpu)?);
    /// let mut opt = AdamW::new(vec![layer.0.clone()], ParamsAdamW::default())?;
    /// let ckpt = Checkpointer::new(Policy::recompute());
    /// let x = Tensor::new(&[[1.0f32, -1.0]], &Device::Cpu)?;
    /// let loss = ckpt.run(&layer, &x, ())?.sqr()?.sum_all()?;
    /// ckpt.backward_step(&mut opt, &loss)?;
    /// assert_ne!(layer.0.to_vec1::<f32>()?, [0.5]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// [`GradientAudit`]: crate::GradientAudit
    ///
    /// # Errors
    /// Those of [`Checkpointer::backward`] (the optimizer then does not step), or the
    /// optimizer's.
    pub fn backward_step<O: Optimizer>(&self, opt: &mut O, loss: &Tensor) -> Result<GradStore> {
        let grads = self.backward(loss)?;
        opt.step(&grads)?;
        Ok(grads)
    }

    /// The statistics gathered since the last call, resetting them.
    pub fn take_stats(&self) -> Stats {
        mem::take(&mut *self.shared.stats_mut())
    }
}
