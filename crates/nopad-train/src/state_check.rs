//! Checks of a checkpoint's `trainer_state.json` before a run trusts it. Checkpoints come from
//! other people and other machines; the identity check ([`crate::identity`]) says the checkpoint
//! belongs to this run, and this module says the state is consistent with itself, with its
//! directory and with the run's flags, so a tampered or corrupted state is refused with the
//! field named instead of training on (a `schedule.total` of 10^18 would ignore `--steps`, a
//! step beyond the schedule would end the run at once with wrong weights).

use std::path::Path;

use nopad_data::Strategy;

use crate::checkpoint::{step_of, TrainerState};
use crate::error::{Result, TrainError};
use crate::identity::RunIdentity;

fn refuse(dir: &Path, field: &str, why: String) -> TrainError {
    TrainError::Config(format!(
        "{}: trainer_state.json field `{field}` {why}; the checkpoint was changed or damaged, \
         resume from another checkpoint",
        dir.join("trainer_state.json").display()
    ))
}

/// What the run knows about its data before the loader starts.
pub(crate) struct DataFacts {
    /// Examples loaded.
    pub examples: usize,
    /// Packing strategy.
    pub strategy: Strategy,
}

/// Checks the state against itself, its directory's name and the data, before anything is built
/// from it (the data loader would start at `data_position`).
pub(crate) fn check_state(dir: &Path, st: &TrainerState, data: &DataFacts) -> Result<()> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if let Some(n) = step_of(name) {
        if n != st.step {
            return Err(refuse(
                dir,
                "step",
                format!("is {} but the directory is {name}", st.step),
            ));
        }
    }
    let c = &st.counters;
    if st.optimizer_step > st.step || st.step - st.optimizer_step != c.skipped_steps {
        return Err(refuse(
            dir,
            "optimizer_step",
            format!(
                "is {} with step {} and {} skipped steps (updates + skipped must equal steps)",
                st.optimizer_step, st.step, c.skipped_steps
            ),
        ));
    }
    if c.bad_in_a_row > c.skipped_steps {
        return Err(refuse(
            dir,
            "counters.bad_in_a_row",
            format!(
                "is {} beyond {} skipped steps",
                c.bad_in_a_row, c.skipped_steps
            ),
        ));
    }
    let s = &st.schedule;
    if st.step > s.total {
        return Err(refuse(
            dir,
            "step",
            format!("is {} beyond the schedule's {} steps", st.step, s.total),
        ));
    }
    if s.warmup > s.total {
        return Err(refuse(
            dir,
            "schedule.warmup",
            format!("is {} beyond the schedule's {} steps", s.warmup, s.total),
        ));
    }
    let restart = s.restart.map_or((0, 0.0), |r| (r.at, r.lr));
    if restart.0 > st.optimizer_step {
        let why = format!("is at update {} after {}", restart.0, st.optimizer_step);
        return Err(refuse(dir, "schedule.restart.at", why));
    }
    let rates = [
        ("schedule.lr", s.lr),
        ("schedule.min_lr", s.min_lr),
        ("schedule.restart.lr", restart.1),
    ];
    for (field, v) in rates {
        if !v.is_finite() || v < 0.0 {
            return Err(refuse(dir, field, format!("is {v}")));
        }
    }
    if st.losses.len() as u64 > st.step {
        return Err(refuse(
            dir,
            "losses",
            format!("holds {} losses after {} steps", st.losses.len(), st.step),
        ));
    }
    // A step takes at least one example, except under `concat`, which splits examples into rows.
    let most = match data.strategy {
        Strategy::Concat => usize::MAX,
        _ => data.examples.max(1),
    };
    if st.steps_per_epoch == 0 || st.steps_per_epoch > most {
        return Err(refuse(
            dir,
            "steps_per_epoch",
            format!(
                "is {} with {} examples (each step takes at least one)",
                st.steps_per_epoch, data.examples
            ),
        ));
    }
    let p = &st.data_position;
    if p.cursor > data.examples as u64 {
        return Err(refuse(
            dir,
            "data_position.cursor",
            format!("is {} beyond the {} examples", p.cursor, data.examples),
        ));
    }
    if let Some(&i) = p.carry.iter().find(|&&i| i >= data.examples as u64) {
        return Err(refuse(
            dir,
            "data_position.carry",
            format!("names example {i} of {}", data.examples),
        ));
    }
    if p.offset > 0 && data.strategy != Strategy::Concat {
        return Err(refuse(
            dir,
            "data_position.offset",
            format!("is {} under strategy {}", p.offset, data.strategy.name()),
        ));
    }
    if !p.carry.is_empty() && data.strategy != Strategy::Offline {
        return Err(refuse(
            dir,
            "data_position.carry",
            format!("is not empty under strategy {}", data.strategy.name()),
        ));
    }
    // Every epoch has at least one step, so the epoch can never pass the steps done; where every
    // epoch has the same number of steps (all but `offline`), the position is exact.
    let epoch_steps = p.epoch.checked_mul(st.steps_per_epoch as u64);
    let exact = data.strategy != Strategy::Offline;
    let consistent = match epoch_steps.and_then(|e| e.checked_add(p.step)) {
        Some(done) if exact => done == st.step,
        Some(_) => p.epoch <= st.step && p.step <= st.step,
        None => false,
    };
    if !consistent {
        return Err(refuse(
            dir,
            "data_position.epoch",
            format!(
                "is {} (step {} of the epoch) with {} steps per epoch after {} steps",
                p.epoch, p.step, st.steps_per_epoch, st.step
            ),
        ));
    }
    Ok(())
}

/// Equal up to the last bits a JSON round trip may change.
fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}

/// Checks the state's schedule against the flags of the run that saved it (`id`, the
/// checkpoint's identity: `--steps`, `--epochs`, `--lr`, `--min-lr`, `--warmup`, `--schedule`),
/// and its steps per epoch against the loader's where every epoch has the same.
pub(crate) fn check_schedule(
    dir: &Path,
    st: &TrainerState,
    id: &RunIdentity,
    loader_steps_per_epoch: Option<usize>,
) -> Result<()> {
    if let Some(spe) = loader_steps_per_epoch.filter(|&spe| spe != st.steps_per_epoch) {
        return Err(refuse(
            dir,
            "steps_per_epoch",
            format!("is {} but the data gives {spe}", st.steps_per_epoch),
        ));
    }
    let s = &st.schedule;
    let total = crate::config::total_steps(id.steps, id.epochs, st.steps_per_epoch);
    if s.total != total {
        return Err(refuse(
            dir,
            "schedule.total",
            format!("is {} but the run's flags give {total} steps", s.total),
        ));
    }
    let warmup = crate::config::warmup_steps(id.warmup, id.warmup_ratio, total);
    let checks = [
        (
            "schedule.lr",
            close(s.lr, id.lr),
            s.lr.to_string(),
            id.lr.to_string(),
        ),
        (
            "schedule.min_lr",
            close(s.min_lr, id.min_lr),
            s.min_lr.to_string(),
            id.min_lr.to_string(),
        ),
        (
            "schedule.warmup",
            s.warmup == warmup,
            s.warmup.to_string(),
            warmup.to_string(),
        ),
        (
            "schedule.decay",
            s.decay == id.schedule,
            s.decay.clone(),
            id.schedule.clone(),
        ),
    ];
    for (field, same, saved, flags) in checks {
        if !same {
            return Err(refuse(
                dir,
                field,
                format!("is {saved} but the run's flags give {flags}"),
            ));
        }
    }
    Ok(())
}
