//! Checkpoints: everything a run needs to continue exactly, written so that a crash at any moment
//! leaves the previous checkpoint intact and never a partial one that resuming would trust.
//!
//! Layout of `OUT/checkpoint-000120/` (the number is the optimizer step done):
//! - `config.json`, `model.safetensors`: the weights in HF layout, always f32 (the fp32 master
//!   copy where the backend keeps one), loadable by HF Transformers as they are; in a LoRA run
//!   `adapter_model.safetensors` and `adapter_config.json` instead (PEFT's files, f32), the
//!   frozen base being the run's `--model`;
//! - `optimizer.safetensors`: AdamW's first and second moments, `exp_avg` and `exp_avg_sq`, in
//!   nopad's parameter order (see `nopad_model::Layout`; a LoRA run's cover the adapters, in
//!   `nopad_model::lora::AdapterLayout`'s order) and in their own precision, named in
//!   the metadata as `optim-states`: one flat F32 or BF16 tensor `[P]` each, or for 8-bit states
//!   U8 codes `[P]` and `exp_avg.scales`/`exp_avg_sq.scales`, F32, one per block of 256 counted
//!   from the start of the weight-decay part and of the rest (see `Optimizer::states`); a file
//!   without `optim-states` (written before the precisions existed) holds F32 moments;
//! - `trainer_state.json`: [`TrainerState`] (step, data position, schedule, counters, losses,
//!   and the run's [`RunIdentity`]);
//! - `COMPLETE`: written last; a directory without it is never resumed from.
//!
//! A save writes into `OUT/.checkpoint-000120.tmp-HOST-PID/`, fsyncs every file and the directory,
//! renames it into place and fsyncs `OUT`. Deleting old checkpoints (`keep`) renames them out of
//! sight first, so a half-deleted directory is never visible either. There is no RNG state to
//! store: nothing draws random numbers while training, and the data order is a function of the
//! seed and the epoch, which `data_position` holds.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nopad_backend::Backend;
use nopad_data::DataPosition;
use nopad_model::weights::{self, SaveDtype};
use nopad_model::Model;
use serde::{Deserialize, Serialize};

use crate::error::{io, Result, TrainError};
use crate::identity::RunIdentity;
use crate::optimizer::Optimizer;
use crate::records::{Counters, EvalRecord, History};
use crate::schedule::Schedule;

/// Version of the checkpoint layout; resuming refuses any other. 2: the optimizer moments follow
/// the parameter order with the layers' matrices before the embedding (`nopad_model::Layout`).
pub const FORMAT: u32 = 2;
/// The marker written last into a checkpoint directory.
pub const COMPLETE: &str = "COMPLETE";
mod moments;

const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";
/// Values moved between host and device at once (64 MiB of f32).
const CHUNK: usize = 1 << 24;

/// The learning-rate schedule as saved (a resumed run uses these values, not recomputed ones).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warm-up updates.
    pub warmup: u64,
    /// Updates the schedule spans (the run's length).
    pub total: u64,
    /// Decay after warm-up.
    pub decay: String,
    /// Where a resumed run with a changed length or learning rate restarted its decay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<crate::schedule::Restart>,
}

impl From<&Schedule> for ScheduleState {
    fn from(s: &Schedule) -> Self {
        ScheduleState {
            lr: s.lr,
            min_lr: s.min_lr,
            warmup: s.warmup,
            total: s.total,
            decay: s.decay.name().into(),
            restart: s.restart,
        }
    }
}

/// `trainer_state.json`: where the run stands, and what it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// [`FORMAT`].
    pub format: u32,
    /// The nopad version that wrote it.
    pub nopad_version: String,
    /// Optimizer steps done (skipped ones included).
    pub step: u64,
    /// Updates applied (`Optimizer::step`, AdamW's bias-correction count).
    pub optimizer_step: u64,
    /// Where the data stream stands: the next example, the epoch, the packer's carry.
    pub data_position: DataPosition,
    /// Steps per epoch, as the run started counting them.
    pub steps_per_epoch: usize,
    /// The schedule.
    pub schedule: ScheduleState,
    /// Running totals.
    pub counters: Counters,
    /// The finite losses so far, in order (for the summary's first and last losses).
    pub losses: Vec<f64>,
    /// Evaluations so far.
    pub evals: Vec<EvalRecord>,
    /// What the run is: resuming refuses a checkpoint of another run.
    pub identity: RunIdentity,
}

impl TrainerState {
    /// The state after `step`, the data stream at `data_position`: what a checkpoint written
    /// then holds.
    pub(crate) fn at(
        step: u64,
        optimizer_step: u64,
        data_position: DataPosition,
        steps_per_epoch: usize,
        schedule: &Schedule,
        history: &History,
        identity: &RunIdentity,
    ) -> Self {
        TrainerState {
            format: FORMAT,
            nopad_version: env!("CARGO_PKG_VERSION").into(),
            step,
            optimizer_step,
            data_position,
            steps_per_epoch,
            schedule: ScheduleState::from(schedule),
            counters: history.counters.clone(),
            losses: history.losses.clone(),
            evals: history.evals.clone(),
            identity: identity.clone(),
        }
    }

