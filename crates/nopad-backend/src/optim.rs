//! The optimizer's storage and update, [`OptimizerOps`]: how a backend keeps fp32 master
//! weights next to lower-precision parameters, and the AdamW step over them. Kept apart from
//! [`crate::Ops`] because it is where other optimizer-state formats (bf16 or 8-bit moments,
//! sharded states) plug in.

use std::ops::Range;

use crate::{Device, Kind, Result};

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

/// Optimizer storage and the AdamW update.
pub trait OptimizerOps: Device {
    /// One AdamW update (see [`AdamWStep`]).
    fn adamw(&self, a: AdamWStep<'_, Self>) -> Result<()>;
    /// Whether Compute and Master differ in type, so the optimizer needs a master copy.
    fn needs_master(&self) -> bool;
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
