//! Every boundary store under every policy gives the gradients of the plain graph, exactly.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use checkpoint_runtime::{Checkpointer, DiskConfig, Mode, Policy};
use checkpoint_tests::block::{Block, BlockConfig, BlockKwargs};
use checkpoint_tests::compare::{max_abs_diff, max_grad_diff};
use checkpoint_tests::init::Init;

struct Fixture {
    layers: Vec<Block>,
    kwargs: BlockKwargs,
    x: Var,
    params: Vec<Var>,
}

fn fixture(depth: usize) -> Result<Fixture> {
    let cfg = BlockConfig::small(32);
    let mut init = Init::new(21);
    let layers = (0..depth)
        .map(|_| Block::new(cfg, &mut init, DType::F32, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let params = layers
        .iter()
        .flat_map(|l| l.vars().iter().cloned())
        .collect();
    Ok(Fixture {
        kwargs: BlockKwargs::new(&cfg, 5, DType::F32, &Device::Cpu)?,
        x: init.var((2, 5, 32), 1.0, DType::F32, &Device::Cpu)?,
        layers,
        params,
    })
}

fn step(ckpt: &Checkpointer, f: &Fixture) -> Result<(Tensor, GradStore)> {
    let y = ckpt.run_stack(
        f.x.as_tensor(),
        f.layers.iter().map(|l| (l, f.kwargs.clone())),
    )?;
    let grads = ckpt.backward(&(y.sin()?.sum_all()?))?;
    Ok((y, grads))
}

#[test]
fn every_store_and_policy_matches_none_exactly() -> Result<()> {
    let f = fixture(6)?;
    let (y0, plain) = step(&Checkpointer::new(Policy::none()), &f)?;
    let mut all = f.params.clone();
    all.push(f.x.clone());
    let policies = |mode: Mode| {
        [
            Policy::new(mode),
            Policy::new(mode).segments(2),
            Policy::new(mode).segments(4),
            Policy::new(mode).first(3),
            Policy::new(mode).keep_last(2),
            Policy::new(mode).segments(2).first(5).keep_last(1),
        ]
    };
    for mode in [Mode::Recompute, Mode::OffloadHost, Mode::OffloadDisk] {
        for policy in policies(mode) {
            let ckpt = Checkpointer::new(policy.clone());
            // Two steps: the engine must be reusable and its stores clean after each.
            for _ in 0..2 {
                let (y, grads) = step(&ckpt, &f)?;
                assert_eq!(max_abs_diff(&y0, &y)?, 0.0, "{policy:?}: output");
                assert_eq!(max_grad_diff(&plain, &grads, &all)?, 0.0, "{policy:?}");
                assert_eq!(grads.get_ids().count(), all.len(), "{policy:?}: store size");
            }
            let stats = ckpt.take_stats();
            if mode == Mode::OffloadDisk && policy == Policy::new(mode) {
                assert_eq!(stats.prefetch_hits + stats.prefetch_waits, 12, "{stats:?}");
                assert!(stats.disk_bytes > 0 && stats.device_bytes == 0, "{stats:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn disk_files_are_private_and_removed_after_use_and_on_drop() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let f = fixture(3)?;
    let root = std::env::temp_dir().join(format!("ckpt-private-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let config = DiskConfig {
        root: root.clone(),
        ..DiskConfig::default()
    };
    let ckpt = Checkpointer::with_disk(Policy::new(Mode::OffloadDisk), config);
    let y = ckpt.run_stack(
        f.x.as_tensor(),
        f.layers.iter().map(|l| (l, f.kwargs.clone())),
    )?;
    ckpt.flush()?;
    let dir = ckpt
        .disk_dir()
        .expect("the private directory exists after a disk forward");
    let mode = |p: &std::path::Path| -> Result<u32> {
        Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
    };
    assert_eq!(mode(&dir)?, 0o700);
    let files: Vec<_> = std::fs::read_dir(&dir)?.collect::<std::io::Result<_>>()?;
    assert_eq!(files.len(), 3, "one file per boundary");
    for file in &files {
        assert_eq!(mode(&file.path())?, 0o600);
    }
    ckpt.backward(&y.sum_all()?)?;
    assert_eq!(
        std::fs::read_dir(&dir)?.count(),
        0,
        "files removed after use"
    );
    drop((y, ckpt));
    assert!(!dir.exists(), "directory removed on drop");
    std::fs::remove_dir(&root)?;
    Ok(())
}

/// Budget plans mix kept graphs, recomputation and offload in one stack, still exactly.
#[test]
fn budget_plans_match_none_exactly() -> Result<()> {
    let f = fixture(6)?;
    let (_, plain) = step(&Checkpointer::new(Policy::none()), &f)?;
    let mut all = f.params.clone();
    all.push(f.x.clone());
    // A probe with an unlimited budget measures the costs (and keeps every graph).
    let probe = Checkpointer::new(Policy::new(Mode::OffloadDisk).budget(u64::MAX));
    step(&probe, &f)?;
    let costs = probe.budget_plans().remove(0).costs;
    let everything: u64 = costs.iter().map(|c| c.graph_bytes + c.boundary_bytes).sum();
    let boundaries: u64 = costs.iter().map(|c| c.boundary_bytes).sum();
    // Keep half the graphs; recompute all but one graph; offload half the boundaries.
    for (mode, budget) in [
        (Mode::Recompute, everything / 2),
        (Mode::OffloadDisk, everything / 6 + boundaries),
        (Mode::OffloadDisk, boundaries / 2),
    ] {
        let policy = Policy::new(mode).budget(budget);
        let ckpt = Checkpointer::new(policy);
        for _ in 0..2 {
            let (_, grads) = step(&ckpt, &f)?;
            assert_eq!(
                max_grad_diff(&plain, &grads, &all)?,
                0.0,
                "{mode} budget {budget}"
            );
        }
        let plan = ckpt.budget_plans().remove(0);
        println!("{mode}, budget {budget} B:\n{plan}");
        assert!(plan.device_bytes <= plan.budget);
        let kinds: std::collections::HashSet<_> = plan.placements.iter().collect();
        assert!(
            kinds.len() >= 2,
            "{mode}: expected a mixed plan, got {:?}",
            plan.placements
        );
    }
    Ok(())
}

/// On a CPU device host memory is the device's memory: a budget in offload-host could only be
/// met on paper, so it is refused with the way out.
#[test]
fn a_host_offload_budget_on_the_cpu_is_refused() -> Result<()> {
    let f = fixture(2)?;
    let ckpt = Checkpointer::new(Policy::new(Mode::OffloadHost).budget(0));
    let err = ckpt
        .run_stack(
            f.x.as_tensor(),
            f.layers.iter().map(|l| (l, f.kwargs.clone())),
        )
        .expect_err("nothing can fit a budget of 0 on the CPU");
    let msg = err.to_string();
    assert!(
        msg.contains("offload-host") && msg.contains("CPU") && msg.contains("offload-disk"),
        "{msg}"
    );
    Ok(())
}

/// The stats of one step say where every boundary lived.
#[test]
fn stats_count_boundaries_by_location() -> Result<()> {
    let f = fixture(6)?;
    let boundary = (f.x.elem_count() * 4) as u64;
    for mode in [Mode::Recompute, Mode::OffloadHost, Mode::OffloadDisk] {
        let ckpt = Checkpointer::new(Policy::new(mode).keep_last(2));
        step(&ckpt, &f)?;
        let stats = ckpt.take_stats();
        println!("{mode}:\n{stats}");
        assert_eq!((stats.stacks, stats.segments), (1, 6), "{mode}");
        // keep_last(2): the last two boundaries stay on the device in every mode.
        let (device, elsewhere) = if mode == Mode::Recompute {
            (6, 0)
        } else {
            (2, 4)
        };
        assert_eq!(stats.device_bytes, device * boundary, "{mode}");
        assert_eq!(stats.peak_device_bytes, device * boundary, "{mode}");
        let offloaded = match mode {
            Mode::OffloadHost => stats.host_bytes,
            Mode::OffloadDisk => stats.disk_bytes,
            _ => stats.host_bytes + stats.disk_bytes,
        };
        assert_eq!(offloaded, elsewhere * boundary, "{mode}");
        let disk_fetches = if mode == Mode::OffloadDisk { 4 } else { 0 };
        assert_eq!(
            stats.prefetch_hits + stats.prefetch_waits,
            disk_fetches,
            "{mode}"
        );
        assert!(stats.recompute > std::time::Duration::ZERO, "{mode}");
        assert_eq!(
            ckpt.take_stats(),
            checkpoint_runtime::Stats::default(),
            "taken"
        );
    }
    Ok(())
}
