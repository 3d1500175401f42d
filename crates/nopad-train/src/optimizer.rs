//! AdamW over the model's parameter groups ([`nopad_model::Layout::groups`]): moments in fp32,
//! bf16 or block-wise 8 bits, an fp32 master copy
//! where the backend computes in lower precision unless `--master-weights none` asks for
//! stochastic rounding instead, global gradient-norm clipping, weight decay on matrices and none
//! on norms and biases (as HF Trainer splits them).
//!
//! The moments are two [`AdamWState`]s, one over the weight-decay part of the flat buffer
//! (`0..decay_end`) and one over the rest: no AdamW launch crosses `decay_end` (the two parts
//! take different decay), and an 8-bit block must be updated in one launch, so each part counts
//! its blocks from its own start and the boundary never falls inside a block, whatever the
//! model's sizes. Element by element the update is the same as over one buffer.
//!
//! Each group has settings of its own ([`GroupSettings`]: trainable or frozen, the precision and
//! placement of its state, the rank that owns it), the seam for frozen weights, optimizer-state
//! memory modes and sharding. [`Optimizer::update_group`] updates one group, so it can run from
//! [`nopad_model::Model::backward_with`] as soon as the group's gradient is complete;
//! [`Optimizer::update`] is the global gradient norm plus every group this rank owns.
//!
//! With [`Placement::Host`] (`--offload optimizer`) the weights and moments live on the host
//! and each group is updated there (module `offload`); the device keeps only the parameters.
//! The update is the same element by element, and a checkpoint is the same file.

use std::ops::Range;

use nopad_backend::{AdamW, AdamWState, AdamWStates, Backend, ParamRounding};
pub use nopad_backend::{MasterPrecision, StatePrecision};
use nopad_model::{GroupKind, Model, ParamGroup};

use crate::collective::Collective;
use crate::error::{Result, TrainError};
use crate::offload::{HostOptimizer, Update};

mod by_group;
mod names;
mod shard;
mod state_io;
pub use names::{master_name, parse_master, parse_offload, parse_states, states_name, Offload};
use shard::Shards;
pub use shard::{parse_shard, weight_pieces, ShardSource, ShardStage};
pub(crate) use state_io::{new_parts, part_of};

/// Hyper-parameters that stay fixed for a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay for matrices.
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f32>,
    /// How the moments are stored (`--optim-states`).
    pub states: StatePrecision,
    /// Whether an fp32 master copy is kept (`--master-weights`).
    pub master: MasterPrecision,
    /// Seed of the stochastic rounding of `--master-weights none` (the run's seed).
    pub rounding_seed: u64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            states: StatePrecision::F32,
            master: MasterPrecision::F32,
            rounding_seed: 0,
        }
    }
}

/// What one update did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the update was applied (false when the norm was not finite).
    pub applied: bool,
}

impl UpdateInfo {
    /// An update that changed nothing: the norm was not finite.
    pub(crate) fn skipped(grad_norm: f64) -> Self {
        UpdateInfo {
            grad_norm,
            applied: false,
        }
    }

    /// An update that was applied.
    fn applied(grad_norm: f64) -> Self {
        UpdateInfo {
            grad_norm,
            applied: true,
        }
    }
}

/// Where a group's optimizer state lives (one placement for the whole model, chosen when the
/// optimizer is built: [`Optimizer::with_placement`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// In the backend's memory, beside the parameters.
    #[default]
    Device,
    /// In host memory, updated on the host's cores (`--offload optimizer`): the fp32 weights
    /// and moments never occupy device memory.
    Host,
}

/// What the optimizer does with one parameter group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupSettings {
    /// Updated by the optimizer (false: frozen, its parameters never change).
    pub trainable: bool,
    /// How its moments are stored: one precision for the whole model ([`AdamWConfig::states`];
    /// [`Optimizer::set_group`] refuses another).
    pub precision: StatePrecision,
    /// Where its state lives.
    pub placement: Placement,
    /// The rank that updates it ([`crate::Collective::rank`]); others skip it.
    pub owner: usize,
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings {
            trainable: true,
            precision: StatePrecision::F32,
            placement: Placement::Device,
            owner: 0,
        }
    }
}

