//! The training loop: a short walk over named phases. [`Session::open`] (resume, identity,
//! loader, schedule), then per step: the step itself ([`crate::step`]), logging, evaluation,
//! stopping on request and checkpointing; at the end the final weights and the [`Summary`].
//!
//! Around the steps: non-finite steps are skipped (and too many in a row end the run), periodic
//! evaluation, samples (`--sample-every`) and checkpoints, and a stop on request leaves a
//! checkpoint to resume from.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use nopad_backend::Backend;
use nopad_data::Step;
use nopad_model::weights;

use crate::checkpoint::{self, TrainerState};
use crate::collective::{Collective, SingleProcess};
use crate::config::{ModelSource, TrainConfig};
use crate::error::{Result, TrainError};
use crate::eval::evaluate_from;
use crate::optimizer::ShardStage;
use crate::records::{EvalRecord, StepRecord, StopReason, Summary};
use crate::runlog::RunLog;
use crate::session::{model_dir, Session};
use crate::step::step_scaled;

/// Trains a model as `tc` says, calling `on_step` after every step. Returns the summary; a run
/// asked to stop (signal or `stop_after`) returns normally with [`Summary::stopped`] set.
pub fn train<B: Backend>(
    b: &B,
    tc: &TrainConfig,
    on_step: impl FnMut(&StepRecord),
) -> Result<Summary> {
    train_rank(b, &SingleProcess, tc, on_step)
}

/// Rank `coll.rank()` of a data-parallel run of `coll.world_size()` ranks: [`train`] with each
/// step's micro-batches shared out between the ranks (rank r takes its `grad_accum` of the
/// one-rank step of `grad_accum × world` micro-batches) and the gradients exchanged over `coll`
/// (module `data_parallel`). Every rank builds the same model from the same seed or checkpoint;
/// rank 0 alone prints, logs, evaluates and writes checkpoints and the final weights (the
/// others join the collectives that gather a sharded state for it). Every rank calls it with
/// the same `tc`; a rank's error reaches its peers through `coll` (their collectives fail).
pub fn train_rank<B: Backend>(
    b: &B,
    coll: &dyn Collective<B>,
    tc: &TrainConfig,
    mut on_step: impl FnMut(&StepRecord),
) -> Result<Summary> {
    let mut s = Session::open(b, coll, tc)?;
    let rank0 = coll.rank() == 0;
    let (start, total) = (s.start_step, s.schedule.total);
    let mut log = match rank0 {
        true => RunLog::open(&tc.log, tc.tensorboard.as_deref(), start)?,
        false => RunLog::open(&None, None, start)?,
    };
    let bar = progress_bar(tc.progress && rank0, total, start);
    let say = |msg: String| {
        if rank0 {
            bar.suspend(|| eprintln!("nopad: {msg}"))
        }
    };
    let facts = crate::settings::Facts {
        model: &s.model_desc,
        examples: s.n_examples,
        truncated: s.truncated,
        schedule: &s.schedule,
        steps_per_epoch: s.steps_per_epoch,
        world: s.ranks.1,
    };
    say(format!("settings:\n{}", crate::settings::block(tc, &facts)));
    let warmup = crate::settings::warmup_warning(tc, total);
    for w in s.warnings.iter().chain(&warmup) {
        say(format!("warning: {w}"));
    }
    // Where no bar can be drawn (nohup, Slurm, CI), or none is wanted, a plain line per logged
    // step says how the run goes.
    let plain = !tc.progress || !std::io::stderr().is_terminal();
    if let Some(dir) = &s.resumed_from {
        say(format!(
            "resumed from {} at step {start} of {total}",
            dir.display()
        ));
    }
    let clock = Instant::now();
    let (mut stopped, mut last_checkpoint, mut done) = (None, None, start);
    let mut imbalances = vec![];
    for step in start + 1..=total {
        let data = s
            .loader
            .next()
            .ok_or_else(|| TrainError::Config("the data loader stopped early".into()))?;
        let mut rec = s.step((b, coll), tc, (step, &data), clock)?;
        done = step;
        let logged = step % tc.log_every.max(1) == 0 || step == total;
        if logged || rec.skipped {
            log.step(&rec)?;
        }
        if logged && plain && !rec.skipped {
            say(format!(
                "step {step}/{total}: loss {:.4}, lr {:.3e}, grad norm {:.3}, {:.0} tok/s",
                rec.loss, rec.lr, rec.grad_norm, rec.tokens_per_s
            ));
        }
        if rec.skipped {
            let bad = s.history.counters.bad_in_a_row;
            say(format!(
                "step {step}: loss {}, gradient norm {}: not finite, update skipped \
                 ({bad} in a row, {} in the run)",
                rec.loss, rec.grad_norm, rec.skipped_steps
            ));
            if tc.max_bad_steps > 0 && bad >= tc.max_bad_steps {
                bar.finish_and_clear();
                return Err(diverged(tc, step, bad, last_checkpoint.as_ref()));
            }
        }
        // A model sharded by weight is evaluated by every rank (each gathers with the others);
        // otherwise rank 0 alone evaluates.
        let eval = match rank0 || s.opt.shard_stage() == ShardStage::Params {
            true => s.evaluate_at((b, coll), tc, step)?,
            false => None,
        };
        if let Some(e) = eval {
            log.eval(&e)?;
            say(format!(
                "step {step}: eval loss {:.4} over {} target tokens",
                e.eval_loss, e.eval_tokens
            ));
            rec.eval = Some(e);
        }
        // Every rank generates (none then waits for rank 0 in its next collective); only rank
        // 0's log is a file and only its `say` prints.
        if let Some(sm) = s.sampler.as_ref().filter(|sm| sm.due(step, total)) {
            let samples = sm.run(b, &mut s.model, step)?;
            log.line(&samples)?;
            samples.lines().into_iter().for_each(&say);
        }
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s",
            rec.loss, rec.lr, rec.tokens_per_s
        ));
        bar.inc(1);
        imbalances.extend(rec.rank_imbalance);
        on_step(&rec);
        if step < total {
            stopped = crate::ranks::agree_on_stop(coll, stop_requested(tc, step))?;
        }
        let periodic = tc.save_every.is_some_and(|n| step % n == 0);
        if periodic || stopped.is_some() {
            if let Some((dir, gone)) = s.checkpoint(b, coll, tc, step, &data)? {
                let gone: String = gone
                    .iter()
                    .map(|g| format!(", deleted {}", g.display()))
                    .collect();
                say(format!("saved {}{gone}", dir.display()));
                last_checkpoint = Some(dir);
            }
        }
        if stopped.is_some() {
            break;
        }
    }
    bar.finish_and_clear();
    let mut summary = s.finish(b, coll, tc, (stopped, done), last_checkpoint)?;
    summary
        .notes
        .extend(crate::ranks::imbalance_note(&imbalances));
    Ok(summary)
}

