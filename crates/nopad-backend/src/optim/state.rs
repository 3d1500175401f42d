//! [`AdamWState`]: the two AdamW moments of `n` parameters in one [`StatePrecision`], owned by
//! the optimizer; views of a range for [`crate::OptimizerOps::adamw_states`], and reads and
//! writes in the states' own precision ([`StateData`]) so that a checkpoint stores them exactly
//! and a resume continues bit for bit.

use std::ops::Range;

use super::codes::{bf16_bits, QUANT_BLOCK};
use super::{MomentMut, StatePrecision};
use crate::error::check;
use crate::{BackendError, Device, Kind, Result};

/// Which of the two moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// m, the gradients' running mean (signed code map in Block8).
    First,
    /// v, the squared gradients' running mean (unsigned code map in Block8).
    Second,
}

/// A range of one moment in its own precision: what a checkpoint stores.
#[derive(Clone, Debug, PartialEq)]
pub enum StateData {
    /// fp32 values (on `Cpu<f64>` the f64 moments rounded to f32).
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
    /// Codes into [`super::codes::code_map`] and the scale of each block the range covers.
    Block8 {
        /// One per value.
        codes: Vec<u8>,
        /// One per [`QUANT_BLOCK`] values, the last block possibly partial.
        scales: Vec<f32>,
    },
}

impl StateData {
    /// The precision this data is in.
    pub fn precision(&self) -> StatePrecision {
        match self {
            StateData::F32(_) => StatePrecision::F32,
            StateData::Bf16(_) => StatePrecision::Bf16,
            StateData::Block8 { .. } => StatePrecision::Block8,
        }
    }
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            StateData::F32(x) => x.len(),
            StateData::Bf16(x) => x.len(),
            StateData::Block8 { codes, .. } => codes.len(),
        }
    }
    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One stored moment: fp32 or bf16 values, or codes with their block scales.
enum Stored<B: Device + ?Sized> {
    Values(B::Buf),
    Block8 { codes: B::Buf, scales: B::Buf },
}

/// Both AdamW moments of `n` parameters in one precision, zero at creation.
pub struct AdamWState<B: Device + ?Sized> {
    precision: StatePrecision,
    n: usize,
    m: Stored<B>,
    v: Stored<B>,
}

impl<B: Device + ?Sized> AdamWState<B> {
    /// Zero moments for `n` parameters. In Block8 all scales are 0, so every code reads as 0.
    pub fn new(b: &B, n: usize, precision: StatePrecision) -> Result<Self> {
        let one = || -> Result<Stored<B>> {
            Ok(match precision {
                StatePrecision::F32 => Stored::Values(b.alloc(n, Kind::Master)?),
                StatePrecision::Bf16 => Stored::Values(b.alloc(n, Kind::Moment16)?),
                StatePrecision::Block8 => Stored::Block8 {
                    codes: b.alloc(n, Kind::Code8)?,
                    scales: b.alloc(n.div_ceil(QUANT_BLOCK), Kind::Master)?,
                },
            })
        };
        Ok(AdamWState {
            precision,
            n,
            m: one()?,
            v: one()?,
        })
    }

    /// The precision of both moments.
    pub fn precision(&self) -> StatePrecision {
        self.precision
    }

    /// Parameters covered.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether no parameters are covered.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Checks that `range` lies inside and, in Block8, covers whole blocks (it starts on a block
    /// boundary and ends on one or at `n`): a block's scale is recomputed from all its values at
    /// once, so no view or transfer may take part of a block.
    fn check_range(&self, op: &'static str, range: &Range<usize>) -> Result<()> {
        check(range.start <= range.end && range.end <= self.n, op, || {
            format!("range {range:?} of a state of {} parameters", self.n)
        })?;
        let whole = range.start.is_multiple_of(QUANT_BLOCK)
            && (range.end.is_multiple_of(QUANT_BLOCK) || range.end == self.n);
        check(
            self.precision != StatePrecision::Block8 || whole,
            op,
            || {
                format!(
                    "range {range:?} of 8-bit states cuts a block of {QUANT_BLOCK} values \
                 (parameter groups of a Block8 state must start at multiples of {QUANT_BLOCK})"
                )
            },
        )
    }

