//! Planning a stack to fit a memory budget, from per-layer costs measured on a probe step.
//!
//! The budget bounds the bytes a stack keeps on the compute device between its forward and its
//! backward (the stack's output, which the rest of the model holds anyway, is not counted). Each layer can keep its graph (no extra time), keep only its boundary and be
//! recomputed (its forward time again), or offload its boundary (forward time plus a transfer).
//! The planner starts from the plain graph and takes the cheapest savings first: recompute the
//! layers that free the most bytes per second of recomputation, then offload boundaries,
//! earliest layers first (backward needs them last, which leaves prefetch the most time).

use std::fmt;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::policy::{Mode, Placement, Segment};

/// Bytes per second assumed for moving a boundary to host memory and back.
pub const HOST_BANDWIDTH: f64 = 8.0 * (1u64 << 30) as f64;
/// Bytes per second assumed for writing a boundary to disk and reading it back.
pub const DISK_BANDWIDTH: f64 = 1.0 * (1u64 << 30) as f64;

/// What one layer costs, measured on a probe step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerCost {
    /// Bytes the layer's autograd graph keeps alive (its activations), input excluded.
    pub graph_bytes: u64,
    /// Bytes of the layer's input (its boundary).
    pub boundary_bytes: u64,
    /// Time of one forward of the layer.
    pub forward: Duration,
}

/// The planner's choice for a stack.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetPlan {
    /// The budget, in bytes.
    pub budget: u64,
    /// The measured costs, per layer.
    pub costs: Vec<LayerCost>,
    /// The placement chosen per layer.
    pub placements: Vec<Placement>,
    /// Bytes the plan keeps on the device between forward and backward.
    pub device_bytes: u64,
    /// Time the plan adds to a step: recomputation and transfers.
    pub extra: Duration,
}

impl BudgetPlan {
    /// The plan as segments of one layer each.
    #[must_use]
    pub fn segments(&self) -> Vec<Segment> {
        self.placements
            .iter()
            .enumerate()
            .map(|(i, &placement)| Segment {
                start: i,
                end: i + 1,
                placement,
            })
            .collect()
    }
}

fn resident(cost: &LayerCost, placement: Placement) -> u64 {
    match placement {
        Placement::Graph => cost.graph_bytes + cost.boundary_bytes,
        Placement::Device => cost.boundary_bytes,
        Placement::Host | Placement::Disk => 0,
    }
}

#[allow(clippy::cast_precision_loss)]
fn transfer(cost: &LayerCost, placement: Placement) -> Duration {
    let bandwidth = match placement {
        Placement::Host => HOST_BANDWIDTH,
        Placement::Disk => DISK_BANDWIDTH,
        Placement::Graph | Placement::Device => return Duration::ZERO,
    };
    Duration::from_secs_f64(2.0 * cost.boundary_bytes as f64 / bandwidth)
}

fn extra(cost: &LayerCost, placement: Placement) -> Duration {
    match placement {
        Placement::Graph => Duration::ZERO,
        _ => cost.forward + transfer(cost, placement),
    }
}

