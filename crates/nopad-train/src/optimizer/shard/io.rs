//! The state I/O of a sharded optimizer: checkpoints read and write the state of one rank,
//! whatever the number of ranks. A save gathers the pieces onto rank 0's host first
//! ([`Optimizer::gather_state`], the pieces exchanged as host numbers one at a time); a restore
//! has every rank read the whole state and keep its pieces. A piece's master copy lives in a
//! buffer of its own, which the backend's master functions (made for a buffer's prefix) reach
//! through a scratch of the piece's parameters. In stage 3 the weights are pieces too: a save
//! gathers them like the master copy, a restore writes each rank's pieces of the model.

use std::ops::Range;

use nopad_backend::codes::QUANT_BLOCK;
use nopad_backend::cpu::Cpu;
use nopad_backend::{AdamWState, Backend, BackendError, Kind, Moment, StateData, StatePrecision};
use nopad_model::Model;

use super::{params_of, ShardStage, Shards};
use crate::collective::{aligned_shard, Collective};
use crate::error::{Result, TrainError};
use crate::optimizer::{new_parts, part_of, Optimizer};

/// The whole state on the host, as one rank would hold it.
pub(super) struct Gathered {
    cpu: Cpu<f32>,
    /// The fp32 master weights (None: the parameters are the weights).
    weights: Option<Vec<f32>>,
    parts: Vec<(usize, AdamWState<Cpu<f32>>)>,
}

/// Values of one piece of one moment when exchanged as host numbers.
fn encoded_len(p: StatePrecision, n: usize) -> usize {
    match p {
        StatePrecision::Block8 => n + n.div_ceil(QUANT_BLOCK),
        _ => n,
    }
}

/// A moment's data as host numbers (all exact in f64): values, bf16 bits, or codes then scales.
fn encode(d: &StateData, out: &mut [f64]) {
    let vals: Vec<f64> = match d {
        StateData::F32(x) => x.iter().map(|&v| v as f64).collect(),
        StateData::Bf16(x) => x.iter().map(|&v| v as f64).collect(),
        StateData::Block8 { codes, scales } => codes
            .iter()
            .map(|&c| c as f64)
            .chain(scales.iter().map(|&s| s as f64))
            .collect(),
    };
    out.copy_from_slice(&vals);
}

/// [`encode`]'s inverse for `n` values in precision `p`.
fn decode(v: &[f64], p: StatePrecision, n: usize) -> StateData {
    match p {
        StatePrecision::F32 => StateData::F32(v.iter().map(|&x| x as f32).collect()),
        StatePrecision::Bf16 => StateData::Bf16(v.iter().map(|&x| x as u16).collect()),
        StatePrecision::Block8 => StateData::Block8 {
            codes: v[..n].iter().map(|&x| x as u8).collect(),
            scales: v[n..].iter().map(|&x| x as f32).collect(),
        },
    }
}

/// `data`'s values `range` (relative; whole blocks in Block8).
fn slice(data: &StateData, r: Range<usize>) -> StateData {
    match data {
        StateData::F32(x) => StateData::F32(x[r].to_vec()),
        StateData::Bf16(x) => StateData::Bf16(x[r].to_vec()),
        StateData::Block8 { codes, scales } => StateData::Block8 {
            codes: codes[r.clone()].to_vec(),
            scales: scales[r.start / QUANT_BLOCK..r.end.div_ceil(QUANT_BLOCK)].to_vec(),
        },
    }
}

/// Copies `src[from]` into `dst` at `to` through the host (exact for every Compute type of a
/// backend that keeps a master copy: bf16 and f32 values are f32 values).
fn copy_through_host<B: Backend>(
    b: &B,
    src: &B::Buf,
    from: Range<usize>,
    dst: &mut B::Buf,
    to: usize,
) -> nopad_backend::Result<()> {
    const CHUNK: usize = 1 << 24;
    let mut at = from.start;
    while at < from.end {
        let end = (at + CHUNK).min(from.end);
        let vals = b.read(src, at..end)?;
        b.write(dst, to + (at - from.start), &vals)?;
        at = end;
    }
    Ok(())
}

/// A master copy of `params[own]` in a buffer of its own. A backend makes the master of a
/// buffer's prefix ([`nopad_backend::OptimizerOps::master_new`]), so the piece's parameters go
/// through a scratch of its length.
pub(crate) fn piece_master_new<B: Backend>(
    b: &B,
    params: &B::Buf,
    own: Range<usize>,
) -> nopad_backend::Result<B::Buf> {
    let n = own.len();
    let mut tmp = b.alloc(n, Kind::Compute)?;
    copy_through_host(b, params, own, &mut tmp, 0)?;
    b.master_new(&tmp, n)
}