/// Optimizer state.
pub struct Optimizer<B: Backend> {
    /// Settings.
    pub cfg: AdamWConfig,
    /// Both moments, in [`AdamWConfig::states`]: each part's offset in the flat buffer and its
    /// state (the weight-decay part, then the rest; empty parts left out).
    states: Vec<(usize, AdamWState<B>)>,
    /// `[P]` fp32 master weights (in the backend's form, see `Backend::master_new`), when the
    /// backend's Compute type is narrower and [`AdamWConfig::master`] is F32.
    pub master: Option<B::Buf>,
    /// Updates applied so far (AdamW's step number of the last update).
    pub step: u64,
    /// The model's parameter groups, and what to do with each (same order).
    groups: Vec<(ParamGroup, GroupSettings)>,
    /// The offloaded state ([`Placement::Host`]); `states` and `master` are then empty.
    host: Option<Box<HostOptimizer<B>>>,
    /// Ranks holding a copy of this state (stage 0 of data parallelism; 1 in one process):
    /// with several, every rank updates every group from the same all-reduced gradients.
    replicas: usize,
    /// This rank's share of a sharded state (stages 1 and 2); `states` then holds one part
    /// per piece and `master` is empty.
    shards: Option<Box<Shards<B>>>,
}

impl<B: Backend> Optimizer<B> {
    /// Fresh state for a model's trainable parameters (all of them, or a LoRA model's
    /// adapters: [`Model::trainable`]), every group trainable with the default settings.
    pub fn new(b: &B, model: &Model<B>, cfg: AdamWConfig) -> Result<Self> {
        Self::with_placement(b, model, cfg, Placement::Device)
    }

    /// [`Optimizer::new`] with the state in `placement` for every group. On the host, the
    /// groups are updated one by one (8-bit blocks must not straddle groups,
    /// [`Optimizer::check_group_blocks`]), and each update ends with
    /// [`Optimizer::finish_group_updates`].
    pub fn with_placement(
        b: &B,
        model: &Model<B>,
        cfg: AdamWConfig,
        placement: Placement,
    ) -> Result<Self> {
        let (params, groups) = (model.trainable(), model.trainable_groups());
        Self::over_in(
            b,
            params,
            model.trainable_decay_end(),
            groups,
            cfg,
            (placement, true),
        )
    }

    /// The optimizer of rank `coll.rank()` of a data-parallel run with sharding `stage`
    /// (`--shard`; see module `shard`): stage 0 is [`Optimizer::with_placement`] on every rank;
    /// from stage 1 the state covers only this rank's pieces, on the device.
    pub fn for_rank(
        b: &B,
        model: &Model<B>,
        cfg: AdamWConfig,
        placement: Placement,
        (coll, stage): (&dyn Collective<B>, ShardStage),
    ) -> Result<Self> {
        if stage == ShardStage::Replicated {
            let mut opt = Self::with_placement(b, model, cfg, placement)?;
            opt.replicas = coll.world_size();
            return Ok(opt);
        }
        if placement == Placement::Host {
            return Err(TrainError::Config(format!(
                "--shard {} keeps each rank's share of the optimizer state on its device; --offload optimizer takes --shard 0",
                stage.number()
            )));
        }
        let (params, split) = (model.trainable(), model.trainable_decay_end());
        let groups = model.trainable_groups();
        let mut opt = Self::over_in(b, params, split, groups, cfg, (placement, false))?;
        let (shards, states) = Shards::new(b, &opt, model, coll, (stage, split))?;
        opt.states = states;
        opt.shards = Some(Box::new(shards));
        Ok(opt)
    }

