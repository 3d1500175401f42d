//! Launcher of `adamw.cu`: one multi-tensor AdamW step over a flat parameter range, updating the
//! fp32 master copy (mixed precision) and refreshing the Compute parameters from it.

use super::compile::ADAMW;
use super::elementwise::stride_launch;
use super::{want, Cuda, CudaMut, CudaRef, Dtype};
use crate::error::check;
use crate::{AdamW, Result};

/// Mirrors `AdamwParams` in adamw.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamwParams {
    param: u64,
    master: u64,
    grad: u64,
    m: u64,
    v: u64,
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

impl Cuda {
    /// param: `[n]` Compute; master, grad, m, v: `[n]` fp32.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn adamw_impl(
        &self,
        param: CudaMut<'_>,
        master: Option<CudaMut<'_>>,
        grad: CudaRef<'_>,
        m: CudaMut<'_>,
        v: CudaMut<'_>,
        n: usize,
        hp: AdamW,
    ) -> Result<()> {
        let op = "adamw";
        want(op, "param", &param, self.compute, n)?;
        if let Some(master) = &master {
            want(op, "master", master, Dtype::F32, n)?;
        }
        want(op, "grad", &grad, Dtype::F32, n)?;
        want(op, "m", &m, Dtype::F32, n)?;
        want(op, "v", &v, Dtype::F32, n)?;
        check(hp.step >= 1, op, || "step is 1-based".into())?;
        if n == 0 {
            return Ok(());
        }
        let step = hp.step.min(i32::MAX as u64) as i32;
        let p = AdamwParams {
            param: param.ptr,
            master: master.map_or(0, |m| m.ptr),
            grad: grad.ptr,
            m: m.ptr,
            v: v.ptr,
            n: n as i64,
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            grad_scale: hp.grad_scale,
            decay: 1.0 - hp.lr * hp.weight_decay,
            step_size: hp.lr / (1.0 - (hp.beta1 as f64).powi(step) as f32),
            bc2_sqrt: (1.0 - (hp.beta2 as f64).powi(step) as f32).sqrt(),
        };
        // SAFETY: shapes checked above.
        unsafe { self.launch(ADAMW, self.compute, "adamw", stride_launch(n), &p) }
    }
}
