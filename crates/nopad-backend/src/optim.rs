//! The optimizer's storage and update, [`OptimizerOps`]: how a backend keeps fp32 master
//! weights next to lower-precision parameters, and the AdamW step over them. Kept apart from
//! [`crate::Ops`] because it is where the optimizer-state formats plug in:
//!
//! - [`AdamWStep`] / [`OptimizerOps::adamw`]: fp32 moments, the weights rounded to nearest (the
//!   default path);
//! - [`AdamWStates`] / [`OptimizerOps::adamw_states`]: moments in any [`StatePrecision`] and the
//!   weights rounded as [`ParamRounding`] says (stochastically, without a master copy). Its
//!   buffers are owned by [`AdamWState`] (module `state`), which also reads and writes them in
//!   their own precision for checkpoints; the formats themselves are in module `codes`.

pub mod codes;
mod state;

use codes::QUANT_BLOCK;
pub use state::{AdamWState, Moment, StateData};

use std::ops::Range;

use crate::{Device, Kind, Result};

/// How AdamW's two moments are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StatePrecision {
    /// fp32 (Kind::Master): 8 bytes per parameter for both moments.
    #[default]
    F32,
    /// bf16 ([`Kind::Moment16`]), updated in f32 and rounded to nearest even on store: 4 bytes.
    Bf16,
    /// Block-wise dynamic 8-bit quantisation ([`Kind::Code8`] codes, one f32 scale per
    /// [`codes::QUANT_BLOCK`] values; the signed [`codes::code_map`] for the first moment, the unsigned one for
    /// the second): 2 + 8/256 ≈ 2.03 bytes.
    Block8,
}

impl StatePrecision {
    /// Device bytes per parameter of both moments in their nominal storage (fp32, bf16, one byte
    /// per code plus the scales), for memory plans. [`OptimizerOps::optimizer_bytes`] counts a
    /// backend's actual element sizes.
    pub fn bytes_per_param(self) -> f64 {
        match self {
            StatePrecision::F32 => 8.0,
            StatePrecision::Bf16 => 4.0,
            StatePrecision::Block8 => 2.0 + 8.0 / QUANT_BLOCK as f64,
        }
    }
}

/// Whether an fp32 master copy of the weights is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MasterPrecision {
    /// fp32 master weights where the backend's Compute type is narrower
    /// ([`OptimizerOps::needs_master`]); the weights are rounded to nearest from them.
    #[default]
    F32,
    /// No master copy: each update is applied to the weights themselves and rounded to bf16
    /// stochastically ([`ParamRounding::Stochastic`]) on every backend, so the weights stay
    /// bf16 values and the CPU computes what the GPU does.
    None,
}

impl MasterPrecision {
    /// Nominal device bytes per parameter of the master copy on a bf16 device (the CUDA backend
    /// keeps the low 16 bits of each fp32 weight beside the bf16 parameter).
    pub fn bytes_per_param(self) -> f64 {
        match self {
            MasterPrecision::F32 => 2.0,
            MasterPrecision::None => 0.0,
        }
    }
}

/// How the updated weights are written when there is no master copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ParamRounding {
    /// To the nearest value of the parameters' type (or through the master copy when one is
    /// passed): what [`OptimizerOps::adamw`] does.
    #[default]
    Nearest,
    /// To bf16, stochastically ([`codes::round_bf16_stochastic`]): the random bits of element `i` of
    /// the view are drawn from `(seed, step, first_index + i)`, so give each group of parameters
    /// its offset in the flat buffer as `first_index` (no two parameters share bits).
    Stochastic {
        /// Run seed.
        seed: u64,
        /// Index of the view's first element in the flat parameter buffer.
        first_index: u64,
    },
}

/// A view of one moment as it is stored ([`AdamWState::views`] gives them).
pub enum MomentMut<'a, B: Device + ?Sized + 'a> {
    /// `[n]` Master.
    F32(B::Mut<'a>),
    /// `[n]` [`Kind::Moment16`].
    Bf16(B::Mut<'a>),
    /// Block-quantised: block `j` is elements `256·j..` of the view, so a view must start at a
    /// block boundary of its buffer.
    Block8 {
        /// `[n]` [`Kind::Code8`].
        codes: B::Mut<'a>,
        /// `[ceil(n / 256)]` Master: each block's scale.
        scales: B::Mut<'a>,
    },
}

impl<B: Device + ?Sized> MomentMut<'_, B> {
    /// The precision this view is stored in.
    pub fn precision(&self) -> StatePrecision {
        match self {
            MomentMut::F32(_) => StatePrecision::F32,
            MomentMut::Bf16(_) => StatePrecision::Bf16,
            MomentMut::Block8 { .. } => StatePrecision::Block8,
        }
    }
}

/// Arguments of [`OptimizerOps::adamw_states`]: one AdamW update over `n` parameters with the
/// moments in any precision (both in the same one). The arithmetic of an element is that of
/// [`OptimizerOps::adamw`]; the moments are read from their storage first (bf16 widened, codes
/// times their block's scale) and stored after (bf16 rounded to nearest even; each block's new
/// scale is the largest magnitude of its updated values, each value the nearest code of
/// value/scale).
pub struct AdamWStates<'a, B: Device + ?Sized + 'a> {
    /// `[n]` Compute.
    pub param: B::Mut<'a>,
    /// The master copy, as in [`AdamWStep::master`]; must be None with stochastic rounding.
    pub master: Option<B::Mut<'a>>,
    /// `[n]` Grad.
    pub grad: B::Ref<'a>,
    /// First moment.
    pub m: MomentMut<'a, B>,
    /// Second moment.
    pub v: MomentMut<'a, B>,
    /// Parameters n.
    pub n: usize,
    /// This step's hyper-parameters.
    pub hp: AdamW,
    /// How the weights are written.
    pub rounding: ParamRounding,
}

/// Hyper-parameters of one AdamW update (decoupled weight decay, bias correction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Learning rate of this step.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay (0 for norms and biases).
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u64,
    /// Factor applied to every gradient before the update (gradient-norm clipping).
    pub grad_scale: f32,
}

