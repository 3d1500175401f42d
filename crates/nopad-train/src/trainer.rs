//! The training loop: one optimizer step = the loader's micro-batches, each forward and
//! backward with the loss scaled by 1 / (target tokens of the whole step), then one AdamW update.
//!
//! Loss normalisation is the reason this file exists in this shape: the number of target tokens
//! of a step is known on the host before any forward (the packer counted them), so every
//! micro-batch's gradient is scaled by the same `1/targets_of_step` and the accumulated gradient
//! is exactly that of one big batch, for any strategy and any split into micro-batches.
//!
//! Around the steps: resuming (weights, moments, data position, schedule and counters from a
//! checkpoint, so the next step is exactly the one an uninterrupted run would take), skipping
//! non-finite steps, periodic evaluation and checkpoints, and stopping on request.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use nopad_backend::Backend;
use nopad_data::{
    synthetic, Batch, BatchStats, Example, Loader, LoaderOptions, LongPolicy, PackOptions, Strategy,
};
use nopad_model::weights;
use nopad_model::{Config, Inputs, Model};

use crate::checkpoint::{self, Counters, ScheduleState, TrainerState};
use crate::error::{Result, TrainError};
use crate::eval::evaluate;
use crate::identity::RunIdentity;
use crate::optimizer::Optimizer;
use crate::runlog::RunLog;
use crate::schedule::Schedule;

pub use crate::config::{DataSource, ModelSource, Resume, TrainConfig};
pub use crate::records::{EvalRecord, StepRecord, StopReason, Summary};

fn unknown_preset(name: &str) -> TrainError {
    let names: Vec<&str> = nopad_model::PRESETS.iter().map(|p| p.0).collect();
    TrainError::Config(format!(
        "--model: `{name}` is neither a directory nor a preset (presets: {})",
        names.join(", ")
    ))
}

/// The config of a model source, without its weights.
pub fn model_config(source: &ModelSource) -> Result<Config> {
    match source {
        ModelSource::Preset(name) => Config::preset(name).ok_or_else(|| unknown_preset(name)),
        ModelSource::Dir(dir) => Ok(weights::read_config(dir)?),
    }
}

/// A model on a backend, from a preset (random init) or an HF directory.
pub fn build_model<B: Backend>(
    b: &B,
    source: &ModelSource,
    seed: u64,
) -> Result<(Model<B>, String)> {
    build(b, source, seed, Model::new)
}

/// The same for evaluation only (no gradient buffer, see [`Model::new_eval`]).
pub fn build_eval_model<B: Backend>(
    b: &B,
    source: &ModelSource,
    seed: u64,
) -> Result<(Model<B>, String)> {
    build(b, source, seed, Model::new_eval)
}

fn build<B: Backend>(
    b: &B,
    source: &ModelSource,
    seed: u64,
    new: fn(&B, Config) -> nopad_model::Result<Model<B>>,
) -> Result<(Model<B>, String)> {
    match source {
        ModelSource::Preset(name) => {
            let cfg = Config::preset(name).ok_or_else(|| unknown_preset(name))?;
            let mut m = new(b, cfg.clone())?;
            let layout = m.layout.clone();
            weights::init_random(&cfg, &layout, seed, |off, v| m.write_params(b, off, v))?;
            Ok((m, format!("preset {name} (random init, seed {seed})")))
        }
        ModelSource::Dir(dir) => {
            let cfg = weights::read_config(dir)?;
            let mut m = new(b, cfg.clone())?;
            let layout = m.layout.clone();
            weights::load_checkpoint(dir, &cfg, &layout, |off, v| m.write_params(b, off, v))?;
            Ok((m, format!("{} ({})", dir.display(), cfg.arch.hf_name())))
        }
    }
}

/// The id pad tokens get: the config's pad id, else its (first) eos id, else 0.
pub fn pad_token_id(cfg: &Config) -> i32 {
    let first = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .and_then(|v| v.as_i64().or_else(|| v.as_array()?.first()?.as_i64()))
    };
    first(&cfg.pad_token_id)
        .or_else(|| first(&cfg.eos_token_id))
        .unwrap_or(0) as i32
}

