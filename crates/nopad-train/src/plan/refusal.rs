//! The refusal of a run whose plan does not fit: the plan itself, the ZeRO stages and the mode
//! combinations that would fit at the same micro-batch (as flags to pass), and the largest
//! micro-batch the asked modes fit.

use nopad_model::Config;

use super::{gib, largest_fitting, mode_grid, plan, DeviceSizes, Modes, Plan};
use crate::optimizer::ShardStage;

/// The refusal of a run whose plan does not fit `budget` bytes: the plan, the stages and modes
/// that fit at this micro-batch and the largest micro-batch the current modes fit. `Ok` when it
/// fits.
pub fn check_fits(
    cfg: &Config,
    tokens: usize,
    modes: Modes,
    dev: &DeviceSizes,
    budget: usize,
    in_backward: bool,
) -> std::result::Result<Plan, String> {
    let p = plan(cfg, tokens, modes, dev);
    if p.needed() <= budget {
        return Ok(p);
    }
    let mut msg = format!(
        "the run does not fit: it needs {} and the device has {}\n{p}\n",
        gib(p.needed()),
        gib(budget)
    );
    let needs = |m: Modes| plan(cfg, tokens, m, dev).needed();
    let with_flags = |m: Modes| format!("{} ({})", flags(&m), gib(needs(m)));
    let stages: Vec<String> = stages_to_offer(&modes)
        .into_iter()
        .filter(|&shard| shard != modes.shard && needs(Modes { shard, ..modes }) <= budget)
        .map(|shard| with_flags(Modes { shard, ..modes }))
        .collect();
    if !stages.is_empty() {
        msg += &format!(
            "ZeRO stages that fit over {} ranks at {tokens} tokens:\n  {}\n",
            modes.ranks,
            stages.join("\n  ")
        );
    }
    let fitting: Vec<String> = mode_grid(modes, in_backward)
        .into_iter()
        .filter(|&m| needs(m) <= budget)
        .map(with_flags)
        .collect();
    if fitting.is_empty() {
        msg += "no mode fits a micro-batch of this size\n";
    } else {
        msg += &format!(
            "modes that fit at {tokens} tokens:\n  {}\n",
            fitting.join("\n  ")
        );
    }
    match largest_fitting(cfg, modes, dev, budget) {
        Some(t) => {
            msg += &format!(
                "with these modes, micro-batches of up to {t} tokens fit (lower --batch-size or --max-len)"
            )
        }
        None => msg += "with these modes not even one token fits",
    }
    Err(msg)
}

/// The stages a run of these modes could take instead: those the optimizer implements, with
/// several ranks and the optimizer on the device (`--offload optimizer` takes stage 0).
pub(super) fn stages_to_offer(modes: &Modes) -> Vec<u8> {
    if modes.ranks < 2 || modes.offload {
        return vec![0];
    }
    ShardStage::ALL
        .into_iter()
        .map(ShardStage::number)
        .collect()
}

/// The command-line flags of a mode combination.
fn flags(m: &Modes) -> String {
    let mut s = format!(
        "--optim-states {} --master-weights {} --recompute {}",
        crate::states_name(m.states),
        crate::master_name(m.master),
        m.recompute
    );
    if m.optim_in_backward {
        s += " --optim-in-backward";
    }
    if m.ranks > 1 {
        s += &format!(" --shard {}", m.shard);
    }
    s
}
