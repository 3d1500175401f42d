//! The optimizer's state as checkpoints and restores see it, wherever it lives (device or,
//! offloaded, host): the weights to save and restore, and the moments part by part in their
//! own precision; and the moments' split into parts at the weight-decay boundary, which both
//! placements share.

use std::ops::Range;

use nopad_backend::{AdamWState, Backend, Device, Moment, StateData, StatePrecision};
use nopad_model::Model;

use super::Optimizer;
use crate::error::{Result, TrainError};

/// Zero moments for `[0, n)` in `precision`, as two parts split at `split` (the weight-decay
/// part, then the rest; empty parts left out).
pub(crate) fn new_parts<D: Device>(
    d: &D,
    split: usize,
    n: usize,
    precision: StatePrecision,
) -> Result<Vec<(usize, AdamWState<D>)>> {
    [0..split, split..n]
        .into_iter()
        .filter(|r| !r.is_empty())
        .map(|r| {
            let state = AdamWState::new(d, r.len(), precision)
                .map_err(|e| e.while_allocating(|| format!("AdamW's moments of {n} parameters")))?;
            Ok((r.start, state))
        })
        .collect()
}

/// The part of `states` holding `range` and the range relative to it.
pub(crate) fn part_of<D: Device>(
    states: &[(usize, AdamWState<D>)],
    range: &Range<usize>,
) -> Result<(usize, Range<usize>)> {
    states
        .iter()
        .position(|(off, s)| *off <= range.start && range.end <= off + s.len())
        .map(|i| {
            let off = states[i].0;
            (i, range.start - off..range.end - off)
        })
        .ok_or_else(|| {
            TrainError::Config(format!(
                "AdamW range {range:?} crosses the boundary between weight decay and none"
            ))
        })
}

impl<B: Backend> Optimizer<B> {
    /// `range` of the weights to save: the fp32 master weights when there are some (on the
    /// host when offloaded; gathered when sharded, [`Optimizer::gather_state`]), else the
    /// parameters.
    pub fn read_weights(
        &self,
        b: &B,
        model: &Model<B>,
        range: std::ops::Range<usize>,
    ) -> nopad_backend::Result<Vec<f32>> {
        if let Some(sh) = &self.shards {
            return sh.read_weights(b, model.trainable(), range);
        }
        match (&self.host, &self.master) {
            (Some(h), _) => h.read_weights(range),
            (None, Some(m)) => b.master_read(model.trainable(), m, range),
            (None, None) => b.read(model.trainable(), range),
        }
    }

    /// Sets the weights from `offset` on to `vals` (a restore): the master copy where there is
    /// one (on the host when offloaded; this rank's pieces when sharded) and the parameters
    /// rounded from it.
    pub fn write_weights(
        &mut self,
        b: &B,
        params: &mut B::Buf,
        offset: usize,
        vals: &[f32],
    ) -> nopad_backend::Result<()> {
        if let Some(sh) = &mut self.shards {
            return sh.write_weights(b, params, (offset, vals));
        }
        match (&mut self.host, &mut self.master) {
            (Some(h), _) => h.write_weights(b, (params, offset), vals),
            (None, Some(m)) => b.master_write(params, m, offset, vals),
            (None, None) => b.write(params, offset, vals),
        }
    }

    /// The lengths of the moments' parts in buffer order (the weight-decay part, then the
    /// rest), wherever they live and however they are sharded: what a checkpoint stores one
    /// after the other. A sharded state answers for the whole, read after
    /// [`Optimizer::gather_state`] and written piece by piece.
    pub fn state_lens(&self) -> Vec<usize> {
        if let Some(sh) = &self.shards {
            return sh.state_lens();
        }
        match &self.host {
            Some(h) => h.state_lens(),
            None => self.states.iter().map(|(_, s)| s.len()).collect(),
        }
    }

    /// One moment's `range` of part `part` ([`Optimizer::state_lens`]) in its own precision.
    pub fn read_state(
        &self,
        b: &B,
        part: usize,
        which: Moment,
        range: Range<usize>,
    ) -> Result<StateData> {
        if let Some(sh) = &self.shards {
            return sh.read_state((part, which), range);
        }
        match &self.host {
            Some(h) => h.read_state(part, which, range),
            None => Ok(self.part_state(part)?.read(b, which, range)?),
        }
    }

    /// Sets one moment of part `part` from `offset` on to `data` (in the states' precision).
    pub fn write_state(
        &mut self,
        b: &B,
        part: usize,
        which: Moment,
        offset: usize,
        data: &StateData,
    ) -> Result<()> {
        if let Some(sh) = &self.shards {
            return sh.write_state(b, &mut self.states, (part, which), offset, data);
        }
        match &mut self.host {
            Some(h) => h.write_state(part, which, offset, data),
            None => {
                self.part_state(part)?;
                Ok(self.states[part].1.write(b, which, offset, data)?)
            }
        }
    }

    /// The device state of part `part`, or an error naming the parts there are.
    fn part_state(&self, part: usize) -> Result<&AdamWState<B>> {
        self.states.get(part).map(|(_, s)| s).ok_or_else(|| {
            TrainError::Config(format!(
                "optimizer state part {part} of {}",
                self.states.len()
            ))
        })
    }
}