/// Arguments of [`OptimizerOps::adamw`]: one update over `n` parameters.
pub struct AdamWStep<'a, B: Device + ?Sized + 'a> {
    /// `[n]` Compute: what the forward reads.
    pub param: B::Mut<'a>,
    /// The master copy (from [`OptimizerOps::master_new`]) the update is applied to when the
    /// backend keeps one (see [`OptimizerOps::needs_master`]), after which `param` is
    /// refreshed from it; None otherwise.
    pub master: Option<B::Mut<'a>>,
    /// `[n]` Grad.
    pub grad: B::Ref<'a>,
    /// `[n]` Master: first moment.
    pub m: B::Mut<'a>,
    /// `[n]` Master: second moment.
    pub v: B::Mut<'a>,
    /// Parameters n.
    pub n: usize,
    /// This step's hyper-parameters.
    pub hp: AdamW,
}

impl<B: Device + ?Sized> AdamWStates<'_, B> {
    /// The precision of the moments; an error unless both have the same.
    pub fn precision(&self) -> Result<StatePrecision> {
        let (m, v) = (self.m.precision(), self.v.precision());
        crate::error::check(m == v, "adamw_states", || {
            format!("m is {m:?} but v is {v:?}: both moments take one precision")
        })?;
        Ok(m)
    }
}

/// Optimizer storage and the AdamW update.
pub trait OptimizerOps: Device {
    /// One AdamW update (see [`AdamWStep`]).
    fn adamw(&self, a: AdamWStep<'_, Self>) -> Result<()>;
    /// One AdamW update with moments in any [`StatePrecision`] (see [`AdamWStates`]). fp32
    /// moments rounded to nearest take the [`OptimizerOps::adamw`] path unchanged.
    fn adamw_states(&self, a: AdamWStates<'_, Self>) -> Result<()>;
    /// Whether Compute and Master differ in type, so the optimizer needs a master copy.
    fn needs_master(&self) -> bool;
    /// Bytes of the master copy of `n` parameters (from [`OptimizerOps::master_new`]); 0 where
    /// none is needed.
    fn master_bytes(&self, n: usize) -> usize {
        if self.needs_master() {
            n * self.kind_size(Kind::Master)
        } else {
            0
        }
    }
    /// Bytes the optimizer keeps for `n` parameters on this backend: both moments in `states`
    /// and the master copy unless `master` is None. The memory plan's optimizer line.
    fn optimizer_bytes(&self, n: usize, states: StatePrecision, master: MasterPrecision) -> usize {
        let moments = match states {
            StatePrecision::F32 => n * self.kind_size(Kind::Master),
            StatePrecision::Bf16 => n * self.kind_size(Kind::Moment16),
            StatePrecision::Block8 => {
                n * self.kind_size(Kind::Code8)
                    + n.div_ceil(QUANT_BLOCK) * self.kind_size(Kind::Master)
            }
        };
        let master = match master {
            MasterPrecision::F32 => self.master_bytes(n),
            MasterPrecision::None => 0,
        };
        2 * moments + master
    }
    /// A master copy of `params[..n]` (called only when [`OptimizerOps::needs_master`]): fp32
    /// weights equal to the parameters, in whatever form [`OptimizerOps::adamw`] takes as
    /// `master`. The default is a full Master buffer; the CUDA backend keeps only the low 16 bits
    /// of each fp32 weight, whose high 16 bits are the bf16 parameter itself, so exact fp32
    /// master weights cost 2 bytes per parameter instead of 4.
    fn master_new(&self, params: &Self::Buf, n: usize) -> Result<Self::Buf> {
        let mut master = self.alloc(n, Kind::Master)?;
        const CHUNK: usize = 1 << 24;
        let mut off = 0;
        while off < n {
            let end = (off + CHUNK).min(n);
            let vals = self.read(params, off..end)?;
            self.write(&mut master, off, &vals)?;
            off = end;
        }
        Ok(master)
    }
    /// The fp32 master weights of `range`.
    fn master_read(
        &self,
        params: &Self::Buf,
        master: &Self::Buf,
        range: Range<usize>,
    ) -> Result<Vec<f32>> {
        let _ = params;
        self.read(master, range)
    }
    /// Sets the master weights from `offset` on to `data`, and the parameters to their rounding.
    fn master_write(
        &self,
        params: &mut Self::Buf,
        master: &mut Self::Buf,
        offset: usize,
        data: &[f32],
    ) -> Result<()> {
        self.write(params, offset, data)?;
        self.write(master, offset, data)
    }
}