    fn stored(&self, which: Moment) -> &Stored<B> {
        match which {
            Moment::First => &self.m,
            Moment::Second => &self.v,
        }
    }

    /// Views of both moments' `range` (whole blocks in Block8, see [`AdamWState::read`]).
    pub fn views<'a>(
        &'a mut self,
        b: &'a B,
        range: Range<usize>,
    ) -> Result<(MomentMut<'a, B>, MomentMut<'a, B>)> {
        self.check_range("adamw state views", &range)?;
        let precision = self.precision;
        let blocks = range.start / QUANT_BLOCK..range.end.div_ceil(QUANT_BLOCK);
        let view = |s: &'a mut Stored<B>| -> MomentMut<'a, B> {
            match s {
                Stored::Block8 { codes, scales } => MomentMut::Block8 {
                    codes: b.view_mut(codes, range.clone()),
                    scales: b.view_mut(scales, blocks.clone()),
                },
                Stored::Values(x) => {
                    let x = b.view_mut(x, range.clone());
                    if precision == StatePrecision::Bf16 {
                        MomentMut::Bf16(x)
                    } else {
                        MomentMut::F32(x)
                    }
                }
            }
        };
        Ok((view(&mut self.m), view(&mut self.v)))
    }

    /// One moment's `range` in its own precision. In Block8 the range must cover whole blocks
    /// (start at a multiple of 256, end at one or at the end); the scales returned are those of
    /// the blocks it covers.
    pub fn read(&self, b: &B, which: Moment, range: Range<usize>) -> Result<StateData> {
        self.check_range("adamw state read", &range)?;
        Ok(match self.stored(which) {
            Stored::Values(x) if self.precision == StatePrecision::Bf16 => {
                // Exact: the stored values are bf16 values.
                let vals = b.read(x, range)?;
                StateData::Bf16(vals.iter().map(|&x| bf16_bits(x)).collect())
            }
            Stored::Values(x) => StateData::F32(b.read(x, range)?),
            Stored::Block8 { codes, scales } => StateData::Block8 {
                codes: b
                    .read(codes, range.clone())?
                    .iter()
                    .map(|&c| c as u8)
                    .collect(),
                scales: b.read(
                    scales,
                    range.start / QUANT_BLOCK..range.end.div_ceil(QUANT_BLOCK),
                )?,
            },
        })
    }

    /// Sets one moment from `offset` on to `data`, which must be in this state's precision (a
    /// checkpoint of another precision is refused, naming both) and, in Block8, cover whole
    /// blocks with one scale per block.
    pub fn write(&mut self, b: &B, which: Moment, offset: usize, data: &StateData) -> Result<()> {
        if data.precision() != self.precision {
            return Err(BackendError::Unsupported(format!(
                "optimizer state in {:?} precision cannot be loaded into {:?} states \
                 (resume with the precision the checkpoint was written with)",
                data.precision(),
                self.precision
            )));
        }
        let range = offset..offset + data.len();
        self.check_range("adamw state write", &range)?;
        let s = match which {
            Moment::First => &mut self.m,
            Moment::Second => &mut self.v,
        };
        match (data, s) {
            (StateData::F32(x), Stored::Values(dst)) => b.write(dst, offset, x),
            (StateData::Bf16(bits), Stored::Values(dst)) => {
                let x: Vec<f32> = bits
                    .iter()
                    .map(|&h| f32::from_bits((h as u32) << 16))
                    .collect();
                b.write(dst, offset, &x)
            }
            (
                StateData::Block8 { codes, scales },
                Stored::Block8 {
                    codes: dst_codes,
                    scales: dst,
                },
            ) => {
                let blocks = range.end.div_ceil(QUANT_BLOCK) - offset / QUANT_BLOCK;
                check(scales.len() == blocks, "adamw state write", || {
                    format!(
                        "{} scales for {} codes ({blocks} blocks)",
                        scales.len(),
                        codes.len()
                    )
                })?;
                let x: Vec<f32> = codes.iter().map(|&c| c as f32).collect();
                b.write(dst_codes, offset, &x)?;
                b.write(dst, offset / QUANT_BLOCK, scales)
            }
            // The precisions were compared above, and a state's storage follows its precision.
            _ => unreachable!("state storage does not match its precision"),
        }
    }
}