impl<B: Backend> Session<B> {
    /// Runs this rank's share of step `step` of `data` (every rank's micro-batches) and counts
    /// the whole step.
    fn step(
        &mut self,
        (b, coll): (&B, &dyn Collective<B>),
        tc: &TrainConfig,
        (step, data): (u64, &Step),
        clock: Instant,
    ) -> Result<StepRecord> {
        let t0 = Instant::now();
        let lr = self.schedule.lr_at(self.opt.step + 1);
        let poison = tc.nan_at_step == Some(step);
        let (model, opt) = (&mut self.model, &mut self.opt);
        let (rank, _) = self.ranks;
        // A LoRA run's dropout masks are a function of the step and of the micro-batch's place
        // in the global step (exact resume; ranks draw distinct masks). The ranks' micro-batches
        // are dealt by cost, not cut from one rank's, so with dropout the masks, like DDP's,
        // depend on the world size.
        model.set_lora_step_at(step, (rank * tc.grad_accum) as u64);
        let out = step_scaled(b, coll, model, opt, &data.batches, lr, poison)?;
        b.synchronize()?;
        let dt = t0.elapsed().as_secs_f64().max(1e-9);
        // The whole step's tokens (every rank's, known to each from the loader): throughput
        // and counts are the run's, not this rank's share.
        let st = data.global;
        self.history.record(&st, dt, out.loss, out.applied);
        let laid_out = (st.real_tokens + st.pad_tokens).max(1);
        Ok(StepRecord {
            step,
            epoch: data.epoch,
            loss: out.loss,
            lr,
            grad_norm: out.grad_norm,
            tokens_per_s: st.real_tokens as f64 / dt,
            target_tokens_per_s: st.target_tokens as f64 / dt,
            padding_fraction: st.pad_tokens as f64 / laid_out as f64,
            examples: st.examples,
            real_tokens: st.real_tokens,
            target_tokens: st.target_tokens,
            elapsed_s: clock.elapsed().as_secs_f64(),
            peak_memory_bytes: b.peak_memory(),
            skipped: !out.applied,
            skipped_steps: self.history.counters.skipped_steps,
            rank_imbalance: crate::ranks::imbalance(&data.rank_costs),
            eval: None,
        })
    }