/// The master weights `range` of the piece at `own` (its master `master`), whose parameters
/// lie in `params` from `at` on.
pub(crate) fn piece_master_read<B: Backend>(
    b: &B,
    (params, at): (&B::Buf, usize),
    (master, own): (&B::Buf, &Range<usize>),
    range: Range<usize>,
) -> nopad_backend::Result<Vec<f32>> {
    let rel = range.start - own.start..range.end - own.start;
    let mut tmp = b.alloc(own.len(), Kind::Compute)?;
    copy_through_host(b, params, at + rel.start..at + rel.end, &mut tmp, rel.start)?;
    b.master_read(&tmp, master, rel)
}

/// Sets the master weights of the piece at `own` from `offset` on to `vals` and the
/// parameters (in `params` from `at` on) to their rounding.
pub(crate) fn piece_master_write<B: Backend>(
    b: &B,
    (params, at): (&mut B::Buf, usize),
    (master, own): (&mut B::Buf, &Range<usize>),
    offset: usize,
    vals: &[f32],
) -> nopad_backend::Result<()> {
    let rel = offset - own.start..offset - own.start + vals.len();
    let mut tmp = b.alloc(own.len(), Kind::Compute)?;
    b.master_write(&mut tmp, master, rel.start, vals)?;
    copy_through_host(b, &tmp, rel.clone(), params, at + rel.start)
}

impl<B: Backend> Optimizer<B> {
    /// Collects a sharded state onto rank 0's host so that the next checkpoint (or final
    /// weights) reads what one rank would hold; every rank must call it, in the same order. A
    /// no-op unsharded. [`Optimizer::drop_gathered`] frees it after the save.
    pub fn gather_state(
        &mut self,
        b: &B,
        coll: &dyn Collective<B>,
        model: &Model<B>,
    ) -> Result<()> {
        let Some(sh) = self.shards.as_ref() else {
            return Ok(());
        };
        let precision = self.cfg.states;
        let rank0 = coll.rank() == 0;
        let cpu = Cpu::<f32>::new();
        let mut parts = match rank0 {
            true => new_parts(&cpu, sh.split, sh.total, precision)?,
            false => vec![],
        };
        // Stage 3 gathers the weights even without a master copy: no rank holds them whole.
        let stage3 = sh.stage == ShardStage::Params;
        let with_weights = !sh.masters.is_empty() || stage3;
        let mut weights = (rank0 && with_weights).then(|| vec![0.0f32; sh.total]);
        for p in &sh.pieces {
            for r in 0..sh.world {
                let rel = aligned_shard(r, sh.world, p.range.len(), sh.align);
                let piece = p.range.start + rel.start..p.range.start + rel.end;
                let n = piece.len();
                if n == 0 {
                    continue;
                }
                let mine = r == sh.rank;
                for which in [Moment::First, Moment::Second] {
                    let mut v = vec![0.0f64; encoded_len(precision, n)];
                    if mine {
                        let (i, rel) = part_of(&self.states, &piece)?;
                        encode(&self.states[i].1.read(b, which, rel)?, &mut v);
                    }
                    coll.all_reduce_host(&mut v)?;
                    if rank0 {
                        let (i, rel) = part_of(&parts, &piece)?;
                        parts[i]
                            .1
                            .write(&cpu, which, rel.start, &decode(&v, precision, n))?;
                    }
                }
                if !with_weights {
                    continue;
                }
                let mut v = vec![0.0f64; n];
                if mine {
                    let params = (model.trainable(), params_of(sh.stage, p).start);
                    let m = sh.masters.iter().find(|(off, _)| *off == piece.start);
                    let vals = match (m, sh.masters.is_empty()) {
                        (Some((_, m)), _) => {
                            piece_master_read(b, params, (m, &piece), piece.clone())?
                        }
                        (None, true) => b.read(params.0, params_of(sh.stage, p))?,
                        (None, false) => {
                            return Err(TrainError::Config(format!(
                                "no master copy of the shard {piece:?}"
                            )))
                        }
                    };
                    v.iter_mut().zip(vals).for_each(|(x, y)| *x = y as f64);
                }
                coll.all_reduce_host(&mut v)?;
                if let Some(w) = weights.as_mut() {
                    w[piece]
                        .iter_mut()
                        .zip(&v)
                        .for_each(|(x, &y)| *x = y as f32);
                }
            }
        }
        if let (true, Some(sh)) = (rank0, self.shards.as_mut()) {
            sh.gathered = Some(Gathered {
                cpu,
                weights,
                parts,
            });
        }
        Ok(())
    }

    /// Frees what [`Optimizer::gather_state`] collected.
    pub fn drop_gathered(&mut self) {
        if let Some(sh) = self.shards.as_mut() {
            sh.gathered = None;
        }
    }
}

/// The state I/O of a sharded optimizer (see `state_io`, which dispatches here).
impl<B: Backend> Shards<B> {
    /// `range` of the weights: the gathered master weights, or the parameters (whole on every
    /// rank below stage 3) when no master copy is kept; in stage 3 always the gathered ones.
    pub(crate) fn read_weights(
        &self,
        b: &B,
        params: &B::Buf,
        range: Range<usize>,
    ) -> nopad_backend::Result<Vec<f32>> {
        match (&self.gathered, self.masters.is_empty()) {
            (
                Some(Gathered {
                    weights: Some(w), ..
                }),
                _,
            ) => Ok(w[range].to_vec()),
            (_, true) if self.stage != ShardStage::Params => b.read(params, range),
            _ => Err(BackendError::Unsupported(
                "the weights (or their fp32 master copy) are sharded: Optimizer::gather_state first"
                    .into(),
            )),
        }
    }

