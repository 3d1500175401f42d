//! The plan of a run: its modes from the config, the largest micro-batch over its ranks, the
//! ZeRO stage `--shard` defaults to (the lowest whose plan fits), the check before anything is
//! allocated, and the plan kept for an out-of-memory error that surfaces later.

use std::sync::Mutex;

use nopad_backend::{Backend, BackendError};
use nopad_data::{Example, PackOptions, Strategy};
use nopad_model::lora::memory::LoraShape;
use nopad_model::{Config, ModelError};

use super::refusal::stages_to_offer;
use super::{check_fits, gib, plan, DeviceSizes, Modes, Plan, Trained};
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::optimizer::ShardStage;

/// The largest micro-batch, in tokens, `examples` can make under `pack` in any epoch order:
/// `flatten` the sum of the `batch_size` longest examples, `pad` `batch_size` rows of the
/// longest, `concat` and `offline` `batch_size` rows of `max_len` (at most every token).
pub fn largest_micro_batch(examples: &[Example], pack: &PackOptions) -> usize {
    let bs = pack.batch_size.max(1);
    let mut lens: Vec<usize> = examples.iter().map(Example::len).collect();
    lens.sort_unstable_by(|a, b| b.cmp(a));
    let all: usize = lens.iter().sum();
    match pack.strategy {
        Strategy::Flatten => lens.iter().take(bs).sum(),
        Strategy::Pad => bs.min(lens.len()) * lens.first().copied().unwrap_or(0),
        Strategy::Concat | Strategy::Offline => (bs * pack.max_len).min(all),
    }
}

/// The modes of a training run of `ranks` ranks (gradient aliasing is off in LoRA runs); its
/// stage is `--shard`'s, 0 when left to [`check_run`].
pub fn modes_of(tc: &TrainConfig, ranks: usize) -> Modes {
    Modes {
        states: tc.adamw.states,
        master: tc.adamw.master,
        recompute: tc.recompute,
        grad_aliasing: tc.grad_aliasing
            && tc.grad_accum == 1
            && !tc.optim_in_backward
            && tc.lora.is_none(),
        optim_in_backward: tc.optim_in_backward,
        offload: tc.offload == crate::Placement::Host,
        offload_acts: tc.offload_activations,
        trained: match &tc.lora {
            Some(l) => Trained::Lora(LoraShape::of(&l.settings, l.base)),
            None => Trained::Full,
        },
        ranks: ranks.max(1),
        shard: tc.shard.map_or(0, ShardStage::number),
    }
}

/// The last plan [`check_device`] printed, for a run-time out-of-memory error to show beside
/// its own numbers: the error surfaces far from where the plan was made (inside
/// `nopad_train::train` or a benchmark), so the plan is kept here rather than threaded through.
static LAST_PLAN: Mutex<Option<String>> = Mutex::new(None);

/// The plan [`check_device`] printed last, if any.
pub fn last_plan() -> Option<String> {
    LAST_PLAN.lock().ok().and_then(|p| p.clone())
}

/// Plans a step of `cfg` with `tokens` in its largest micro-batch on `b`, prints the plan to
/// stderr, and refuses (before anything is allocated) when it does not fit the device's memory
/// (`gpu_memory` bytes, if given, else [`Backend::total_memory`]; no check where neither is
/// known). `in_backward`: whether optimizer-in-backward may be suggested.
pub fn check_device<B: Backend>(
    b: &B,
    cfg: &Config,
    tokens: usize,
    modes: Modes,
    gpu_memory: Option<usize>,
    in_backward: bool,
) -> Result<Plan> {
    check_with_samples(b, (cfg, tokens, modes), gpu_memory, in_backward, 0)
}

/// [`check_device`] for a run that also takes samples between steps, `sampling` bytes of them
/// ([`super::sampling_bytes`]): a run whose steps fit but whose samples do not is refused
/// naming the samples' share.
fn check_with_samples<B: Backend>(
    b: &B,
    (cfg, tokens, modes): (&Config, usize, Modes),
    gpu_memory: Option<usize>,
    in_backward: bool,
    sampling: usize,
) -> Result<Plan> {
    let dev = DeviceSizes::of(b);
    let p = plan(cfg, tokens, modes, &dev).with_sampling(sampling);
    if let Ok(mut last) = LAST_PLAN.lock() {
        *last = Some(p.to_string());
    }
    if let Some(budget) = gpu_memory.or_else(|| b.total_memory()) {
        // The refusal carries the plan itself.
        check_fits(cfg, tokens, modes, &dev, budget, in_backward)
            .map_err(|msg| TrainError::Config(format!("memory plan: {msg}")))?;
        if p.needed() > budget {
            return Err(TrainError::Config(format!(
                "memory plan: the steps fit, but not the samples taken between them: they need {} \
                 (the KV cache and buffers of --sample-prompts), {} in all of {}\n{p}\nlower \
                 --sample-max-new-tokens, or give fewer or shorter prompts",
                gib(p.sampling),
                gib(p.needed()),
                gib(budget)
            )));
        }
    }
    eprintln!("nopad: {p}");
    Ok(p)
}

