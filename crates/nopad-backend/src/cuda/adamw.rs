//! Launcher of `adamw.cu`: one multi-tensor AdamW step over a flat parameter range, updating the
//! fp32 master weights (mixed precision) and refreshing the Compute parameters from them.
//!
//! Split master weights: in bf16 mode an fp32 master weight is kept as two 16-bit halves, the
//! high half being the bf16 parameter the forward reads and the low half a `U16` buffer beside
//! it. `bits = (hi << 16) + sign_extend(lo)` restores the fp32 word exactly, and the split rounds
//! `hi` to the nearest bf16 (ties away from zero, the only case where it differs from
//! round-to-nearest-even), so the forward sees the same weights as with a separate fp32 copy while
//! the master costs 2 bytes per parameter instead of 4.

use std::ops::Range;

use cudarc::driver::result as cu;

use super::compile::ADAMW;
use super::elementwise::stride_launch;
use super::{want, Cuda, CudaBuf, Dtype};
use crate::error::check;
use crate::{AdamW, AdamWStep, BackendError, Result};

/// Splits an fp32 word into (bf16 high half rounded to nearest, low 16 bits of the remainder).
pub(crate) fn split_master(x: f32) -> (u16, u16) {
    let u = x.to_bits();
    let hi = u.wrapping_add(0x8000) >> 16;
    let lo = u.wrapping_sub(hi << 16) as u16;
    (hi as u16, lo)
}

/// The fp32 word of a split master weight.
pub(crate) fn join_master(hi: u16, lo: u16) -> f32 {
    f32::from_bits(((hi as u32) << 16).wrapping_add(lo as i16 as i32 as u32))
}

/// Mirrors `AdamwParams` in adamw.cu.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct AdamwParams {
    pub(super) param: u64,
    pub(super) master_lo: u64,
    pub(super) grad: u64,
    pub(super) m: u64,
    pub(super) v: u64,
    n: i64,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    grad_scale: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

impl AdamwParams {
    /// The kernel's pointers and this step's constants (bias corrections on the host, as the
    /// CPU backend computes them). `hp.step` must be at least 1.
    pub(super) fn new(ptrs: [u64; 5], n: usize, hp: &AdamW) -> Self {
        let [param, master_lo, grad, m, v] = ptrs;
        let step = hp.step.min(i32::MAX as u64) as i32;
        AdamwParams {
            param,
            master_lo,
            grad,
            m,
            v,
            n: n as i64,
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            grad_scale: hp.grad_scale,
            decay: 1.0 - hp.lr * hp.weight_decay,
            step_size: hp.lr / (1.0 - (hp.beta1 as f64).powi(step) as f32),
            bc2_sqrt: (1.0 - (hp.beta2 as f64).powi(step) as f32).sqrt(),
        }
    }
}

impl Cuda {
    /// param: `[n]` Compute; master: `[n]` U16 low halves (bf16 mode); grad: `[n]` of the
    /// gradient type; m, v: `[n]` fp32.
    pub(crate) fn adamw_impl(&self, a: AdamWStep<'_, Self>) -> Result<()> {
        let AdamWStep {
            param,
            master,
            grad,
            m,
            v,
            n,
            hp,
        } = a;
        let op = "adamw";
        want(op, "param", &param, self.compute, n)?;
        if let Some(master) = &master {
            check(self.compute == Dtype::Bf16, op, || {
                "a master copy is kept only in bf16 mode".into()
            })?;
            want(op, "master", master, Dtype::U16, n)?;
        }
        want(op, "grad", &grad, self.grad, n)?;
        want(op, "m", &m, Dtype::F32, n)?;
        want(op, "v", &v, Dtype::F32, n)?;
        check(hp.step >= 1, op, || "step is 1-based".into())?;
        if n == 0 {
            return Ok(());
        }
        let ptrs = [
            param.ptr,
            master.map_or(0, |m| m.ptr),
            grad.ptr,
            m.ptr,
            v.ptr,
        ];
        let p = AdamwParams::new(ptrs, n, &hp);
        let g_align = if self.grad == Dtype::Bf16 { 8 } else { 16 };
        let aligned = p.grad.is_multiple_of(g_align)
            && p.m.is_multiple_of(16)
            && p.v.is_multiple_of(16)
            && p.param.is_multiple_of(8)
            && p.master_lo.is_multiple_of(8);
        let g16 = if self.grad == Dtype::Bf16 { "_g16" } else { "" };
        let (name, cfg) = match (p.master_lo != 0, aligned) {
            (false, _) => ("adamw".to_string(), stride_launch(n)),
            (true, true) => (format!("adamw_split4{g16}"), stride_launch(n.div_ceil(4))),
            (true, false) => (format!("adamw_split1{g16}"), stride_launch(n)),
        };
        // SAFETY: shapes checked above; adamw_split4 only on 16/8-byte aligned views.
        unsafe { self.launch(ADAMW, self.compute, &name, cfg, &p) }
    }
}