    /// Fresh state for a flat buffer `params` cut into `groups` (moments zero, master copied
    /// from the parameters), its weight-decay part `0..decay_end`, every group trainable with
    /// the default settings, on the device.
    pub fn over(
        b: &B,
        params: &B::Buf,
        decay_end: usize,
        groups: &[ParamGroup],
        cfg: AdamWConfig,
    ) -> Result<Self> {
        Self::over_in(b, params, decay_end, groups, cfg, (Placement::Device, true))
    }

    /// [`Optimizer::over`] with the state in `placement`; without moments and master copy
    /// unless `whole` (a sharded optimizer allocates its pieces' afterwards).
    fn over_in(
        b: &B,
        params: &B::Buf,
        decay_end: usize,
        groups: &[ParamGroup],
        cfg: AdamWConfig,
        (placement, whole): (Placement, bool),
    ) -> Result<Self> {
        let n: usize = groups.iter().map(ParamGroup::len).sum();
        let split = decay_end;
        let host = placement == Placement::Host;
        let states = if host || !whole {
            vec![]
        } else {
            new_parts(b, split, n, cfg.states)?
        };
        let master = if whole && !host && b.needs_master() && cfg.master == MasterPrecision::F32 {
            Some(b.master_new(params, n).map_err(|e| {
                e.while_allocating(|| format!("the fp32 master weights of {n} parameters"))
            })?)
        } else {
            None
        };
        let groups = groups
            .iter()
            .map(|g| {
                let s = GroupSettings {
                    precision: cfg.states,
                    placement,
                    ..GroupSettings::default()
                };
                (g.clone(), s)
            })
            .collect();
        let mut opt = Optimizer {
            cfg,
            states,
            master,
            step: 0,
            groups,
            host: None,
            replicas: 1,
            shards: None,
        };
        if host {
            let stage = opt
                .groups
                .iter()
                .flat_map(|(g, _)| g.ranges())
                .map(|(r, _)| r.len())
                .max()
                .unwrap_or(0)
                .max(1);
            opt.host = Some(Box::new(HostOptimizer::new(
                b,
                params,
                (split, n),
                cfg.states,
                stage,
            )?));
            opt.check_group_blocks()?;
        }
        if whole {
            opt.check_blocks()?;
        }
        Ok(opt)
    }

    /// Where the optimizer state lives.
    pub fn placement(&self) -> Placement {
        match self.host {
            Some(_) => Placement::Host,
            None => Placement::Device,
        }
    }

    /// The moments: each part's offset in the flat buffer and its state, in buffer order (a
    /// checkpoint stores them one after the other).
    pub fn states(&self) -> &[(usize, AdamWState<B>)] {
        &self.states
    }

    /// The moments, to restore them (see [`Optimizer::states`]).
    pub fn states_mut(&mut self) -> &mut [(usize, AdamWState<B>)] {
        &mut self.states
    }

    /// The part holding `range` and the range relative to it.
    fn part(&self, range: &Range<usize>) -> Result<(usize, Range<usize>)> {
        match &self.host {
            Some(h) => h.part(range),
            None => part_of(&self.states, range),
        }
    }