/// Chooses a placement per layer so that the bytes kept fit `budget`, with the least added
/// time. `mode` bounds the choice: `Recompute` never offloads; `OffloadHost`/`OffloadDisk`
/// offload to that store.
///
/// # Errors
/// [`Error::Config`] if even the most frugal plan does not fit, saying how much it needs.
pub fn plan_budget(costs: &[LayerCost], budget: u64, mode: Mode) -> Result<BudgetPlan> {
    let offload = match mode {
        Mode::OffloadHost => Some(Placement::Host),
        Mode::OffloadDisk => Some(Placement::Disk),
        Mode::Recompute => None,
        Mode::None => {
            return Err(Error::Config(
                "a memory budget needs a checkpointing mode: recompute, offload-host or \
                 offload-disk (mode none keeps every graph)"
                    .to_owned(),
            ));
        }
    };
    let mut placements = vec![Placement::Graph; costs.len()];
    let total =
        |p: &[Placement]| -> u64 { costs.iter().zip(p).map(|(c, &p)| resident(c, p)).sum() };

    // Recompute first where it frees the most bytes per second spent recomputing.
    let mut by_yield: Vec<usize> = (0..costs.len()).collect();
    #[allow(clippy::cast_precision_loss)]
    let yield_of =
        |i: usize| costs[i].graph_bytes as f64 / costs[i].forward.as_secs_f64().max(1e-9);
    by_yield.sort_by(|&a, &b| yield_of(b).total_cmp(&yield_of(a)));
    for &i in &by_yield {
        if total(&placements) <= budget {
            break;
        }
        placements[i] = Placement::Device;
    }
    // Then offload boundaries, earliest layers first.
    if let Some(store) = offload {
        for i in 0..placements.len() {
            if total(&placements) <= budget {
                break;
            }
            placements[i] = store;
        }
    }
    let device_bytes = total(&placements);
    if device_bytes > budget {
        let floor: u64 = costs
            .iter()
            .map(|c| resident(c, offload.unwrap_or(Placement::Device)))
            .sum();
        return Err(Error::Config(format!(
            "memory budget of {budget} bytes cannot be met in mode {mode}: the stack needs at \
             least {floor} bytes. Raise the budget{}",
            if offload.is_some() {
                ""
            } else {
                ", or allow offloading (offload-host, offload-disk)"
            }
        )));
    }
    let extra = costs
        .iter()
        .zip(&placements)
        .map(|(c, &p)| extra(c, p))
        .sum();
    Ok(BudgetPlan {
        budget,
        costs: costs.to_vec(),
        placements,
        device_bytes,
        extra,
    })
}

impl fmt::Display for BudgetPlan {
    #[allow(clippy::cast_precision_loss)]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        writeln!(
            f,
            "memory plan: {:.2} MiB kept of a {:.2} MiB budget, {:.1} ms added per step",
            mib(self.device_bytes),
            mib(self.budget),
            self.extra.as_secs_f64() * 1e3
        )?;
        writeln!(
            f,
            "| layer | graph (MiB) | boundary (MiB) | forward (ms) | placement    |"
        )?;
        write!(
            f,
            "|------:|------------:|---------------:|-------------:|--------------|"
        )?;
        for (i, (c, p)) in self.costs.iter().zip(&self.placements).enumerate() {
            let choice = match p {
                Placement::Graph => "keep graph",
                Placement::Device => "recompute",
                Placement::Host => "offload host",
                Placement::Disk => "offload disk",
            };
            write!(
                f,
                "\n| {i:>5} | {:>11.2} | {:>14.2} | {:>12.2} | {choice:<12} |",
                mib(c.graph_bytes),
                mib(c.boundary_bytes),
                c.forward.as_secs_f64() * 1e3
            )?;
        }
        Ok(())
    }
}