    /// Evaluates the held-out data when one is due after `step` (every `eval_every` steps and
    /// at the last one).
    fn evaluate_at(
        &mut self,
        (b, coll): (&B, &dyn Collective<B>),
        tc: &TrainConfig,
        step: u64,
    ) -> Result<Option<EvalRecord>> {
        let due =
            tc.eval_every.is_some_and(|n| step.is_multiple_of(n)) || step == self.schedule.total;
        let Some(ex) = self.eval_examples.as_ref().filter(|_| due) else {
            return Ok(None);
        };
        let mut src = self.opt.weight_source(coll);
        let r = evaluate_from(b, &mut self.model, ex, &self.pack, &mut src)?;
        let e = EvalRecord {
            step,
            eval_loss: r.loss,
            eval_tokens: r.tokens,
        };
        self.history.evals.push(e);
        Ok(Some(e))
    }

    /// Saves a checkpoint after `step` when the run has somewhere to put it; returns its
    /// directory and the old ones deleted.
    fn checkpoint(
        &mut self,
        b: &B,
        coll: &dyn Collective<B>,
        tc: &TrainConfig,
        step: u64,
        data: &Step,
    ) -> Result<Option<(PathBuf, Vec<PathBuf>)>> {
        let (Some(out), Some(id)) = (&tc.out, &self.identity) else {
            return Ok(None);
        };
        // Every rank brings its pieces of a sharded state; rank 0 alone writes.
        self.opt.gather_state(b, coll, &self.model)?;
        if coll.rank() != 0 {
            return Ok(None);
        }
        let state = TrainerState::at(
            step,
            self.opt.step,
            data.position_after.clone(),
            self.steps_per_epoch,
            &self.schedule,
            &self.history,
            id,
        );
        let saved = checkpoint::save(
            b,
            out,
            &self.model,
            &self.opt,
            &state,
            tc.keep,
            tc.save_delay,
            model_dir(tc),
            tc.lora.as_ref().map(|_| &tc.model),
        )?;
        self.opt.drop_gathered();
        Ok(Some(saved))
    }

    /// Writes the final weights (when the run reached its last step) and sums the run up.
    fn finish(
        mut self,
        b: &B,
        coll: &dyn Collective<B>,
        tc: &TrainConfig,
        (stopped, done): (Option<StopReason>, u64),
        last_checkpoint: Option<PathBuf>,
    ) -> Result<Summary> {
        let writes = tc.out.is_some() && stopped.is_none();
        if writes {
            self.opt.gather_state(b, coll, &self.model)?;
        }
        let (model, opt) = (&self.model, &self.opt);
        let out = tc.out.as_ref().filter(|_| coll.rank() == 0);
        if let (Some(out), None, Some(_)) = (out, stopped, &tc.lora) {
            crate::lora::save_adapter(b, out, model, opt, tc.save_dtype, &tc.model)?;
        } else if let (Some(out), None) = (out, stopped) {
            weights::save_checkpoint(
                out,
                &model.cfg,
                &model.layout,
                tc.save_dtype,
                4 << 30,
                |r| Ok(opt.read_weights(b, model, r)?),
            )?;
        }
        if let (Some(out), None) = (out, stopped) {
            if let ModelSource::Dir(src) = &tc.model {
                weights::copy_tokenizer_files(src, out)?;
            }
        }
        Ok(Summary {
            model: self.model_desc,
            params: self.model.layout.total,
            device: b.describe(),
            strategy: tc.strategy.name().into(),
            steps_done: done,
            steps_per_epoch: self.steps_per_epoch,
            examples: self.n_examples,
            peak_memory_bytes: b.peak_memory(),
            out: tc.out.clone().filter(|_| stopped.is_none()),
            resumed_from: self.resumed_from,
            checkpoint: last_checkpoint,
            notes: self.notes,
            ..Summary::from(self.history, self.schedule.total, stopped)
        })
    }
}

/// Why the run stops after `step`, if it was asked to.
fn stop_requested(tc: &TrainConfig, step: u64) -> Option<StopReason> {
    match tc.interrupt.as_ref().and_then(|i| i.requested()) {
        Some(sig) => Some(StopReason::Signal(sig)),
        None if tc.stop_after == Some(step) => Some(StopReason::StopAfter(step)),
        None => None,
    }
}

/// The error of a run whose last `bad` steps, up to `step`, were not finite.
fn diverged(tc: &TrainConfig, step: u64, bad: u64, last: Option<&PathBuf>) -> TrainError {
    TrainError::Diverged(format!(
        "step {step}: {bad} steps in a row had a non-finite loss or gradient norm \
         (--max-bad-steps {}); stopped instead of training on NaNs. The weights are \
         those before step {}{}. Check the data, lower --lr or tighten --max-grad-norm",
        tc.max_bad_steps,
        step + 1 - bad,
        last.map(|c| format!("; last checkpoint {}", c.display()))
            .unwrap_or_default()
    ))
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
