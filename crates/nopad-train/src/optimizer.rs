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
use nopad_model::{GroupGrads, GroupKind, Model, ParamGroup};

use crate::collective::Collective;
use crate::error::{Result, TrainError};
use crate::offload::{HostOptimizer, Update};

mod state_io;
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

/// The flag value of a state precision: `f32`, `bf16` or `8bit`.
pub fn states_name(p: StatePrecision) -> &'static str {
    match p {
        StatePrecision::F32 => "f32",
        StatePrecision::Bf16 => "bf16",
        StatePrecision::Block8 => "8bit",
    }
}

/// The state precision a flag value names ([`states_name`]'s inverse).
pub fn parse_states(s: &str) -> Option<StatePrecision> {
    [
        StatePrecision::F32,
        StatePrecision::Bf16,
        StatePrecision::Block8,
    ]
    .into_iter()
    .find(|&p| states_name(p) == s)
}

/// The flag value of a master-weights mode: `f32` or `none`.
pub fn master_name(p: MasterPrecision) -> &'static str {
    match p {
        MasterPrecision::F32 => "f32",
        MasterPrecision::None => "none",
    }
}

/// The master-weights mode a flag value names ([`master_name`]'s inverse).
pub fn parse_master(s: &str) -> Option<MasterPrecision> {
    [MasterPrecision::F32, MasterPrecision::None]
        .into_iter()
        .find(|&p| master_name(p) == s)
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

/// The placement `--offload` names: `optimizer` puts the optimizer's state on the host.
pub fn parse_offload(s: &str) -> Result<Placement> {
    match s {
        "optimizer" => Ok(Placement::Host),
        _ => Err(TrainError::Config(format!(
            "`offload`: {s} is not `optimizer` (the only part that can be offloaded: the fp32 \
             weights and AdamW's moments)"
        ))),
    }
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
            placement,
        )
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
        Self::over_in(b, params, decay_end, groups, cfg, Placement::Device)
    }

    /// [`Optimizer::over`] with the state in `placement`.
    fn over_in(
        b: &B,
        params: &B::Buf,
        decay_end: usize,
        groups: &[ParamGroup],
        cfg: AdamWConfig,
        placement: Placement,
    ) -> Result<Self> {
        let n: usize = groups.iter().map(ParamGroup::len).sum();
        let split = decay_end;
        let host = placement == Placement::Host;
        let states = if host {
            vec![]
        } else {
            new_parts(b, split, n, cfg.states)?
        };
        let master = if !host && b.needs_master() && cfg.master == MasterPrecision::F32 {
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
        opt.check_blocks()?;
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
        if self.cfg.states != StatePrecision::Block8 {
            return Ok(());
        }
        let block = nopad_backend::codes::QUANT_BLOCK;
        let owners: Vec<usize> = self.groups.iter().map(|(_, s)| s.owner).collect();
        for rank in owners {
            for (r, _) in self.runs(rank, true) {
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

    /// In 8-bit states, that every range of every trainable group starts on a block boundary
    /// of its part, as updating group by group ([`Optimizer::update_group`], the optimizer in
    /// the backward) needs: a block split between two updates would be quantised twice from
    /// halves. Holds on Llama shapes (hidden sizes are multiples of 256).
    pub fn check_group_blocks(&self) -> Result<()> {
        if self.cfg.states != StatePrecision::Block8 {
            return Ok(());
        }
        let block = nopad_backend::codes::QUANT_BLOCK;
        for (g, s) in &self.groups {
            for (r, _) in g.ranges().filter(|_| s.trainable) {
                let (_, rel) = self.part(&r)?;
                if !rel.start.is_multiple_of(block) {
                    return Err(TrainError::Config(format!(
                        "--optim-states 8bit updated group by group: parameter group `{}` has a range {r:?} that does not start on a block of {block} parameters (the model's hidden size is not a multiple of {block}); use --optim-states bf16 or turn the update in the backward off",
                        g.kind
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

    /// Maximal runs of adjacent ranges of the trainable groups that `rank` owns, in buffer
    /// order, with their weight decay; ranges with a different decay stay apart when
    /// `split_decay`. On the default layout: `0..decay_end` and `decay_end..total`, the two
    /// ranges of one flat AdamW.
    fn runs(&self, rank: usize, split_decay: bool) -> Vec<(Range<usize>, bool)> {
        let mut all: Vec<(Range<usize>, bool)> = self
            .groups
            .iter()
            .filter(|(_, s)| s.trainable && s.owner == rank)
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

    /// The global L2 norm of the accumulated gradients of the trainable groups, over all ranks.
    pub fn grad_norm(&self, b: &B, coll: &dyn Collective<B>, model: &mut Model<B>) -> Result<f64> {
        let g = model.grads(b)?;
        let mut sq = [0.0f64];
        for (r, _) in self.runs(coll.rank(), false) {
            let n = r.len();
            sq[0] += b.sum_squares(b.view(g, r), n)?;
        }
        coll.all_reduce_host(&mut sq)?;
        Ok(sq[0].sqrt())
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
        let norm = self.grad_norm(b, coll, model)?;
        if !norm.is_finite() {
            return Ok(UpdateInfo {
                grad_norm: norm,
                applied: false,
            });
        }
        let clip = match self.cfg.max_grad_norm {
            Some(max) if norm > max as f64 => (max as f64 / (norm + 1e-6)) as f32,
            _ => 1.0,
        };
        self.begin_step();
        // Offloaded, the ranges go through the host one group's range at a time (the staging
        // slots hold one); on the device, one launch per run.
        let ranges = match self.host {
            Some(_) => self
                .groups
                .iter()
                .filter(|(_, s)| s.trainable && s.owner == coll.rank())
                .flat_map(|(g, _)| g.ranges())
                .collect(),
            None => self.runs(coll.rank(), true),
        };
        let (params, grads) = model.params_and_grads(b)?;
        for (range, decay) in ranges {
            self.adamw(b, params, grads, range.clone(), range, decay, lr, clip)?;
        }
        self.finish_group_updates(b, params)?;
        Ok(UpdateInfo {
            grad_norm: norm,
            applied: true,
        })
    }

    /// Starts an optimizer step: the step number every [`Optimizer::update_group`] of this step
    /// uses ([`Optimizer::update`] calls it itself).
    pub fn begin_step(&mut self) {
        self.step += 1;
    }

    /// Updates one group (a frozen one stays as it is) with learning rate `lr`, its gradients
    /// multiplied by `grad_scale` (the clipping factor, 1 without clipping), as step
    /// [`Optimizer::step`] (call [`Optimizer::begin_step`] first). Takes what
    /// [`Model::backward_with`] hands its hook, so it can run as soon as the group's gradient is
    /// complete. Clipping by the global norm needs every gradient first, so an update in the
    /// backward runs without it.
    pub fn update_group(
        &mut self,
        b: &B,
        g: GroupGrads<'_, B>,
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        let Some((group, settings)) = self.groups.get(g.index) else {
            return Err(TrainError::Config(format!(
                "parameter group {} is not one of the model's {}",
                g.index,
                self.groups.len()
            )));
        };
        if group.kind != g.group.kind {
            return Err(TrainError::Config(format!(
                "parameter group {}: the optimizer was built for another layout",
                g.group.kind
            )));
        }
        if !settings.trainable {
            return Ok(());
        }
        if self.step == 0 {
            return Err(TrainError::Config(
                "update_group before begin_step: AdamW's step numbers start at 1".into(),
            ));
        }
        let ranges: Vec<_> = group.ranges().collect();
        for (range, decay) in ranges {
            let at = g.grad_range(&range);
            self.adamw(b, g.params, g.grads, range, at, decay, lr, grad_scale)?;
        }
        Ok(())
    }

    /// The sum of squares of one group's gradient as [`Model::backward_with`] hands it over
    /// (zero for a frozen group, which takes no part in the norm). Reading it waits for the
    /// device: the price of checking each group before its update in the backward.
    pub fn group_grad_squares(&self, b: &B, g: &GroupGrads<'_, B>) -> Result<f64> {
        match self.groups.get(g.index) {
            Some((_, s)) if !s.trainable => return Ok(0.0),
            Some(_) => {}
            None => {
                return Err(TrainError::Config(format!(
                    "parameter group {} is not one of the model's {}",
                    g.index,
                    self.groups.len()
                )))
            }
        }
        let mut sq = 0.0;
        for (r, _) in g.group.ranges() {
            let at = g.grad_range(&r);
            sq += b.sum_squares(b.view(g.grads, at), r.len())?;
        }
        Ok(sq)
    }

    /// AdamW on one range of the flat buffers, its gradient at `grad_at` of `grads`.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &mut self,
        b: &B,
        params: &mut B::Buf,
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
            let u = Update {
                range,
                hp,
                rounding,
            };
            return h.push(b, (params, grads), grad_at, u);
        }
        let (i, rel) = self.part(&range)?;
        let (m, v) = self.states[i].1.views(b, rel)?;
        b.adamw_states(AdamWStates {
            param: b.view_mut(params, range.clone()),
            master: self.master.as_mut().map(|m| b.view_mut(m, range.clone())),
            grad: b.view(grads, grad_at),
            m,
            v,
            n,
            hp,
            rounding,
        })?;
        Ok(())
    }

    /// Ends the group updates of a step: an offloaded optimizer runs its last host update and
    /// makes the device wait for the new weights before the next forward (a no-op on the
    /// device). [`Optimizer::update`] calls it; a step that calls
    /// [`Optimizer::update_group`] itself must call it after the backward.
    pub fn finish_group_updates(&mut self, b: &B, params: &mut B::Buf) -> Result<()> {
        match &mut self.host {
            Some(h) => h.finish(b, params),
            None => Ok(()),
        }
    }
}