impl Cuda {
    fn master_check(&self, params: &CudaBuf, lo: &CudaBuf, range: &Range<usize>) -> Result<()> {
        check(
            params.dtype == Dtype::Bf16
                && lo.dtype == Dtype::U16
                && range.start <= range.end
                && range.end <= params.len.min(lo.len),
            "master",
            || {
                format!(
                    "{range:?} of bf16 parameters ({:?}[{}]) and low halves ({:?}[{}])",
                    params.dtype, params.len, lo.dtype, lo.len
                )
            },
        )
    }

    /// The fp32 master weights of `range`, joined from the bf16 parameters and the low halves.
    pub(crate) fn master_read_impl(
        &self,
        params: &CudaBuf,
        lo: &CudaBuf,
        range: Range<usize>,
    ) -> Result<Vec<f32>> {
        self.master_check(params, lo, &range)?;
        let hi = self.download_u16(params, range.clone())?;
        let lo = self.download_u16(lo, range)?;
        Ok(hi
            .into_iter()
            .zip(lo)
            .map(|(h, l)| join_master(h, l))
            .collect())
    }

    /// Sets fp32 master weights from `offset` on: high halves into the parameters, low halves
    /// into `lo`.
    pub(crate) fn master_write_impl(
        &self,
        params: &mut CudaBuf,
        lo: &mut CudaBuf,
        offset: usize,
        data: &[f32],
    ) -> Result<()> {
        self.master_check(params, lo, &(offset..offset + data.len()))?;
        let (his, los): (Vec<u16>, Vec<u16>) = data.iter().map(|&x| split_master(x)).unzip();
        self.upload_u16(params, offset, &his)?;
        self.upload_u16(lo, offset, &los)
    }

    fn download_u16(&self, buf: &CudaBuf, range: Range<usize>) -> Result<Vec<u16>> {
        let mut host = vec![0u16; range.len()];
        if host.is_empty() {
            return Ok(host);
        }
        let err = |e: cu::DriverError| BackendError::Device {
            op: "master_read (cuMemcpyDtoHAsync)".into(),
            msg: e.to_string(),
        };
        self.ctx.bind_to_thread().map_err(err)?;
        let s = self.raw_stream();
        // SAFETY: the caller checked that `range` lies within the 16-bit buffer; the stream is
        // synchronised before `host` is read.
        unsafe {
            cu::memcpy_dtoh_async(&mut host, buf.ptr + 2 * range.start as u64, s).map_err(err)?;
            cu::stream::synchronize(s).map_err(err)?;
        }
        Ok(host)
    }

    fn upload_u16(&self, buf: &mut CudaBuf, offset: usize, data: &[u16]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let err = |e: cu::DriverError| BackendError::Device {
            op: "master_write (cuMemcpyHtoDAsync)".into(),
            msg: e.to_string(),
        };
        self.ctx.bind_to_thread().map_err(err)?;
        // SAFETY: the caller checked the range; pageable sources are staged before the call
        // returns.
        unsafe { cu::memcpy_htod_async(buf.ptr + 2 * offset as u64, data, self.raw_stream()) }
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::{join_master, split_master};
    use nopad_rng::Rng;

    fn check(x: f32) {
        let (hi, lo) = split_master(x);
        assert_eq!(join_master(hi, lo).to_bits(), x.to_bits(), "{x:e}");
        // The high half is the nearest bf16 (ties may go either way).
        let h = half::bf16::from_bits(hi).to_f32() as f64;
        let rne = half::bf16::from_f32(x).to_f32() as f64;
        assert!(
            (h - x as f64).abs() <= (rne - x as f64).abs(),
            "{x:e}: {h:e} vs {rne:e}"
        );
    }

    #[test]
    fn split_master_weights_are_exact_and_round_to_nearest() {
        for x in [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            1e-30,
            -3.0e38,
            f32::MIN_POSITIVE,
            1.0 + 1.0 / 256.0,
        ] {
            check(x);
        }
        // Every low-half pattern of a few high halves, ties included.
        for hi in [0x3f80u32, 0xbf80, 0x0001, 0x7f7e, 0x4049] {
            for lo in 0..=0xffffu32 {
                check(f32::from_bits((hi << 16) | lo));
            }
        }
        let mut rng = Rng::new(7);
        for _ in 0..100_000 {
            let x = f32::from_bits(rng.next_u64() as u32);
            if x.is_finite() && x.abs() < 3.0e38 {
                check(x);
            }
        }
    }
}