    /// The run's history as this state holds it.
    pub(crate) fn history(&self) -> History {
        History {
            counters: self.counters.clone(),
            losses: self.losses.clone(),
            evals: self.evals.clone(),
        }
    }
}

/// Flushes a directory's entries (new names, renames) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// The directory name of the checkpoint after `step`.
pub fn dir_name(step: u64) -> String {
    format!("checkpoint-{step:06}")
}

/// The step of a checkpoint directory name (`None` for anything else, tmp directories included).
pub(crate) fn step_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("checkpoint-")?;
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Checkpoint directories under `out` whose save finished, oldest first.
fn complete_checkpoints(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(out)(e)),
    };
    let mut found = vec![];
    for entry in entries {
        let entry = entry.map_err(io(out))?;
        let name = entry.file_name();
        if let Some(step) = name.to_str().and_then(step_of) {
            let path = entry.path();
            if path.join(COMPLETE).is_file() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Reads a checkpoint's state, refusing a directory whose save did not finish.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    if !dir.join(COMPLETE).is_file() {
        return Err(TrainError::Config(format!(
            "{}: not a complete checkpoint (no {COMPLETE} marker: its save never finished, or it \
             is not a checkpoint); resume from `latest` or an older checkpoint-NNNNNN",
            dir.display()
        )));
    }
    let path = dir.join(STATE);
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    if state.format != FORMAT {
        return Err(TrainError::Config(format!(
            "{}: checkpoint format {} (written by nopad {}), this nopad reads format {FORMAT}",
            path.display(),
            state.format,
            state.nopad_version
        )));
    }
    Ok(state)
}

/// A checkpoint directory and its state.
pub type Found = (PathBuf, TrainerState);

/// The newest complete checkpoint under `out` with its state, and notes on newer directories
/// that could not be used.
pub fn latest(out: &Path) -> Result<(Option<Found>, Vec<String>)> {
    let mut notes = vec![];
    for (_, dir) in complete_checkpoints(out)?.into_iter().rev() {
        match load_state(&dir) {
            Ok(s) => return Ok((Some((dir, s)), notes)),
            Err(e) => notes.push(format!("skipped an unreadable checkpoint: {e}")),
        }
    }
    Ok((None, notes))
}

/// Restores a model's parameters (and the optimizer's master copy) from a checkpoint's
/// `model.safetensors` (a LoRA model's adapters from its `adapter_model.safetensors`), and the
/// moments and update count from `optimizer.safetensors`.
pub fn restore<B: Backend>(
    b: &B,
    dir: &Path,
    state: &TrainerState,
    model: &mut Model<B>,
    opt: &mut Optimizer<B>,
) -> Result<()> {
    if model.lora().is_some() {
        crate::lora::restore_adapter(b, dir, model, opt)?;
        moments::read_optimizer(b, &dir.join(OPTIMIZER), opt, model.trainable_len())?;
        opt.step = state.optimizer_step;
        return Ok(());
    }
    let (cfg, layout) = (model.cfg.clone(), model.layout.clone());
    let params = &mut model.params;
    // The optimizer knows where the master weights live (device, host or none).
    weights::load_checkpoint(dir, &cfg, &layout, |off, vals| {
        Ok(opt.write_weights(b, params, off, vals)?)
    })?;
    moments::read_optimizer(b, &dir.join(OPTIMIZER), opt, layout.total)?;
    opt.step = state.optimizer_step;
    Ok(())
}

/// This machine's name as it appears in leftover names (`/proc/sys/kernel/hostname`, reduced to
/// letters, digits and '-'; "host" where unknown).
fn host_name() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    if name.is_empty() {
        "host".into()
    } else {
        name
    }
}

/// `HOST-PID` of this process: the owner part of the `.tmp-`/`.old-` names it writes.
fn owner_tag() -> String {
    format!("{}-{}", host_name(), std::process::id())
}

