//! The optimizer offloaded to the host (`--offload optimizer`, ZeRO-Offload style): fp32
//! weights and both AdamW moments live in host memory, and each group's update runs on the
//! host's cores with the CPU backend's AdamW (`Cpu<f32>`, the reference the CUDA kernels are
//! checked against), so a model whose optimizer state does not fit on the device still trains.
//!
//! Per range of a group ([`HostOptimizer::push`]): its gradient goes to a pinned staging slot
//! ([`Staging::copy_to_host`]; the compute queue waits for the copy before it overwrites the
//! gradient scratch), and the update of the range pushed *before* it runs on the host, then its
//! new weights go back through the same slot ([`Staging::copy_from_host`], not waited for). In
//! the backward that is a pipeline one group deep: when the hook of layer l-1 runs, the device
//! has the backward of layer l-1 queued, and the host updates layer l meanwhile. Two slots
//! alternate, so a copy down never lands in the slot the host is reading.
//! [`HostOptimizer::finish`] updates the last range and makes the compute queue wait for every
//! copy up, before the next forward reads the weights.
//!
//! The host weights are the fp32 master copy (with `--master-weights none`, the bf16 values the
//! device holds, updated with the same stochastic rounding), and they reach the device rounded
//! as the backend's master copy rounds ([`Staging::host_write`]), so the parameters equal those
//! of the update on the device. The moments are [`AdamWState`]s split as the device ones, and
//! a checkpoint reads and writes them the same way: offload is a placement, not a format.

use std::ops::Range;

use nopad_backend::cpu::Cpu;
use nopad_backend::{
    AdamW, AdamWState, AdamWStates, Backend, BackendError, Kind, Moment, OptimizerOps,
    ParamRounding, StateData, StatePrecision,
};

use crate::error::{Result, TrainError};
use crate::optimizer::{new_parts, part_of};

/// Values per chunk when weights are read from or written to the device outside a step.
const CHUNK: usize = 1 << 24;

/// One staging slot: a range's gradient on its way down, its new weights on their way up.
struct Slot<B: Backend> {
    /// `[S]` Grad.
    grad: B::Host,
    /// `[S]` Compute.
    weights: B::Host,
}

/// One range's update: where, the step's hyper-parameters, how the weights are rounded.
pub(crate) struct Update {
    /// The range of the flat parameter buffer.
    pub(crate) range: Range<usize>,
    /// AdamW's hyper-parameters of this step and range.
    pub(crate) hp: AdamW,
    /// Rounding of the weights (stochastic without a master copy).
    pub(crate) rounding: ParamRounding,
}

/// An update whose gradient is in a slot (or on its way) and which has not run yet.
struct Job {
    slot: usize,
    u: Update,
}

/// The host half of an offloaded optimizer (see the module docs).
pub(crate) struct HostOptimizer<B: Backend> {
    cpu: Cpu<f32>,
    /// `[P]` the weights the updates apply to: fp32 master weights, or bf16 values without a
    /// master copy.
    weights: Vec<f32>,
    /// The moments, split as the device optimizer splits them (offset, state).
    states: Vec<(usize, AdamWState<Cpu<f32>>)>,
    slots: [Slot<B>; 2],
    /// The slot the next gradient goes to.
    next: usize,
    pending: Option<Job>,
    /// `[S]` the pending range's gradient in f32.
    grad: Vec<f32>,
}

impl<B: Backend> HostOptimizer<B> {
    /// Host state for `params[..n]` (weights read from the device, moments zero) with the weight
    /// decay boundary at `split`, and staging slots for ranges of up to `stage` parameters.
    pub(crate) fn new(
        b: &B,
        params: &B::Buf,
        (split, n): (usize, usize),
        precision: StatePrecision,
        stage: usize,
    ) -> Result<Self> {
        let cpu = Cpu::<f32>::new();
        let mut weights = Vec::with_capacity(n);
        for start in (0..n).step_by(CHUNK) {
            weights.extend(b.read(params, start..(start + CHUNK).min(n))?);
        }
        let states = new_parts(&cpu, split, n, precision)?;
        let slot = || -> Result<Slot<B>> {
            let pin = |kind| {
                b.host_alloc(stage, kind).map_err(|e| {
                    e.while_allocating(|| format!("a pinned staging buffer of {stage} parameters"))
                })
            };
            Ok(Slot {
                grad: pin(Kind::Grad)?,
                weights: pin(Kind::Compute)?,
            })
        };
        Ok(HostOptimizer {
            cpu,
            weights,
            states,
            slots: [slot()?, slot()?],
            next: 0,
            pending: None,
            grad: vec![0.0; stage],
        })
    }

