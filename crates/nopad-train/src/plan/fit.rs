//! What fits a budget: the largest micro-batch a plan allows, the grids of modes and of ZeRO
//! stages worth comparing, and the tables `nopad stats` prints of them.

use nopad_backend::{MasterPrecision, StatePrecision};
use nopad_model::{Config, Recompute};

use super::{plan, DeviceSizes, Modes};

/// The ZeRO stages the plan knows, as `--shard` numbers them. Which of them a run may take is
/// the optimizer's [`crate::ShardStage::ALL`].
pub const PLANNED_STAGES: [u8; 4] = [0, 1, 2, 3];

/// The largest micro-batch, in tokens, whose plan fits in `budget` bytes (None: not even one
/// token fits). The plan grows with the tokens, so a bisection finds it.
pub fn largest_fitting(
    cfg: &Config,
    modes: Modes,
    dev: &DeviceSizes,
    budget: usize,
) -> Option<usize> {
    let fits = |t: usize| plan(cfg, t, modes, dev).needed() <= budget;
    if !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1usize, 1usize << 24);
    if fits(hi) {
        return Some(hi);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// The mode combinations worth showing: states × master × recompute none/full, each with the
/// gradients as `base` holds them, and optimizer-in-backward where `in_backward` says it can
/// run (one micro-batch per step, one rank, and the flag exists).
pub fn mode_grid(base: Modes, in_backward: bool) -> Vec<Modes> {
    let mut v = Vec::new();
    for states in [
        StatePrecision::F32,
        StatePrecision::Bf16,
        StatePrecision::Block8,
    ] {
        for master in [MasterPrecision::F32, MasterPrecision::None] {
            for recompute in [Recompute::None, Recompute::Full] {
                let m = Modes {
                    states,
                    master,
                    recompute,
                    optim_in_backward: false,
                    ..base
                };
                v.push(m);
                if in_backward {
                    v.push(Modes {
                        optim_in_backward: true,
                        ..m
                    });
                }
            }
        }
    }
    v
}

/// `base` at every stage of [`PLANNED_STAGES`], for `base.ranks` ranks.
pub fn stage_grid(base: Modes) -> Vec<Modes> {
    PLANNED_STAGES
        .into_iter()
        .map(|shard| Modes { shard, ..base })
        .collect()
}

/// One row per mode of `grid`: its plan at `tokens` and the largest micro-batch that fits
/// `budget` (per rank, for a sharded grid), as a text table.
pub fn table(
    cfg: &Config,
    tokens: usize,
    grid: &[Modes],
    dev: &DeviceSizes,
    budget: usize,
) -> String {
    let w = grid
        .iter()
        .map(|m| m.label().len())
        .max()
        .unwrap_or(0)
        .max(34);
    let mut s = format!(
        "{:<w$} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}\n",
        "states/master/recompute",
        "weights",
        "states",
        "grads",
        "acts",
        "peak",
        "needs",
        "largest micro-batch that fits"
    );
    let g = |b: usize| format!("{:.2}", b as f64 / (1u64 << 30) as f64);
    for &m in grid {
        let p = plan(cfg, tokens, m, dev);
        let fit = match largest_fitting(cfg, m, dev, budget) {
            Some(t) => format!("{t} tokens"),
            None => "none (the states alone do not fit)".into(),
        };
        s += &format!(
            "{:<w$} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {fit}\n",
            m.label(),
            g(p.weights),
            g(p.master + p.moments),
            g(p.gradients),
            g(p.activations),
            g(p.peak()),
            g(p.needed()),
        );
    }
    s
}