/// Whether the owner of a `.tmp-`/`.old-` directory (its name's `HOST-PID` or, from older
/// versions, `PID`) may still be writing it. On a shared filesystem another host's process
/// cannot be checked, so its leftovers are kept (leaving one is harmless, deleting a live save is
/// not).
fn owner_alive(owner: &str, host: &str) -> bool {
    let (owner_host, pid) = match owner.rsplit_once('-') {
        Some((h, p)) => (Some(h), p),
        None => (None, owner),
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return true; // not a name nopad writes: leave it
    };
    if owner_host.is_some_and(|h| h != host) {
        return true;
    }
    if pid == std::process::id() {
        return false; // ours, left from an earlier attempt at the same step
    }
    // Where /proc is missing, assume the owner lives.
    !Path::new("/proc/self").exists() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes leftovers of interrupted saves and deletions (`.checkpoint-*.tmp-HOST-PID`,
/// `.old-HOST-PID`) whose process is gone.
fn remove_leftovers(out: &Path) -> Result<()> {
    let host = host_name();
    for entry in fs::read_dir(out).map_err(io(out))? {
        let entry = entry.map_err(io(out))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(".checkpoint-") else {
            continue;
        };
        let owner = rest
            .split_once(".tmp-")
            .or_else(|| rest.split_once(".old-"))
            .map(|(_, owner)| owner);
        if owner.is_some_and(|o| !owner_alive(o, &host)) {
            let path = entry.path();
            fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Deletes all but the newest `keep` complete checkpoints; returns what it deleted.
fn prune(out: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let all = complete_checkpoints(out)?;
    let mut gone = vec![];
    for (step, dir) in &all[..all.len().saturating_sub(keep)] {
        // Out of sight first: a crash in remove_dir_all leaves only a hidden leftover.
        let hidden = out.join(format!(".{}.old-{}", dir_name(*step), owner_tag()));
        fs::rename(dir, &hidden).map_err(io(dir))?;
        sync_dir(out)?;
        fs::remove_dir_all(&hidden).map_err(io(&hidden))?;
        gone.push(dir.clone());
    }
    Ok(gone)
}

/// Saves a checkpoint of the run after `state.step` under `out` (see the module docs for the
/// layout and the order of writes), then keeps only the newest `keep`. `delay` (tests only)
/// sleeps between the files; `tokenizer_from` is a model directory whose tokenizer files are
/// copied in. Returns the checkpoint's directory and what was deleted. For a LoRA model,
/// `base` is the frozen base's source (recorded in `adapter_config.json`).
#[allow(clippy::too_many_arguments)]
pub fn save<B: Backend>(
    b: &B,
    out: &Path,
    model: &Model<B>,
    opt: &Optimizer<B>,
    state: &TrainerState,
    keep: Option<usize>,
    delay: Option<Duration>,
    tokenizer_from: Option<&Path>,
    base: Option<&crate::ModelSource>,
) -> Result<(PathBuf, Vec<PathBuf>)> {
    let pause = || {
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
    };
    if !out.is_dir() {
        fs::create_dir_all(out).map_err(io(out))?;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?; // the new OUT itself must survive a crash too
        }
    }
    remove_leftovers(out)?;
    let name = dir_name(state.step);
    let tmp = out.join(format!(".{name}.tmp-{}", owner_tag()));
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    match base {
        Some(source) => crate::lora::save_adapter(b, &tmp, model, opt, SaveDtype::F32, source)?,
        None => weights::save_checkpoint(
            &tmp,
            &model.cfg,
            &model.layout,
            SaveDtype::F32,
            4 << 30,
            |r| Ok(opt.read_weights(b, model, r)?),
        )?,
    }
    if let Some(src) = tokenizer_from {
        weights::copy_tokenizer_files(src, &tmp)?;
    }
    pause();
    moments::write_optimizer(b, &tmp.join(OPTIMIZER), opt, model.trainable_len())?;
    pause();
    let text = serde_json::to_string_pretty(state).expect("trainer states serialise");
    weights::atomic_write(&tmp.join(STATE), text.as_bytes())?;
    pause();
    weights::atomic_write(&tmp.join(COMPLETE), format!("{}\n", state.step).as_bytes())?;
    sync_dir(&tmp)?;
    pause();
    let dir = out.join(&name);
    if dir.exists() {
        // A checkpoint of this step from an earlier attempt (a resume from an older one):
        // replace it, hiding the old one first so one of the two is always complete.
        let old = out.join(format!(".{name}.old-{}", owner_tag()));
        fs::rename(&dir, &old).map_err(io(&dir))?;
        fs::rename(&tmp, &dir).map_err(io(&dir))?;
        sync_dir(out)?;
        fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        fs::rename(&tmp, &dir).map_err(io(&dir))?;
    }
    sync_dir(out)?;
    let gone = match keep {
        Some(k) => prune(out, k)?,
        None => vec![],
    };
    Ok((dir, gone))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_numbered_names_are_checkpoints() {
        assert_eq!(step_of("checkpoint-000120"), Some(120));
        assert_eq!(step_of("checkpoint-1234567"), Some(1234567));
        for bad in [
            ".checkpoint-000120.tmp-77",
            "checkpoint-000120.tmp-77",
            "checkpoint-",
            "checkpoint-12a",
            "checkpoint--1",
        ] {
            assert_eq!(step_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn leftovers_of_other_hosts_and_live_processes_are_kept() {
        let me = std::process::id();
        // Ours (an earlier attempt of this process), under the new and the old naming.
        assert!(!owner_alive(&format!("box-1-{me}"), "box-1"));
        assert!(!owner_alive(&me.to_string(), "box-1"));
        // Another host's, whatever its pid: it cannot be checked from here.
        assert!(owner_alive(&format!("other-{me}"), "box-1"));
        assert!(owner_alive("other-1", "box-1"));
        // Not a name nopad writes.
        assert!(owner_alive("box-1-x", "box-1"));
        if Path::new("/proc/self").exists() {
            // A pid that cannot exist (above the kernel's limit of 2^22) on this host is gone.
            assert!(!owner_alive("box-1-4194305", "box-1"));
            // pid 1 always lives.
            assert!(owner_alive("box-1-1", "box-1"));
        }
        let tag = owner_tag();
        assert!(
            tag.ends_with(&format!("-{me}")) && !tag.contains('.'),
            "{tag}"
        );
    }
}
