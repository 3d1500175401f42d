//! Updating group by group, as [`nopad_model::Model::backward_with`] hands the groups over
//! (`--optim-in-backward`): one group's update, its gradient's squares for the norm, the end of
//! a step's group updates, and the 8-bit block check this needs.

use nopad_backend::{Backend, StatePrecision};
use nopad_model::GroupGrads;

use super::Optimizer;
use crate::error::{Result, TrainError};

impl<B: Backend> Optimizer<B> {
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

    /// Updates one group (a frozen one stays as it is) with learning rate `lr`, its gradients
    /// multiplied by `grad_scale` (the clipping factor, 1 without clipping), as step
    /// [`Optimizer::step`] (call [`Optimizer::begin_step`] first). Takes what
    /// [`nopad_model::Model::backward_with`] hands its hook, so it can run as soon as the
    /// group's gradient is complete. Clipping by the global norm needs every gradient first, so an update in the
    /// backward runs without it.
    pub fn update_group(
        &mut self,
        b: &B,
        g: GroupGrads<'_, B>,
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        let (group, settings) = self.group_at(g.index)?;
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
            let params = (&mut *g.params, range.start);
            self.adamw(b, params, g.grads, range, at, decay, lr, grad_scale)?;
        }
        Ok(())
    }

    /// The sum of squares of one group's gradient as [`nopad_model::Model::backward_with`]
    /// hands it over (zero for a frozen group, which takes no part in the norm). Reading it
    /// waits for the device: the price of checking each group before its update in the backward.
    pub fn group_grad_squares(&self, b: &B, g: &GroupGrads<'_, B>) -> Result<f64> {
        if !self.group_at(g.index)?.1.trainable {
            return Ok(0.0);
        }
        let mut sq = 0.0;
        for (r, _) in g.group.ranges() {
            let at = g.grad_range(&r);
            sq += b.sum_squares(b.view(g.grads, at), r.len())?;
        }
        Ok(sq)
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