    /// Sets the weights from `offset` on: the parameters (in stage 3 this rank's pieces of
    /// them), and this rank's master pieces.
    pub(crate) fn write_weights(
        &mut self,
        b: &B,
        params: &mut B::Buf,
        (offset, vals): (usize, &[f32]),
    ) -> nopad_backend::Result<()> {
        let end = offset + vals.len();
        let overlap = |own: &Range<usize>| (own.start.max(offset), own.end.min(end));
        for p in self
            .pieces
            .iter()
            .filter(|_| self.stage == ShardStage::Params)
        {
            let (lo, hi) = overlap(&p.own);
            if lo < hi {
                let at = params_of(self.stage, p).start + (lo - p.own.start);
                b.write(params, at, &vals[lo - offset..hi - offset])?;
            }
        }
        if self.stage != ShardStage::Params {
            b.write(params, offset, vals)?;
        }
        for (off, m) in &mut self.masters {
            let own = *off..*off + b.buf_len(m);
            let (lo, hi) = overlap(&own);
            if lo < hi {
                let piece = self
                    .pieces
                    .iter()
                    .find(|p| p.own.start == *off && !p.own.is_empty());
                let at = piece.map_or(*off, |p| params_of(self.stage, p).start);
                let to = (&mut *params, at);
                piece_master_write(b, to, (m, &own), lo, &vals[lo - offset..hi - offset])?;
            }
        }
        Ok(())
    }

    /// One moment's `range` of part `part` of the whole state, from the gathered copy.
    pub(crate) fn read_state(
        &self,
        (part, which): (usize, Moment),
        range: Range<usize>,
    ) -> Result<StateData> {
        let Some(g) = &self.gathered else {
            return Err(TrainError::Config(
                "the optimizer state is sharded: Optimizer::gather_state first".into(),
            ));
        };
        Ok(g.parts[part].1.read(&g.cpu, which, range)?)
    }

    /// Writes what falls in this rank's pieces of one moment of part `part` of the whole
    /// state, from `offset` on (a restore: every rank reads the whole state and keeps its own).
    pub(crate) fn write_state(
        &self,
        b: &B,
        states: &mut [(usize, AdamWState<B>)],
        (part, which): (usize, Moment),
        offset: usize,
        data: &StateData,
    ) -> Result<()> {
        let start = self.part_start(part) + offset;
        let end = start + data.len();
        for (off, s) in states.iter_mut() {
            let (lo, hi) = ((*off).max(start), (*off + s.len()).min(end));
            if lo < hi {
                s.write(b, which, lo - *off, &slice(data, lo - start..hi - start))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nopad_backend::{Device, Kind};

    #[test]
    fn state_data_survives_the_host_exchange_and_slices_by_block() {
        let n = 600;
        let all = [
            StateData::F32((0..n).map(|i| i as f32 * -0.37).collect()),
            StateData::Bf16((0..n).map(|i| (i * 97 % 65536) as u16).collect()),
            StateData::Block8 {
                codes: (0..n).map(|i| (i * 13 % 256) as u8).collect(),
                scales: vec![0.5, 1e-7, 3.25],
            },
        ];
        for d in all {
            let p = d.precision();
            let mut v = vec![0.0; encoded_len(p, n)];
            encode(&d, &mut v);
            assert_eq!(decode(&v, p, n), d, "{p:?}");
            let s = slice(&d, 256..600);
            assert_eq!(s.len(), 344);
            if let StateData::Block8 { scales, .. } = s {
                assert_eq!(scales, vec![1e-7, 3.25]);
            }
        }
    }

    #[test]
    fn a_piece_master_copies_its_own_parameters_and_writes_them_back() {
        let b = Cpu::<f32>::new();
        let mut params = b.alloc(10, Kind::Compute).unwrap();
        let vals: Vec<f32> = (0..10).map(|i| i as f32 + 0.5).collect();
        b.write(&mut params, 0, &vals).unwrap();
        let own = 4..9;
        let mut m = piece_master_new(&b, &params, own.clone()).unwrap();
        assert_eq!(b.read(&m, 0..5).unwrap(), vals[4..9]);
        assert_eq!(
            piece_master_read(&b, (&params, 4), (&m, &own), 5..7).unwrap(),
            vals[5..7]
        );
        piece_master_write(&b, (&mut params, 4), (&mut m, &own), 6, &[-1.0, -2.0]).unwrap();
        assert_eq!(b.read(&m, 2..4).unwrap(), [-1.0, -2.0]);
        assert_eq!(b.read(&params, 5..9).unwrap(), [5.5, -1.0, -2.0, 8.5]);
    }
}
