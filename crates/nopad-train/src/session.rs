//! Opening a training session: everything before the first step. It finds the checkpoint to
//! resume from, builds the model (or takes the checkpoint's weights), loads the data, checks that
//! a resumed run is the one that saved the checkpoint, and sets up the loader, the schedule, the
//! optimizer and the run's history, so the next step is exactly the one an uninterrupted run
//! would take. Also the model and data builders the CLI and the benchmark share.

use std::path::Path;
use std::sync::Arc;

use nopad_backend::Backend;
use nopad_data::{synthetic, Example, Loader, LoaderOptions, LongPolicy, PackOptions, Strategy};
use nopad_model::lora::memory::LoraShape;
use nopad_model::weights;
use nopad_model::{Config, Model};

use crate::checkpoint;
use crate::collective::Collective;
use crate::config::{DataSource, ModelSource, Resume, TrainConfig};
use crate::error::{Result, TrainError};
use crate::identity::RunIdentity;
use crate::lora::build_lora_model;
use crate::optimizer::{weight_pieces, Optimizer, ShardStage};
use crate::out_lock::OutLock;
use crate::records::History;
use crate::samples::Sampler;
use crate::schedule::Schedule;
use crate::state_check::{check_schedule, check_state, DataFacts};

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
    build(b, source, seed, None, Model::new)
}

/// [`build_model`] keeping only the first `layers` decoder layers of a preset (at least one;
/// `nopad bench --layers`).
pub fn build_model_layers<B: Backend>(
    b: &B,
    source: &ModelSource,
    seed: u64,
    layers: usize,
) -> Result<(Model<B>, String)> {
    build(b, source, seed, Some(layers), Model::new)
}

/// The same for evaluation only (no gradient buffer, see [`Model::new_eval`]).
pub fn build_eval_model<B: Backend>(
    b: &B,
    source: &ModelSource,
    seed: u64,
) -> Result<(Model<B>, String)> {
    build(b, source, seed, None, Model::new_eval)
}