/// Loads (or generates) the examples of a data source for a model.
pub fn load_data(
    source: &DataSource,
    model_cfg: &Config,
    model_dir: Option<&std::path::Path>,
    tc: &TrainConfig,
) -> Result<(Vec<Example>, Vec<String>)> {
    match source {
        DataSource::Synthetic { dist, examples } => {
            let ex = synthetic::instruction_dataset(&synthetic::SyntheticConfig {
                n_examples: *examples,
                vocab_size: model_cfg.vocab_size,
                lengths: *dist,
                max_len: tc.max_len,
                seed: tc.seed,
            });
            Ok((ex, vec![]))
        }
        DataSource::File(path) => {
            let opts = nopad_data::LoadOptions {
                format: tc.format,
                max_len: tc.max_len,
                long: tc.long,
                skip_bad: tc.skip_bad,
                vocab_size: Some(model_cfg.vocab_size),
                tokenizer_dir: model_dir.map(|d| d.to_path_buf()),
                strict: false,
            };
            let (ex, report) = nopad_data::load_examples(path, &opts)?;
            let mut notes = vec![format!("{}: {report}", path.display())];
            notes.extend(report.warnings.iter().cloned());
            if ex.is_empty() {
                return Err(TrainError::Config(format!(
                    "{}: no usable examples",
                    path.display()
                )));
            }
            Ok((ex, notes))
        }
    }
}

/// The model's view of a packed batch.
pub fn inputs(batch: &Batch) -> Inputs<'_> {
    Inputs {
        tokens: &batch.tokens,
        targets: &batch.targets,
        position_ids: &batch.position_ids,
        cu_seqlens: &batch.cu_seqlens,
        max_seqlen: batch.max_seqlen,
    }
}

/// Runs forward and backward over a step's micro-batches and applies one update. Returns the
/// step's token-weighted loss, the gradient norm and whether the update was applied.
pub fn train_step<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    opt: &mut Optimizer<B>,
    batches: &[Batch],
    lr: f64,
) -> Result<(f64, f64, bool)> {
    step_scaled(b, model, opt, batches, lr, false)
}

/// [`train_step`], with the loss scale replaced by NaN when `poison` (a test of the skip path).
fn step_scaled<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    opt: &mut Optimizer<B>,
    batches: &[Batch],
    lr: f64,
    poison: bool,
) -> Result<(f64, f64, bool)> {
    let targets: usize = batches.iter().map(|x| x.stats.target_tokens).sum();
    if targets == 0 {
        return Err(TrainError::Config(
            "a step has no target tokens (every label is -100)".into(),
        ));
    }
    let scale = if poison {
        f32::NAN
    } else {
        1.0 / targets as f32
    };
    for batch in batches {
        if batch.is_empty() {
            continue;
        }
        model.forward(b, &inputs(batch), Some(scale))?;
        model.backward(b)?;
    }
    let loss = model.take_loss_sum(b)? / targets as f64;
    // A non-finite loss or gradient norm leaves weights and moments untouched (`update` checks
    // the norm); the gradients are zeroed either way, so nothing non-finite survives the step.
    let info = if loss.is_finite() {
        opt.update(b, model, lr)?
    } else {
        crate::optimizer::UpdateInfo {
            grad_norm: f64::NAN,
            applied: false,
        }
    };
    model.zero_grads(b)?;
    Ok((loss, info.grad_norm, info.applied))
}

/// The checkpoint a run continues from, if any (`notes` learn why none or which were skipped).
fn find_resume(tc: &TrainConfig, notes: &mut Vec<String>) -> Result<Option<checkpoint::Found>> {
    match &tc.resume {
        None => Ok(None),
        Some(Resume::Dir(d)) => Ok(Some((d.clone(), checkpoint::load_state(d)?))),
        Some(Resume::Latest) => {
            let out = tc.out.as_ref().ok_or_else(|| {
                TrainError::Config("`resume latest` needs `out` (where the checkpoints are)".into())
            })?;
            let (found, skipped) = checkpoint::latest(out)?;
            notes.extend(skipped);
            if found.is_none() {
                notes.push(format!(
                    "--resume latest: no complete checkpoint under {}; started from scratch",
                    out.display()
                ));
            }
            Ok(found)
        }
    }
}

