//! Misuse and failures get clear errors, never a silent loss of gradients.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Result, Tensor, Var};
use checkpoint_runtime::{Checkpointer, Error, Layer, Mode, Policy};
use checkpoint_tests::init::Init;
use checkpoint_tests::mlp::MlpBlock;

fn stack(depth: usize) -> Result<(Vec<MlpBlock>, Var)> {
    let mut init = Init::new(1);
    let layers = (0..depth)
        .map(|_| MlpBlock::new(8, &mut init, DType::F32, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let x = init.var((2, 8), 1.0, DType::F32, &Device::Cpu)?;
    Ok((layers, x))
}

#[test]
fn backward_twice_through_a_checkpointed_graph_is_an_error() -> Result<()> {
    let (layers, x) = stack(3)?;
    let ckpt = Checkpointer::new(Policy::recompute());
    let y = ckpt.run_stack(x.as_tensor(), layers.iter().map(|l| (l, ())))?;
    let loss = y.sum_all()?;
    ckpt.backward(&loss)?;
    let err = ckpt.backward(&loss).expect_err("second backward must fail");
    assert!(matches!(err, Error::BackwardTwice { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("layer 0 (`MlpBlock::forward`)"), "{msg}");
    assert!(
        msg.contains("mode recompute") && msg.contains("Run the forward pass again"),
        "{msg}"
    );
    Ok(())
}

/// The optimiser trap: a plain `loss.backward()` would return a store without the checkpointed
/// parameters' gradients. It fails on that very step, naming the stack, the mode and the fix,
/// before anything is recomputed, so that the same graph can still go through the engine.
#[test]
fn plain_loss_backward_fails_on_the_same_step() -> Result<()> {
    let (layers, x) = stack(2)?;
    for mode in [Mode::Recompute, Mode::OffloadHost, Mode::OffloadDisk] {
        let ckpt = Checkpointer::new(Policy::new(mode));
        let y = ckpt.run_stack(x.as_tensor(), layers.iter().map(|l| (l, ())))?;
        let loss = y.sum_all()?;
        let err = loss
            .backward()
            .expect_err("a plain backward through a checkpointed stack must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("stack starting at layer 0 (`MlpBlock::forward`)")
                && msg.contains(&format!("(mode {mode})"))
                && msg.contains("ckpt.backward_step(&mut opt, &loss)"),
            "{msg}"
        );
        // Nothing was consumed: the same loss goes through the engine, with every gradient
        // (two layers of four parameters, and the input).
        let grads = ckpt.backward(&loss)?;
        assert_eq!(grads.get_ids().count(), 9, "{mode}");
    }
    Ok(())
}

/// Only the thread running `Checkpointer::backward` collects gradients: a plain backward on
/// another thread meanwhile fails as it would alone, and a second `Checkpointer::backward`
/// of the same engine is refused rather than mixing its gradients with the first one's.
#[test]
fn another_thread_cannot_slip_a_backward_into_a_running_one() -> Result<()> {
    /// Parks its recomputation (its second call) until the main thread has tried its moves.
    #[derive(Clone)]
    struct Parked {
        calls: Arc<AtomicUsize>,
        gate: Arc<std::sync::Barrier>,
        inner: MlpBlock,
    }
    impl Layer for Parked {
        fn forward_checkpointed(&self, x: &Tensor, (): &()) -> Result<Tensor> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 1 {
                self.gate.wait(); // inside the first thread's backward
                self.gate.wait(); // until the main thread is done
            }
            self.inner.forward_checkpointed(x, &())
        }
    }
    let (layers, x) = stack(2)?;
    let gate = Arc::new(std::sync::Barrier::new(2));
    let parked = Parked {
        calls: Arc::new(AtomicUsize::new(0)),
        gate: Arc::clone(&gate),
        inner: layers[0].clone(),
    };
    let ckpt = Checkpointer::new(Policy::recompute());
    let first = ckpt.run(&parked, x.as_tensor(), ())?.sum_all()?;
    let second = ckpt
        .run_stack(x.as_tensor(), layers.iter().map(|l| (l, ())))?
        .sum_all()?;
    std::thread::scope(|scope| -> Result<()> {
        let running = scope.spawn(|| ckpt.backward(&first));
        gate.wait();
        let plain = second.backward().map(drop);
        let concurrent = ckpt.backward(&second).map(drop);
        gate.wait();
        let grads = running
            .join()
            .map_err(|_| candle_core::Error::msg("the backward thread panicked"))??;
        let plain = plain
            .expect_err("a plain backward on another thread")
            .to_string();
        assert!(
            plain.contains("outside `Checkpointer::backward`"),
            "{plain}"
        );
        let concurrent = concurrent.expect_err("a second backward of the same engine");
        assert!(
            matches!(
                concurrent,
                Error::ConcurrentBackward {
                    where_: "on another thread",
                    ..
                }
            ),
            "{concurrent:?}"
        );
        // The first backward got its own gradients and no others: one layer and the input.
        assert_eq!(grads.get_ids().count(), 5);
        Ok(())
    })?;
    // Nothing was consumed by the refused attempts.
    assert_eq!(ckpt.backward(&second)?.get_ids().count(), 9);
    Ok(())
}

/// A layer that fails on its `fail_on`-th call (1-based), to fail during recomputation.
#[derive(Clone)]
struct Flaky {
    calls: Arc<AtomicUsize>,
    fail_on: usize,
    inner: MlpBlock,
}

impl Layer for Flaky {
    fn forward_checkpointed(&self, x: &Tensor, (): &()) -> Result<Tensor> {
        if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_on {
            return Err(candle_core::Error::msg("injected failure"));
        }
        self.inner.forward_checkpointed(x, &())
    }
}

#[test]
fn a_failing_layer_is_named_with_its_phase_and_mode() -> Result<()> {
    let (layers, x) = stack(3)?;
    let flaky: Vec<Flaky> = layers
        .iter()
        .enumerate()
        .map(|(i, inner)| Flaky {
            calls: Arc::new(AtomicUsize::new(0)),
            fail_on: if i == 1 { 2 } else { 0 }, // layer 1 fails when recomputed
            inner: inner.clone(),
        })
        .collect();
    let ckpt = Checkpointer::new(Policy::recompute());
    let y = ckpt.run_stack(x.as_tensor(), flaky.iter().map(|l| (l, ())))?;
    let err = ckpt.backward(&y.sum_all()?).expect_err("recompute fails");
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            Error::Layer {
                phase: "recompute",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        msg.contains("layer 1 (`Flaky::forward`)") && msg.contains("mode recompute"),
        "{msg}"
    );
    assert!(msg.contains("injected failure"), "{msg}");
    // No partial gradients were left behind: the next step is clean and complete.
    let y = ckpt.run_stack(x.as_tensor(), flaky.iter().map(|l| (l, ())))?;
    assert_eq!(ckpt.backward(&y.sum_all()?)?.get_ids().count(), 13);

    let failing_now = Flaky {
        calls: Arc::new(AtomicUsize::new(0)),
        fail_on: 1,
        inner: layers[0].clone(),
    };
    let err = ckpt
        .run(&failing_now, x.as_tensor(), ())
        .expect_err("forward fails");
    assert!(
        matches!(
            err,
            Error::Layer {
                phase: "forward",
                ..
            }
        ),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn an_integer_carry_is_rejected_with_the_mode() -> Result<()> {
    let (layers, _) = stack(1)?;
    let ids = Tensor::new(&[[1u32, 2]], &Device::Cpu)?;
    let err = Checkpointer::new(Policy::recompute())
        .run_stack(&ids, layers.iter().map(|l| (l, ())))
        .expect_err("integer carry");
    assert!(err.to_string().contains("float tensor"), "{err}");
    Ok(())
}

/// A stack whose output is a keyword argument of a stack with several segments: each segment's
/// backward reaches the first stack again. That is refused with an error that says so (not
/// "backward ran twice"), and with one segment it is exact.
#[test]
fn a_stack_feeding_a_keyword_argument_of_a_segmented_stack_is_named() -> Result<()> {
    #[derive(Clone)]
    struct Memory(Tensor);
    impl checkpoint_runtime::Kwargs for Memory {}
    #[derive(Clone)]
    struct Decoder(MlpBlock);
    impl Layer<Memory> for Decoder {
        fn forward_checkpointed(&self, x: &Tensor, memory: &Memory) -> Result<Tensor> {
            self.0.forward_checkpointed(&(x + &memory.0)?, &())
        }
    }
    let (encoder, x) = stack(2)?;
    let (decoder, _) = stack(3)?;
    let decoder: Vec<Decoder> = decoder.into_iter().map(Decoder).collect();
    fn step(
        policy: Policy,
        encoder: &[MlpBlock],
        decoder: &[Decoder],
        x: &Tensor,
    ) -> checkpoint_runtime::Result<candle_core::backprop::GradStore> {
        let ckpt = Checkpointer::new(policy);
        let memory = ckpt.run_stack(x, encoder.iter().map(|l| (l, ())))?;
        let y = ckpt.run_stack(x, decoder.iter().map(|l| (l, Memory(memory.clone()))))?;
        ckpt.backward(&y.sqr()?.sum_all()?)
    }
    let run = |policy| step(policy, &encoder, &decoder, x.as_tensor());
    let err = run(Policy::recompute()).expect_err("three decoder segments");
    assert!(
        matches!(err, Error::StackInKeywordArgument { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("layer 0 (`MlpBlock::forward`)") && msg.contains("Policy::segments"),
        "{msg}"
    );
    // One decoder segment: each stack's backward runs once, and the gradients are exact.
    let plain = run(Policy::none())?;
    let single = run(Policy::recompute().segments(3))?;
    for var in encoder.iter().flat_map(MlpBlock::vars) {
        let (a, b) = (plain.get(var.as_tensor()), single.get(var.as_tensor()));
        let (a, b) = (
            a.expect("plain gradient"),
            b.expect("checkpointed gradient"),
        );
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff == 0.0, "encoder gradient differs by {diff}");
    }
    Ok(())
}

/// A carry whose dtype the host and disk stores cannot keep (f8) is refused before the stack
/// runs, naming the layer, the dtype and the mode, not later as a disk write failure.
#[test]
fn an_f8_carry_is_refused_by_the_offload_stores() -> Result<()> {
    #[derive(Clone)]
    struct Identity;
    impl Layer for Identity {
        fn forward_checkpointed(&self, x: &Tensor, (): &()) -> Result<Tensor> {
            Ok(x.clone())
        }
    }
    let carry = Tensor::zeros((2, 4), DType::F8E4M3, &Device::Cpu)?;
    for mode in [Mode::OffloadHost, Mode::OffloadDisk] {
        let err = Checkpointer::new(Policy::new(mode))
            .run_stack(&carry, [(&Identity, ())])
            .expect_err("f8 cannot be offloaded");
        let msg = err.to_string();
        assert!(
            msg.contains("layer 0 (`Identity::forward`)")
                && msg.contains("F8E4M3")
                && msg.contains(&format!("mode {mode}")),
            "{msg}"
        );
    }
    Ok(())
}