/// A model of `source` made by `new` (its parameters filled: random for a preset, the
/// checkpoint's for a directory).
pub(crate) fn build<B: Backend>(
    b: &B,
    source: &ModelSource,
    seed: u64,
    layers: Option<usize>,
    new: impl FnOnce(&B, Config) -> nopad_model::Result<Model<B>>,
) -> Result<(Model<B>, String)> {
    match source {
        ModelSource::Preset(name) => {
            let mut cfg = Config::preset(name).ok_or_else(|| unknown_preset(name))?;
            if let Some(l) = layers {
                cfg.num_hidden_layers = l.min(cfg.num_hidden_layers).max(1);
            }
            let mut m = new(b, cfg.clone())?;
            let layout = m.layout.clone();
            weights::init_random(&cfg, &layout, seed, |off, v| m.write_params(b, off, v))?;
            Ok((m, format!("preset {name} (random init, seed {seed})")))
        }
        ModelSource::Dir(_) if layers.is_some() => Err(TrainError::Config(
            "--layers applies to presets only".into(),
        )),
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
    model_dir: Option<&Path>,
    tc: &TrainConfig,
) -> Result<(Vec<Example>, Vec<String>)> {
    load_counted(source, model_cfg, model_dir, tc).map(|(ex, notes, _)| (ex, notes))
}

/// [`load_data`], also returning how many examples were truncated (None for synthetic data,
/// generated within max-len).
fn load_counted(
    source: &DataSource,
    model_cfg: &Config,
    model_dir: Option<&Path>,
    tc: &TrainConfig,
) -> Result<(Vec<Example>, Vec<String>, Option<usize>)> {
    match source {
        DataSource::Synthetic { dist, examples } => {
            let ex = synthetic::instruction_dataset(&synthetic::SyntheticConfig {
                n_examples: *examples,
                vocab_size: model_cfg.vocab_size,
                lengths: *dist,
                max_len: tc.max_len,
                seed: tc.seed,
            });
            Ok((ex, vec![], None))
        }
        DataSource::File(path) => {
            let opts = nopad_data::LoadOptions {
                format: tc.format,
                max_len: tc.max_len,
                long: tc.long,
                skip_bad: tc.skip_bad,
                strict: tc.strict,
                loss_on: tc.loss_on,
                stop: tc
                    .interrupt
                    .as_ref()
                    .map(|i| i.flag().clone())
                    .unwrap_or_default(),
                vocab_size: Some(model_cfg.vocab_size),
                tokenizer_dir: model_dir.map(|d| d.to_path_buf()),
                chat_template: tc.chat_template.clone(),
                dataset_cache: tc.dataset_cache.clone(),
                columns: tc.columns.clone(),
            };
            let (ex, report) =
                nopad_data::load_examples(path, &opts).map_err(|e| match e.signal {
                    Some(sig) => TrainError::Interrupted(sig),
                    None => e.into(),
                })?;
            let mut notes = vec![format!("{}: {report}", path.display())];
            notes.extend(report.warnings.iter().cloned());
            if ex.is_empty() {
                return Err(TrainError::Config(format!(
                    "{}: no usable examples",
                    path.display()
                )));
            }
            Ok((ex, notes, Some(report.truncated)))
        }
    }
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

/// A run between its steps: what [`Session::open`] set up and the loop carries on.
pub(crate) struct Session<B: Backend> {
    /// The model, its weights restored on resume.
    pub model: Model<B>,
    /// How the summary names it.
    pub model_desc: String,
    /// The optimizer, its moments restored on resume.
    pub opt: Optimizer<B>,
    /// The training data stream, at the position the run continues from.
    pub loader: Loader,
    /// How batches are packed (also for evaluation).
    pub pack: PackOptions,
    /// The learning-rate schedule (its `total` is the run's length).
    pub schedule: Schedule,
    /// Steps per epoch as the run started counting them.
    pub steps_per_epoch: usize,
    /// Examples loaded.
    pub n_examples: usize,
    /// What must match to resume (only for runs that save or resume).
    pub identity: Option<RunIdentity>,
    /// The checkpoint this session continues from.
    pub resumed_from: Option<std::path::PathBuf>,
    /// The last step done before this session.
    pub start_step: u64,
    /// Counters, losses and evaluations so far.
    pub history: History,
    /// Held-out examples, if any.
    pub eval_examples: Option<Vec<Example>>,
    /// Notes for the summary.
    pub notes: Vec<String>,
    /// Examples truncated to max-len while loading (None for synthetic data).
    pub truncated: Option<usize>,
    /// Warnings to print before the first step (a resumed run's changed settings).
    pub warnings: Vec<String>,
    /// The exclusive hold on `out`, for the session's whole life (rank 0's).
    pub _lock: Option<OutLock>,
    /// (this rank, ranks in the run): the loader hands this rank its `grad_accum` micro-batches
    /// of each global step, dealt by cost.
    pub ranks: (usize, usize),
    /// The samples between steps (`--sample-every`), if any: every rank generates them (so
    /// none waits for rank 0 in its next collective), rank 0 writes them.
    pub sampler: Option<Sampler>,
}

/// The run's total steps and steps per epoch, `spe` being the loader's start epoch's. A resumed
/// run takes both from the checkpoint: `offline` counts the steps of the loader's start epoch,
/// which may differ from those of epoch 0 the first session counted.
fn run_length(
    tc: &TrainConfig,
    resume: &Option<(std::path::PathBuf, crate::checkpoint::TrainerState)>,
    spe: usize,
) -> (u64, usize) {
    let spe = resume.as_ref().map_or(spe, |(_, st)| st.steps_per_epoch);
    (crate::config::total_steps(tc.steps, tc.epochs, spe), spe)
}

/// The schedule of a resumed run: the checkpoint's (its restart included) when nothing changed,
/// else the checkpoint's continued by `plain`, the flags' (see [`Schedule::continued`]).
fn resumed_schedule(
    dir: &Path,
    st: &checkpoint::TrainerState,
    changed: bool,
    plain: Schedule,
) -> Result<Schedule> {
    let s = &st.schedule;
    if !changed {
        return Ok(Schedule {
            restart: s.restart,
            ..plain
        });
    }
    let decay = s.decay.parse().map_err(|e| {
        TrainError::Config(format!(
            "{}: trainer_state.json field `schedule.decay`: {e}",
            dir.join("trainer_state.json").display()
        ))
    })?;
    let old = Schedule {
        lr: s.lr,
        min_lr: s.min_lr,
        warmup: s.warmup,
        total: s.total,
        decay,
        restart: s.restart,
    };
    Ok(old.continued(st.optimizer_step, plain))
}

impl<B: Backend> Session<B> {
    /// Opens rank `coll.rank()`'s session: resume, model, data, identity, loader, schedule,
    /// optimizer. Every rank loads the data and reads the checkpoint; only rank 0 locks `out`.
    pub fn open(b: &B, coll: &dyn Collective<B>, tc: &TrainConfig) -> Result<Self> {
        tc.validate()?;
        let (rank, world) = (coll.rank(), coll.world_size());
        // Before anything reads or prunes checkpoints under `out`.
        let lock = match rank {
            0 => tc.out.as_deref().map(OutLock::acquire).transpose()?,
            _ => None,
        };
        let mut notes = vec![];
        let resume = find_resume(tc, &mut notes)?;
        // The data first: the memory plan needs its largest micro-batch, and a run that cannot
        // fit is refused before the model is allocated.
        let cfg = model_config(&tc.model)?;
        // HF's dynamic NTK rescales RoPE per batch beyond the model's context; within it, it is
        // plain RoPE, which is what nopad trains.
        if let (nopad_model::RopeScaling::Dynamic { .. }, true) =
            (&cfg.rope_scaling, tc.max_len > cfg.max_position_embeddings)
        {
            return Err(TrainError::Config(format!(
                "`max-len` {}: this model's RoPE is `dynamic`, which nopad trains only within                  max_position_embeddings ({}): lower --max-len",
                tc.max_len, cfg.max_position_embeddings
            )));
        }
        let model_dir = model_dir(tc);
        let (examples, data_notes, truncated) = load_counted(&tc.data, &cfg, model_dir, tc)?;
        stop_if_asked(tc)?;
        notes.extend(data_notes);
        let pack = crate::plan::pack_options(tc, &cfg);
        let examples = Arc::new(examples);
        let loader_opts = LoaderOptions {
            pack: pack.clone(),
            // One global order: each step is the one-rank step of every rank's micro-batches,
            // dealt to the ranks by cost (nopad-data's `ranks`); this loader keeps this rank's.
            grad_accum: tc.grad_accum,
            seed: tc.seed,
            shuffle: true,
            start: resume
                .as_ref()
                .map(|(_, st)| st.data_position.clone())
                .unwrap_or_default(),
            prefetch: 4,
            parallel: nopad_data::DataParallel {
                ranks: world,
                rank,
                attention_len: 6 * cfg.hidden_size as u64,
            },
        };
        // Only a run that saves or resumes needs its identity (hashing a big data file takes time).
        let identity = if tc.out.is_some() || resume.is_some() {
            let mut id = RunIdentity::new(tc, &cfg, &examples)?;
            id.world_size = world;
            Some(id)
        } else {
            None
        };
        stop_if_asked(tc)?;
        let mut warnings = vec![];
        let mut changed = false;
        if let (Some((dir, st)), Some(id)) = (&resume, &identity) {
            let (diffs, changes) = id.split_changes(&st.identity);
            if !changes.is_empty() {
                changed = true;
                warnings.push(format!(
                    "resuming {} with changed settings:\n  {}",
                    dir.display(),
                    changes.join("\n  ")
                ));
            }
            if !diffs.is_empty() {
                return Err(TrainError::Config(format!(
                    "cannot resume from {}: this run is not the one that saved it:\n  {}\n\
                     resume with the checkpoint's settings, or start a new run with another --out",
                    dir.display(),
                    diffs.join("\n  ")
                )));
            }
        }
        if let Some((dir, st)) = &resume {
            let facts = DataFacts {
                examples: examples.len(),
                strategy: tc.strategy,
            };
            check_state(dir, st, &facts)?;
        }
        // Only now that the checkpoint's state is known to be sound (its step counts bound the
        // scan below), the memory plan, then the model.
        // The steps this session runs, packed once on the host: their largest micro-batch.
        let spe = nopad_data::steps_per_epoch(Arc::clone(&examples), &loader_opts)?;
        if let Some((dir, st)) = &resume {
            check_schedule(
                dir,
                st,
                &st.identity,
                (tc.strategy != Strategy::Offline).then_some(spe),
            )?;
        }
        let (total, steps_per_epoch) = run_length(tc, &resume, spe);
        let start_step = resume.as_ref().map_or(0, |(_, st)| st.step);
        if let Some((dir, _)) = resume.as_ref().filter(|_| total <= start_step) {
            return Err(TrainError::Config(format!(
                "`steps`/`epochs`: this run ends at step {total}, but {} is already at step \
                 {start_step}: give more steps or epochs to extend it",
                dir.display()
            )));
        }
        let last = tc.stop_after.map_or(total, |s| s.min(total));
        let tokens = nopad_data::largest_micro_batch(
            Arc::clone(&examples),
            &loader_opts,
            last.saturating_sub(start_step),
        )?;
        // Every rank takes the samples (rank 0 writes them), and plans them.
        let sampler = Sampler::open(tc, &cfg)?;
        let sampling = sampler.as_ref().map_or(0, |sm| {
            let lora = tc.lora.as_ref().map(|l| LoraShape::of(&l.settings, l.base));
            let dev = crate::plan::DeviceSizes::of(b);
            let max_new = sm.max_new_tokens();
            crate::plan::sampling_bytes(&cfg, lora.as_ref(), &sm.lens(), max_new, &dev)
        });
        // `largest_micro_batch` packs every rank's share of those steps, so `tokens` is the same
        // on every rank and all choose the same stage.
        let (stage, _, chosen) = crate::plan::check_run(
            b,
            &cfg,
            tokens,
            crate::plan::modes_of(tc, world),
            (tc.shard, tc.gpu_memory, sampling),
            tc.grad_accum == 1 && tc.lora.is_none() && world == 1,
        )?;
        notes.extend(chosen);
        if sampler.is_some() && stage == ShardStage::Params && tc.lora.is_none() {
            return Err(TrainError::Config(
                "`sample-every`: a run at --shard 3 holds pieces of each layer, which cannot generate; use --shard 2 or less".into(),
            ));
        }
        // Stage 3: this rank allocates only its pieces of the weights.
        let pieces = match (stage, &tc.lora) {
            (ShardStage::Params, None) => Some(weight_pieces(&cfg, coll, tc.adamw.states)?),
            _ => None,
        };
        let new = |b: &B, cfg| match &pieces {
            Some(p) => Model::new_sharded(b, cfg, p, world),
            None => Model::new(b, cfg),
        };
        let (mut model, model_desc) = match (&resume, &tc.lora) {
            // A LoRA checkpoint holds the adapter only: the frozen base comes from its source.
            (_, Some(lt)) => build_lora_model(b, &tc.model, tc.seed, None, lt)?,
            (None, None) => build(b, &tc.model, tc.seed, None, new)?,
            // The weights come from the checkpoint: skip the initialisation or the HF load.
            (Some(_), None) => {
                let what = match &tc.model {
                    ModelSource::Preset(name) => format!("preset {name}"),
                    ModelSource::Dir(d) => d.display().to_string(),
                };
                let desc = format!("{what} (weights from the checkpoint)");
                (new(b, model_config(&tc.model)?)?, desc)
            }
        };
        model.set_recompute(tc.recompute);
        model.set_offload_activations(tc.offload_activations)?;
        // A LoRA model's gradients are the adapters' (small): nothing to alias.
        let alias = tc.grad_aliasing && tc.grad_accum == 1 && !tc.optim_in_backward;
        model.set_grad_aliasing(b, alias && tc.lora.is_none())?;
        notes.extend(crate::lora::describe(&model));
        // Stages 2 and 3 keep one group's gradient at a time, as the optimizer in the backward
        // does (a LoRA model's adapter gradients are small and stay whole).
        let scratch = stage.one_group_grads() && tc.lora.is_none();
        model.set_update_in_backward(b, tc.optim_in_backward || scratch)?;
        if tc.offload_activations > 0 {
            // The pinned host buffers once, for the largest micro-batch, not mid-run.
            model.reserve_activations(b, tokens)?;
        }
        if tc.optim_in_backward {
            notes.push("optim-in-backward: each parameter group is updated as soon as its gradient is complete; gradient clipping is off (the logged norm is the unclipped global norm)".into());
        }
        if tc.strategy == Strategy::Concat {
            notes.push("strategy concat: attention crosses examples and positions continue; training is NOT equivalent to padding (shown for comparison only)".into());
        }
        if let Some(n) = tc.stop_after.filter(|&n| n <= start_step) {
            return Err(TrainError::Config(format!(
                "`stop-after` {n}: the checkpoint is already at step {start_step}"
            )));
        }
        let n_examples = examples.len();
        let loader = Loader::new(examples, loader_opts)?;
        let plain = Schedule {
            lr: tc.lr,
            min_lr: tc.min_lr,
            warmup: crate::config::warmup_steps(tc.warmup, tc.warmup_ratio, total),
            total,
            decay: tc.decay,
            restart: None,
        };
        let schedule = match &resume {
            Some((dir, st)) => resumed_schedule(dir, st, changed, plain)?,
            None => plain,
        };
        if let (true, Some(r)) = (changed, schedule.restart) {
            warnings.push(format!(
                "the {} decay restarts after update {} from lr {:e} to {:e} at step {total}",
                schedule.decay.name(),
                r.at,
                r.lr,
                schedule.min_lr
            ));
        } else if changed {
            warnings.push(format!(
                "the warm-up goes on to lr {:e}, then the {} decay reaches {:e} at step {total}",
                schedule.lr,
                schedule.decay.name(),
                schedule.min_lr
            ));
        }
        stop_if_asked(tc)?;
        // Stochastic rounding draws its bits from the run's seed, so a resumed run draws the same.
        let adamw = crate::AdamWConfig {
            rounding_seed: tc.seed,
            ..tc.adamw
        };
        let mut opt = Optimizer::for_rank(b, &model, adamw, tc.offload, (coll, stage))?;
        if tc.optim_in_backward {
            opt.check_group_blocks()?;
        }
        let history = match &resume {
            Some((dir, st)) => {
                checkpoint::restore(b, dir, st, &mut model, &mut opt)?;
                st.history()
            }
            None => History::default(),
        };
        // Held-out data never loses examples: under `--long drop` its long examples are split.
        let eval_examples = match &tc.eval_data {
            // Stage 3: every rank evaluates (the weights are gathered from all of them).
            Some(p) if rank == 0 || stage == ShardStage::Params => {
                let mut etc = tc.clone();
                if etc.long == LongPolicy::Drop {
                    etc.long = LongPolicy::Split;
                }
                Some(load_data(&DataSource::File(p.clone()), &model.cfg, model_dir, &etc)?.0)
            }
            _ => None,
        };
        Ok(Session {
            model,
            model_desc,
            opt,
            loader,
            pack,
            schedule,
            steps_per_epoch,
            n_examples,
            identity,
            resumed_from: resume.map(|(d, _)| d),
            start_step,
            history,
            eval_examples,
            notes,
            truncated,
            warnings,
            _lock: lock,
            ranks: (rank, world),
            sampler,
        })
    }
}

/// Ends preparation at a signal's request: before the first step there is nothing to save.
fn stop_if_asked(tc: &TrainConfig) -> Result<()> {
    match tc.interrupt.as_ref().and_then(|i| i.requested()) {
        Some(sig) => Err(TrainError::Interrupted(sig)),
        None => Ok(()),
    }
}

/// The model directory of a run (where tokenizer files come from), if the model is one.
pub(crate) fn model_dir(tc: &TrainConfig) -> Option<&Path> {
    match &tc.model {
        ModelSource::Dir(d) => Some(d.as_path()),
        ModelSource::Preset(_) => None,
    }
}