/// [`check_device`] for a run of `modes.ranks` ranks whose stage is `asked` (`--shard`), or,
/// when None, the lowest stage whose plan fits the device (the lowest where no budget is
/// known; stage 0 for one rank or an offloaded optimizer), with `sampling` bytes of samples
/// between steps (0: none). Returns the stage, its plan and, when the stage was chosen among
/// several, the line that says why (also printed).
pub fn check_run<B: Backend>(
    b: &B,
    cfg: &Config,
    tokens: usize,
    modes: Modes,
    (asked, gpu_memory, sampling): (Option<ShardStage>, Option<usize>, usize),
    in_backward: bool,
) -> Result<(ShardStage, Plan, Option<String>)> {
    let offered: Vec<ShardStage> = ShardStage::ALL
        .into_iter()
        .filter(|s| stages_to_offer(&modes).contains(&s.number()))
        .collect();
    let budget = gpu_memory.or_else(|| b.total_memory());
    let (stage, why) = match (asked, budget, offered.as_slice()) {
        (Some(s), _, _) => (s, None),
        (None, Some(budget), [_, _, ..]) => {
            let dev = DeviceSizes::of(b);
            lowest_fitting((cfg, tokens, modes, sampling), &dev, budget, &offered)?
        }
        (None, _, _) => (ShardStage::default(), None),
    };
    let modes = Modes {
        shard: stage.number(),
        ..modes
    };
    let p = check_with_samples(b, (cfg, tokens, modes), gpu_memory, in_backward, sampling)?;
    if let Some(why) = &why {
        eprintln!("nopad: {why}");
    }
    Ok((stage, p, why))
}

/// The lowest of `offered` (lowest first) whose plan fits `budget`, and the line that says so;
/// a refusal naming every stage's need when none does.
fn lowest_fitting(
    (cfg, tokens, modes, sampling): (&Config, usize, Modes, usize),
    dev: &DeviceSizes,
    budget: usize,
    offered: &[ShardStage],
) -> Result<(ShardStage, Option<String>)> {
    let needs = |s: ShardStage| {
        let m = Modes {
            shard: s.number(),
            ..modes
        };
        plan(cfg, tokens, m, dev).with_sampling(sampling).needed()
    };
    let mut below: Option<(ShardStage, usize)> = None;
    for &s in offered {
        let n = needs(s);
        if n <= budget {
            let head = format!(
                "shard {} chosen ({} ranks, largest micro-batch {tokens} tokens)",
                s.number(),
                modes.ranks
            );
            let why = match below {
                None => format!("{head}: it needs {} of {}", gib(n), gib(budget)),
                Some((lower, m)) => format!(
                    "{head}: stage {} needs {} of {}; stage {} needs {}",
                    lower.number(),
                    gib(m),
                    gib(budget),
                    s.number(),
                    gib(n)
                ),
            };
            return Ok((s, Some(why)));
        }
        below = Some((s, n));
    }
    let each: Vec<String> = offered
        .iter()
        .map(|&s| format!("stage {} needs {}", s.number(), gib(needs(s))))
        .collect();
    let highest = offered.last().copied().unwrap_or_default();
    let m = Modes {
        shard: highest.number(),
        ..modes
    };
    let msg = check_fits(cfg, tokens, m, dev, budget, false)
        .err()
        .unwrap_or_default();
    Err(TrainError::Config(format!(
        "memory plan: no --shard stage fits {} over {} ranks ({}); at stage {}, {msg}",
        gib(budget),
        modes.ranks,
        each.join(", "),
        highest.number()
    )))
}

/// Whether an error is the device running out of memory (which the caller then shows beside
/// [`last_plan`]).
pub fn is_out_of_memory(e: &TrainError) -> bool {
    matches!(
        e,
        TrainError::Backend(BackendError::OutOfMemory { .. })
            | TrainError::Model(ModelError::Backend(BackendError::OutOfMemory { .. }))
    )
}

/// How a run packs its micro-batches (the session's and the plan's, one definition).
pub(crate) fn pack_options(tc: &TrainConfig, cfg: &Config) -> PackOptions {
    PackOptions {
        strategy: tc.strategy,
        batch_size: tc.batch_size,
        max_len: tc.max_len,
        pad_token_id: crate::session::pad_token_id(cfg),
        group_by_length: tc.group_by_length,
    }
}

/// Prints the last memory plan to stderr, beside an out-of-memory error the caller reports
/// (the error names what was being allocated; the plan says what the step holds).
pub fn print_plan_for_out_of_memory() {
    if let Some(p) = last_plan() {
        eprintln!("nopad: the device ran out of memory; the {p}");
    }
}