    /// Starts update `u` (its gradient at `grad_at` of `grads`) and runs the update pushed
    /// before it.
    pub(crate) fn push(
        &mut self,
        b: &B,
        (params, grads): (&mut B::Buf, &B::Buf),
        grad_at: Range<usize>,
        u: Update,
    ) -> Result<()> {
        if let Some(p) = &self.pending {
            if p.u.hp.step != u.hp.step {
                return Err(TrainError::Config(format!(
                    "an offloaded update of step {} was never finished (Optimizer::finish_group_updates after the backward)",
                    p.u.hp.step
                )));
            }
        }
        let stage = self.grad.len();
        if u.range.len() > stage {
            return Err(TrainError::Config(format!(
                "offloaded update of {:?}: more than the {stage} parameters a staging slot holds",
                u.range
            )));
        }
        let slot = self.next;
        self.next ^= 1;
        b.copy_to_host(b.view(grads, grad_at), &mut self.slots[slot].grad)?;
        if let Some(job) = self.pending.take() {
            self.run(b, params, job)?;
        }
        self.pending = Some(Job { slot, u });
        Ok(())
    }

    /// Runs the last pushed update and makes the compute queue wait for every weight copy.
    pub(crate) fn finish(&mut self, b: &B, params: &mut B::Buf) -> Result<()> {
        if let Some(job) = self.pending.take() {
            self.run(b, params, job)?;
        }
        for s in &self.slots {
            b.host_fence(&s.weights)?;
        }
        Ok(())
    }

    /// One range's update on the host, and its weights' copy up.
    fn run(&mut self, b: &B, params: &mut B::Buf, job: Job) -> Result<()> {
        let Job { slot, u } = job;
        let n = u.range.len();
        let slot = &mut self.slots[slot];
        let grad = &mut self.grad[..n];
        b.host_read(&slot.grad, grad)?;
        let (i, rel) = part_of(&self.states, &u.range)?;
        let (m, v) = self.states[i].1.views(&self.cpu, rel)?;
        let weights = &mut self.weights[u.range.clone()];
        self.cpu.adamw_states(AdamWStates {
            param: weights,
            master: None,
            grad,
            m,
            v,
            n,
            hp: u.hp,
            rounding: u.rounding,
        })?;
        b.host_write(&mut slot.weights, weights)?;
        b.copy_from_host(&mut slot.weights, b.view_mut(params, u.range))?;
        Ok(())
    }

    /// `range` of the weights.
    pub(crate) fn read_weights(&self, range: Range<usize>) -> nopad_backend::Result<Vec<f32>> {
        self.weights
            .get(range.clone())
            .map(<[f32]>::to_vec)
            .ok_or_else(|| BackendError::Shape {
                op: "read_weights",
                what: format!("range {range:?} of {} host weights", self.weights.len()),
            })
    }

    /// Sets the weights from `offset` on to `vals`, and the device parameters to them as an
    /// update would leave them (through the staging slots, so rounded the same way).
    pub(crate) fn write_weights(
        &mut self,
        b: &B,
        (params, offset): (&mut B::Buf, usize),
        vals: &[f32],
    ) -> nopad_backend::Result<()> {
        let end = offset + vals.len();
        let n = self.weights.len();
        let Some(dst) = self.weights.get_mut(offset..end) else {
            return Err(BackendError::Shape {
                op: "write_weights",
                what: format!("range {offset}..{end} of {n} host weights"),
            });
        };
        dst.copy_from_slice(vals);
        let stage = self.grad.len().max(1);
        let slot = &mut self.slots[0].weights;
        for (k, chunk) in vals.chunks(stage).enumerate() {
            let at = offset + k * stage;
            b.host_write(slot, chunk)?;
            b.copy_from_host(slot, b.view_mut(params, at..at + chunk.len()))?;
        }
        b.host_fence(slot)
    }

    /// The part of the moments holding `range` and the range relative to it.
    pub(crate) fn part(&self, range: &Range<usize>) -> Result<(usize, Range<usize>)> {
        part_of(&self.states, range)
    }

    /// Lengths of the moments' parts.
    pub(crate) fn state_lens(&self) -> Vec<usize> {
        self.states.iter().map(|(_, s)| s.len()).collect()
    }

    /// One moment's `range` of part `part`, in its own precision.
    pub(crate) fn read_state(
        &self,
        part: usize,
        which: Moment,
        range: Range<usize>,
    ) -> Result<StateData> {
        Ok(self.states[part].1.read(&self.cpu, which, range)?)
    }

    /// Sets one moment of part `part` from `offset` on.
    pub(crate) fn write_state(
        &mut self,
        part: usize,
        which: Moment,
        offset: usize,
        data: &StateData,
    ) -> Result<()> {
        Ok(self.states[part].1.write(&self.cpu, which, offset, data)?)
    }
}