/// Mean of the last 10% (at least one) of the finite losses.
fn tail_mean(losses: &[f64]) -> f64 {
    if losses.is_empty() {
        return f64::NAN;
    }
    let tail = (losses.len() / 10).max(1);
    losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64
}

/// Trains a model as `tc` says, calling `on_step` after every step. Returns the summary; a run
/// asked to stop (signal or `stop_after`) returns normally with [`Summary::stopped`] set.
pub fn train<B: Backend>(
    b: &B,
    tc: &TrainConfig,
    mut on_step: impl FnMut(&StepRecord),
) -> Result<Summary> {
    tc.validate()?;
    let mut notes = vec![];
    let resume = find_resume(tc, &mut notes)?;
    let (mut model, model_desc) = match &resume {
        None => build_model(b, &tc.model, tc.seed)?,
        // The weights come from the checkpoint: skip the initialisation or the HF load.
        Some(_) => {
            let what = match &tc.model {
                ModelSource::Preset(name) => format!("preset {name}"),
                ModelSource::Dir(d) => d.display().to_string(),
            };
            let desc = format!("{what} (weights from the checkpoint)");
            (Model::new(b, model_config(&tc.model)?)?, desc)
        }
    };
    model.set_recompute(tc.recompute);
    model.set_grad_aliasing(b, tc.grad_aliasing && tc.grad_accum == 1)?;
    let model_dir = match &tc.model {
        ModelSource::Dir(d) => Some(d.as_path()),
        ModelSource::Preset(_) => None,
    };
    let (examples, data_notes) = load_data(&tc.data, &model.cfg, model_dir, tc)?;
    notes.extend(data_notes);
    if tc.strategy == Strategy::Concat {
        notes.push("strategy concat: attention crosses examples and positions continue; training is NOT equivalent to padding (shown for comparison only)".into());
    }
    // Only a run that saves or resumes needs its identity (hashing a big data file takes time).
    let identity = if tc.out.is_some() || resume.is_some() {
        Some(RunIdentity::new(tc, &model.cfg, &examples)?)
    } else {
        None
    };
    if let (Some((dir, st)), Some(id)) = (&resume, &identity) {
        let diffs = id.differences(&st.identity);
        if !diffs.is_empty() {
            return Err(TrainError::Config(format!(
                "cannot resume from {}: this run is not the one that saved it:\n  {}\n\
                 resume with the checkpoint's settings, or start a new run with another --out",
                dir.display(),
                diffs.join("\n  ")
            )));
        }
    }
    let start_step = resume.as_ref().map_or(0, |(_, st)| st.step);
    if let Some(n) = tc.stop_after.filter(|&n| n <= start_step) {
        return Err(TrainError::Config(format!(
            "`stop-after` {n}: the checkpoint is already at step {start_step}"
        )));
    }
    let n_examples = examples.len();
    let pack = PackOptions {
        strategy: tc.strategy,
        batch_size: tc.batch_size,
        max_len: tc.max_len,
        pad_token_id: pad_token_id(&model.cfg),
        group_by_length: tc.group_by_length,
    };
    let mut loader = Loader::new(
        Arc::new(examples),
        LoaderOptions {
            pack: pack.clone(),
            grad_accum: tc.grad_accum,
            seed: tc.seed,
            shuffle: true,
            start: resume
                .as_ref()
                .map(|(_, st)| st.data_position.clone())
                .unwrap_or_default(),
            prefetch: 4,
        },
    )?;
    // A resumed run takes its length from the checkpoint: `offline` counts the steps of the
    // loader's start epoch, which may differ from those of epoch 0 the first session counted.
    let (total, steps_per_epoch) = match &resume {
        Some((_, st)) => (st.schedule.total, st.steps_per_epoch),
        None => {
            let spe = loader.steps_per_epoch();
            let total = match (tc.steps, tc.epochs) {
                (Some(s), _) => s,
                (None, Some(e)) => (e * spe as f64).ceil().max(1.0) as u64,
                (None, None) => spe as u64,
            };
            (total, spe)
        }
    };
    let schedule = Schedule {
        lr: tc.lr,
        min_lr: tc.min_lr,
        warmup: tc.warmup.min(total),
        total,
        decay: tc.decay,
    };
    let mut opt = Optimizer::new(b, &model, tc.adamw)?;
    let (mut counters, mut losses, mut evals) = match &resume {
        Some((dir, st)) => {
            checkpoint::restore(b, dir, st, &mut model, &mut opt)?;
            (st.counters.clone(), st.losses.clone(), st.evals.clone())
        }
        None => (Counters::default(), vec![], vec![]),
    };
    // Held-out data never loses examples: under `--long drop` its long examples are split.
    let eval_examples = match &tc.eval_data {
        Some(p) => {
            let mut etc = tc.clone();
            if etc.long == LongPolicy::Drop {
                etc.long = LongPolicy::Split;
            }
            Some(load_data(&DataSource::File(p.clone()), &model.cfg, model_dir, &etc)?.0)
        }
        None => None,
    };
    let mut log = RunLog::open(&tc.log, start_step)?;
    let bar = progress_bar(tc.progress, total, start_step);
    let say = |msg: String| bar.suspend(|| eprintln!("nopad: {msg}"));
    if let Some((dir, _)) = &resume {
        say(format!(
            "resumed from {} at step {start_step} of {total}",
            dir.display()
        ));
    }
    let session = Instant::now();
    let (mut stopped, mut last_checkpoint, mut done) = (None, None, start_step);
    for step in start_step + 1..=total {
        let s = loader
            .next()
            .ok_or_else(|| TrainError::Config("the data loader stopped early".into()))?;
        let t0 = Instant::now();
        let lr = schedule.lr_at(opt.step + 1);
        let poison = tc.nan_at_step == Some(step);
        let (loss, grad_norm, applied) =
            step_scaled(b, &mut model, &mut opt, &s.batches, lr, poison)?;
        b.synchronize()?;
        let dt = t0.elapsed().as_secs_f64().max(1e-9);
        done = step;
        let st: BatchStats = s.stats();
        counters.train_seconds += dt;
        counters.real_tokens += st.real_tokens;
        counters.pad_tokens += st.pad_tokens;
        counters.target_tokens += st.target_tokens;
        if applied {
            counters.bad_in_a_row = 0;
        } else {
            counters.skipped_steps += 1;
            counters.bad_in_a_row += 1;
        }
        if loss.is_finite() {
            losses.push(loss);
        }
        let laid_out = (st.real_tokens + st.pad_tokens).max(1);
        let mut rec = StepRecord {
            step,
            epoch: s.epoch,
            loss,
            lr,
            grad_norm,
            tokens_per_s: st.real_tokens as f64 / dt,
            target_tokens_per_s: st.target_tokens as f64 / dt,
            padding_fraction: st.pad_tokens as f64 / laid_out as f64,
            examples: st.examples,
            real_tokens: st.real_tokens,
            target_tokens: st.target_tokens,
            elapsed_s: session.elapsed().as_secs_f64(),
            peak_memory_bytes: b.peak_memory(),
            skipped: !applied,
            skipped_steps: counters.skipped_steps,
            eval: None,
        };
        if step % tc.log_every.max(1) == 0 || step == total || !applied {
            log.line(&rec)?;
        }
        if !applied {
            say(format!(
                "step {step}: loss {loss}, gradient norm {grad_norm}: not finite, update skipped \
                 ({} in a row, {} in the run)",
                counters.bad_in_a_row, counters.skipped_steps
            ));
            if tc.max_bad_steps > 0 && counters.bad_in_a_row >= tc.max_bad_steps {
                bar.finish_and_clear();
                return Err(TrainError::Diverged(format!(
                    "step {step}: {} steps in a row had a non-finite loss or gradient norm \
                     (--max-bad-steps {}); stopped instead of training on NaNs. The weights are \
                     those before step {}{}. Check the data, lower --lr or tighten --max-grad-norm",
                    counters.bad_in_a_row,
                    tc.max_bad_steps,
                    step + 1 - counters.bad_in_a_row,
                    last_checkpoint
                        .as_ref()
                        .map(|c: &PathBuf| format!("; last checkpoint {}", c.display()))
                        .unwrap_or_default()
                )));
            }
        }
        let eval_now = tc.eval_every.is_some_and(|n| step % n == 0) || step == total;
        if let (Some(ex), true) = (&eval_examples, eval_now) {
            let r = evaluate(b, &mut model, ex, &pack)?;
            let e = EvalRecord {
                step,
                eval_loss: r.loss,
                eval_tokens: r.tokens,
            };
            log.line(&e)?;
            say(format!(
                "step {step}: eval loss {:.4} over {} target tokens",
                r.loss, r.tokens
            ));
            evals.push(e);
            rec.eval = Some(e);
        }
        bar.set_message(format!(
            "loss {loss:.4}  lr {lr:.2e}  {:.0} tok/s",
            rec.tokens_per_s
        ));
        bar.inc(1);
        on_step(&rec);
        if step < total {
            stopped = match tc.interrupt.as_ref().and_then(|i| i.requested()) {
                Some(sig) => Some(StopReason::Signal(sig)),
                None if tc.stop_after == Some(step) => Some(StopReason::StopAfter(step)),
                None => None,
            };
        }
        let periodic = tc.save_every.is_some_and(|n| step % n == 0);
        if let (Some(out), Some(id), true) = (&tc.out, &identity, periodic || stopped.is_some()) {
            let state = TrainerState {
                format: checkpoint::FORMAT,
                nopad_version: env!("CARGO_PKG_VERSION").into(),
                step,
                optimizer_step: opt.step,
                data_position: s.position_after.clone(),
                steps_per_epoch,
                schedule: ScheduleState::from(&schedule),
                counters: counters.clone(),
                losses: losses.clone(),
                evals: evals.clone(),
                identity: id.clone(),
            };
            let (dir, gone) = checkpoint::save(
                b,
                out,
                &model,
                &opt,
                &state,
                tc.keep,
                tc.save_delay,
                model_dir,
            )?;
            let gone: String = gone
                .iter()
                .map(|g| format!(", deleted {}", g.display()))
                .collect();
            say(format!("saved {}{gone}", dir.display()));
            last_checkpoint = Some(dir);
        }
        if stopped.is_some() {
            break;
        }
    }
    bar.finish_and_clear();
    if let (Some(out), None) = (&tc.out, stopped) {
        weights::save_checkpoint(
            out,
            &model.cfg,
            &model.layout,
            tc.save_dtype,
            4 << 30,
            |r| Ok(opt.read_weights(b, &model, r)?),
        )?;
        if let ModelSource::Dir(src) = &tc.model {
            weights::copy_tokenizer_files(src, out)?;
        }
    }
    let final_eval = evals
        .last()
        .filter(|e| e.step == total && stopped.is_none())
        .copied();
    Ok(Summary {
        model: model_desc,
        params: model.layout.total,
        device: b.describe(),
        strategy: tc.strategy.name().into(),
        steps: total,
        steps_done: done,
        steps_per_epoch,
        examples: n_examples,
        real_tokens: counters.real_tokens,
        pad_tokens: counters.pad_tokens,
        target_tokens: counters.target_tokens,
        train_seconds: counters.train_seconds,
        tokens_per_s: counters.real_tokens as f64 / counters.train_seconds.max(1e-9),
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        last_loss: tail_mean(&losses),
        eval_loss: final_eval.map(|e| e.eval_loss),
        eval_tokens: final_eval.map(|e| e.eval_tokens),
        evals,
        skipped_steps: counters.skipped_steps,
        peak_memory_bytes: b.peak_memory(),
        out: tc.out.clone().filter(|_| stopped.is_none()),
        resumed_from: resume.map(|(d, _)| d),
        checkpoint: last_checkpoint,
        stopped,
        notes,
    })
}

fn progress_bar(show: bool, total: u64, at: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]",
        )
        .expect("static template is valid"),
    );
    bar.set_position(at);
    bar
}