/// Bytes the autograd graph behind `out` keeps alive: the storages of its nodes, except those a
/// `Var` owns. The parameters, and views of them (`Linear` multiplies by `weight.t()`), are
/// alive whether the graph is kept or not; counting them would charge each layer its weights.
/// Views that share a buffer count it once, at the extent they address.
pub(crate) fn graph_bytes(out: &candle_core::Tensor) -> u64 {
    use std::collections::{HashMap, HashSet};

    let nodes = out.sorted_nodes();
    let storage_key = |node: &candle_core::Tensor| {
        std::ptr::from_ref::<candle_core::Storage>(&node.storage_and_layout().0).addr()
    };
    let owned_by_vars: HashSet<usize> = nodes
        .iter()
        .filter(|node| node.is_variable())
        .map(|node| storage_key(node))
        .collect();
    let mut extents: HashMap<usize, u64> = HashMap::new();
    for node in nodes {
        let (storage, layout) = node.storage_and_layout();
        let key = std::ptr::from_ref::<candle_core::Storage>(&storage).addr();
        if owned_by_vars.contains(&key) {
            continue;
        }
        let span = layout
            .dims()
            .iter()
            .zip(layout.stride())
            .map(|(&d, &s)| d.saturating_sub(1) * s)
            .sum::<usize>()
            + usize::from(layout.dims().iter().all(|&d| d > 0));
        let bytes = ((layout.start_offset() + span) * node.dtype().size_in_bytes()) as u64;
        let entry = extents.entry(key).or_default();
        *entry = (*entry).max(bytes);
    }
    extents.values().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(graph: u64, boundary: u64, ms: u64) -> LayerCost {
        LayerCost {
            graph_bytes: graph,
            boundary_bytes: boundary,
            forward: Duration::from_millis(ms),
        }
    }

    fn fits(costs: &[LayerCost], budget: u64, mode: Mode) -> BudgetPlan {
        let plan = plan_budget(costs, budget, mode).expect("a plan");
        let kept: u64 = costs
            .iter()
            .zip(&plan.placements)
            .map(|(c, &p)| resident(c, p))
            .sum();
        assert_eq!(kept, plan.device_bytes);
        assert!(plan.device_bytes <= budget, "{plan}");
        plan
    }

    #[test]
    fn a_generous_budget_keeps_every_graph() {
        let costs = vec![cost(1000, 100, 5); 4];
        let plan = fits(&costs, 4400, Mode::OffloadDisk);
        assert!(plan.placements.iter().all(|&p| p == Placement::Graph));
        assert_eq!(plan.extra, Duration::ZERO);
    }

    #[test]
    fn recomputes_the_cheapest_bytes_first() {
        // Layer 1 frees the most bytes per millisecond; layer 2 the fewest.
        let costs = [
            cost(1000, 100, 10),
            cost(4000, 100, 10),
            cost(1000, 100, 40),
        ];
        let plan = fits(&costs, 2400, Mode::Recompute);
        assert_eq!(
            plan.placements,
            [Placement::Graph, Placement::Device, Placement::Graph]
        );
        let plan = fits(&costs, 1300, Mode::Recompute);
        assert_eq!(
            plan.placements,
            [Placement::Device, Placement::Device, Placement::Graph]
        );
    }

    #[test]
    fn offloads_earliest_boundaries_once_everything_recomputes() {
        let costs = vec![cost(1000, 100, 5); 5];
        let plan = fits(&costs, 250, Mode::OffloadHost);
        assert_eq!(
            plan.placements,
            [
                Placement::Host,
                Placement::Host,
                Placement::Host,
                Placement::Device,
                Placement::Device
            ]
        );
        assert_eq!(fits(&costs, 0, Mode::OffloadDisk).device_bytes, 0);
    }

    #[test]
    fn an_impossible_budget_says_what_it_needs() {
        let costs = vec![cost(1000, 100, 5); 3];
        let err = plan_budget(&costs, 299, Mode::Recompute)
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.contains("at least 300 bytes") && err.contains("offload"),
            "{err}"
        );
        assert!(plan_budget(&costs, 1, Mode::None).is_err());
    }

    /// Many random tables: every plan fits, or the planner says no plan of that mode can.
    #[test]
    fn random_tables_always_fit() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        for _ in 0..500 {
            let n = 1 + usize::try_from(next(12)).unwrap_or(1);
            let costs: Vec<_> = (0..n)
                .map(|_| cost(1 + next(5000), 1 + next(500), 1 + next(50)))
                .collect();
            let all_graph: u64 = costs.iter().map(|c| resident(c, Placement::Graph)).sum();
            let floor: u64 = costs.iter().map(|c| c.boundary_bytes).sum();
            let budget = next(all_graph + 1);
            let mode = if next(2) == 0 {
                Mode::OffloadDisk
            } else {
                Mode::Recompute
            };
            if mode == Mode::Recompute && budget < floor {
                assert!(plan_budget(&costs, budget, mode).is_err());
            } else {
                fits(&costs, budget, mode);
            }
        }
    }
}