    /// In 8-bit states, that every run of the update starts on a block boundary of its part.
    fn check_blocks(&self) -> Result<()> {
        // A sharded state checks its pieces when it cuts them.
        if self.cfg.states != StatePrecision::Block8 || self.shards.is_some() {
            return Ok(());
        }
        let block = nopad_backend::codes::QUANT_BLOCK;
        let owners: Vec<usize> = self.groups.iter().map(|(_, s)| s.owner).collect();
        for rank in owners {
            for (r, _) in self.runs(Some(rank), true) {
                let (_, rel) = self.part(&r)?;
                if !rel.start.is_multiple_of(block) {
                    return Err(TrainError::Config(format!(
                        "--optim-states 8bit: the update's range {r:?} does not start on a \
                         block of {block} parameters (a frozen group splits a block); freeze \
                         other groups or use --optim-states bf16"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The parameter groups and their settings, in [`nopad_model::Layout::groups`] order.
    pub fn groups(&self) -> impl Iterator<Item = (&ParamGroup, &GroupSettings)> {
        self.groups.iter().map(|(g, s)| (g, s))
    }

    /// Replaces the settings of the group of `kind`.
    pub fn set_group(&mut self, kind: GroupKind, settings: GroupSettings) -> Result<()> {
        if settings.placement != self.placement() {
            return Err(TrainError::Config(format!(
                "parameter group `{kind}`: state on the {:?}, but the optimizer keeps one \
                 placement for the whole model ({:?}; --offload optimizer chooses the host)",
                settings.placement,
                self.placement()
            )));
        }
        if settings.precision != self.cfg.states {
            return Err(TrainError::Config(format!(
                "parameter group `{kind}`: moments in {}, but the optimizer keeps one precision \
                 for the whole model ({})",
                states_name(settings.precision),
                states_name(self.cfg.states)
            )));
        }
        let Some(i) = self.groups.iter().position(|(g, _)| g.kind == kind) else {
            return Err(TrainError::Config(format!(
                "the model has no parameter group `{kind}`"
            )));
        };
        let old = std::mem::replace(&mut self.groups[i].1, settings);
        if let Err(e) = self.check_blocks() {
            self.groups[i].1 = old;
            return Err(e);
        }
        Ok(())
    }

    /// Maximal runs of adjacent ranges of the trainable groups that `rank` owns (every
    /// trainable group for None), in buffer order, with their weight decay; ranges with a
    /// different decay stay apart when `split_decay`. On the default layout: `0..decay_end` and
    /// `decay_end..total`, the two ranges of one flat AdamW.
    fn runs(&self, rank: Option<usize>, split_decay: bool) -> Vec<(Range<usize>, bool)> {
        let mut all: Vec<(Range<usize>, bool)> = self
            .groups
            .iter()
            .filter(|(_, s)| s.trainable && rank.is_none_or(|r| s.owner == r))
            .flat_map(|(g, _)| g.ranges())
            .collect();
        all.sort_by_key(|(r, _)| r.start);
        let mut runs: Vec<(Range<usize>, bool)> = Vec::with_capacity(2);
        for (r, decay) in all {
            match runs.last_mut() {
                Some((last, d)) if last.end == r.start && (*d == decay || !split_decay) => {
                    last.end = r.end
                }
                _ => runs.push((r, decay)),
            }
        }
        runs
    }

    /// The rank whose groups this rank updates: None (all of them) when every rank holds the
    /// whole state (stage 0 over several ranks).
    fn updater(&self, coll: &dyn Collective<B>) -> Option<usize> {
        (self.replicas == 1).then(|| coll.rank())
    }

    /// The global L2 norm of the accumulated gradients of the trainable groups, over all ranks
    /// (unsharded: with several ranks, each already holds the all-reduced gradients).
    pub fn grad_norm(&self, b: &B, coll: &dyn Collective<B>, model: &mut Model<B>) -> Result<f64> {
        let g = model.grads(b)?;
        let mut sq = [0.0f64];
        for (r, _) in self.runs(self.updater(coll), false) {
            let n = r.len();
            sq[0] += b.sum_squares(b.view(g, r), n)?;
        }
        if self.replicas == 1 {
            coll.all_reduce_host(&mut sq)?;
        }
        Ok(sq[0].sqrt())
    }

    /// Starts an update of gradient norm `norm`: the next step number and the factor that
    /// clips the gradient to [`AdamWConfig::max_grad_norm`]; None (nothing changes) when the
    /// norm is not finite.
    fn start_update(&mut self, norm: f64) -> Option<f32> {
        if !norm.is_finite() {
            return None;
        }
        self.begin_step();
        Some(match self.cfg.max_grad_norm {
            Some(max) if norm > max as f64 => (max as f64 / (norm + 1e-6)) as f32,
            _ => 1.0,
        })
    }

    /// The group at `index` ([`nopad_model::GroupGrads::index`]) and its settings.
    fn group_at(&self, index: usize) -> Result<&(ParamGroup, GroupSettings)> {
        self.groups.get(index).ok_or_else(|| {
            TrainError::Config(format!(
                "parameter group {index} is not one of the model's {}",
                self.groups.len()
            ))
        })
    }

    /// Applies one update with learning rate `lr` (clipping by the global norm) to every
    /// trainable group this rank owns, unless the gradient norm is not finite, in which case
    /// nothing changes. Gradients are left as they are; the caller zeroes them.
    ///
    /// The groups' ranges are updated in one AdamW launch per run of adjacent ranges with the
    /// same decay (two on the default layout, the launches of a flat update); AdamW is element
    /// by element, so this is bit for bit [`Optimizer::update_group`] on each group.
    pub fn update(
        &mut self,
        b: &B,
        coll: &dyn Collective<B>,
        model: &mut Model<B>,
        lr: f64,
    ) -> Result<UpdateInfo> {
        if self.shards.is_some() {
            return self.update_sharded(b, coll, (model, lr));
        }
        let norm = self.grad_norm(b, coll, model)?;
        let Some(clip) = self.start_update(norm) else {
            return Ok(UpdateInfo::skipped(norm));
        };
        // Offloaded, the ranges go through the host one group's range at a time (the staging
        // slots hold one); on the device, one launch per run.
        let updater = self.updater(coll);
        let ranges = match self.host {
            Some(_) => self
                .groups
                .iter()
                .filter(|(_, s)| s.trainable && updater.is_none_or(|r| s.owner == r))
                .flat_map(|(g, _)| g.ranges())
                .collect(),
            None => self.runs(updater, true),
        };
        let (params, grads) = model.params_and_grads(b)?;
        for (range, decay) in ranges {
            let at = (&mut *params, range.start);
            self.adamw(b, at, grads, range.clone(), range, decay, lr, clip)?;
        }
        self.finish_group_updates(b, params)?;
        Ok(UpdateInfo::applied(norm))
    }

    /// Starts an optimizer step: the step number every [`Optimizer::update_group`] of this step
    /// uses ([`Optimizer::update`] calls it itself).
    pub fn begin_step(&mut self) {
        self.step += 1;
    }

    /// AdamW on one range of the flat buffers, its parameters at `params.1` of `params.0` (the
    /// range's own start, except for the pieces of a sharded model) and its gradient at
    /// `grad_at` of `grads`.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &mut self,
        b: &B,
        (params, param_at): (&mut B::Buf, usize),
        grads: &B::Buf,
        range: Range<usize>,
        grad_at: Range<usize>,
        decay: bool,
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let hp = AdamW {
            lr: lr as f32,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: if decay { self.cfg.weight_decay } else { 0.0 },
            step: self.step,
            grad_scale,
        };
        let n = range.len();
        // fp32 moments rounded to nearest take the backend's plain AdamW, bit for bit.
        let rounding = match self.cfg.master {
            MasterPrecision::F32 => ParamRounding::Nearest,
            MasterPrecision::None => ParamRounding::Stochastic {
                seed: self.cfg.rounding_seed,
                first_index: range.start as u64,
            },
        };
        if let Some(h) = &mut self.host {
            if param_at != range.start {
                return Err(TrainError::Config(
                    "an offloaded optimizer updates whole parameter buffers".into(),
                ));
            }
            let u = Update {
                range,
                hp,
                rounding,
            };
            return h.push(b, (params, grads), grad_at, u);
        }
        let (i, rel) = self.part(&range)?;
        let (m, v) = self.states[i].1.views(b, rel)?;
        let master = match (&mut self.master, &mut self.shards) {
            (Some(m), _) => Some(b.view_mut(m, range.clone())),
            (None, Some(sh)) => sh.master_view(b, &range),
            (None, None) => None,
        };
        b.adamw_states(AdamWStates {
            param: b.view_mut(params, param_at..param_at + n),
            master,
            grad: b.view(grads, grad_at),
            m,
            v,
            n,
            hp,
            rounding,
        })?;
        Ok(())
    }
}
