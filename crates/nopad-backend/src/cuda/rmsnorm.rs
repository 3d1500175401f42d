//! Launchers of `rmsnorm.cu`: forward (saves fp32 `rstd`), backward `dx +=` (the residual stream's
//! gradient accumulates) and `d_weight +=` through deterministic row-split partials.

use super::compile::{Launch, RMSNORM};
use super::elementwise::{v8_name, v8_ok};
use super::linear::row_splits;
use super::{want, Cuda, CudaMut, CudaRef, Dtype};
use crate::args::{AddRmsNormFwd, RmsNormBwd, RmsNormFwd};
use crate::{GradWrite, Result};

/// Mirrors `RmsnormParams` in rmsnorm.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct RmsnormParams {
    y: u64,
    rstd: u64,
    x: u64,
    weight: u64,
    dy: u64,
    partial: u64,
    n: i32,
    d: i32,
    eps: f32,
    rows_per: i32,
}

impl Cuda {
    /// The forward's shape checks (y, rstd, x, weight) and its launch parameters; `dy` is left
    /// 0 for the fused add to set to its `r`.
    #[allow(clippy::too_many_arguments)]
    fn forward_params(
        &self,
        op: &'static str,
        y: &CudaMut<'_>,
        rstd: &CudaMut<'_>,
        x: CudaRef<'_>,
        weight: &CudaRef<'_>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<RmsnormParams> {
        let c = self.compute;
        want(op, "y", y, c, n * d)?;
        want(op, "rstd", rstd, Dtype::F32, n)?;
        want(op, "x", &x, c, n * d)?;
        want(op, "weight", weight, c, d)?;
        Ok(RmsnormParams {
            y: y.ptr,
            rstd: rstd.ptr,
            x: x.ptr,
            weight: weight.ptr,
            dy: 0,
            partial: 0,
            n: n as i32,
            d: d as i32,
            eps,
            rows_per: 0,
        })
    }

    /// y: `[n, d]` Compute; rstd: `[n]` fp32; x: `[n, d]`; weight: `[d]` Compute.
    pub(crate) fn rmsnorm_forward_impl(&self, a: RmsNormFwd<'_, Self>) -> Result<()> {
        let RmsNormFwd {
            y,
            rstd,
            x,
            weight,
            n,
            d,
            eps,
        } = a;
        let c = self.compute;
        let p = self.forward_params("rmsnorm_forward", &y, &rstd, x, &weight, n, d, eps)?;
        if n == 0 {
            return Ok(());
        }
        let name = v8_name("rmsnorm_fwd", v8_ok(&[p.y, p.x, p.weight], &[d]));
        // SAFETY: shapes checked above; the v8 kernel only on aligned views.
        unsafe { self.launch(RMSNORM, c, &name, Launch::per_row(n), &p) }
    }

    /// x: `[n, d]` Compute, `x += r` first; then as [`Cuda::rmsnorm_forward_impl`]. One kernel
    /// (8-wide when aligned, else the two separate kernels).
    pub(crate) fn add_rmsnorm_forward_impl(&self, a: AddRmsNormFwd<'_, Self>) -> Result<()> {
        let AddRmsNormFwd {
            y,
            rstd,
            mut x,
            r,
            weight,
            n,
            d,
            eps,
        } = a;
        let op = "add_rmsnorm_forward";
        let c = self.compute;
        let mut p = self.forward_params(op, &y, &rstd, x.as_ref(), &weight, n, d, eps)?;
        want(op, "r", &r, c, n * d)?;
        if n == 0 {
            return Ok(());
        }
        p.dy = r.ptr;
        if v8_ok(&[p.y, p.x, p.weight, p.dy], &[d]) {
            // SAFETY: shapes checked above; aligned views.
            unsafe { self.launch(RMSNORM, c, "add_rmsnorm_fwd_v8", Launch::per_row(n), &p) }
        } else {
            self.add_impl(x.reborrow(), r, None, n * d)?;
            self.rmsnorm_forward_impl(RmsNormFwd {
                y,
                rstd,
                x: x.as_ref(),
                weight,
                n,
                d,
                eps,
            })
        }
    }

    /// dx: `[n, d]` Compute (accumulated); d_weight: `[d]` of the gradient type (as `acc`), or
    /// None (a frozen weight: its partial sums are skipped, or left unused by the fused kernel);
    /// dy, x: `[n, d]`;
    /// weight: `[d]`; rstd: `[n]` fp32 from the forward.
    pub(crate) fn rmsnorm_backward_impl(&self, a: RmsNormBwd<'_, Self>) -> Result<()> {
        let RmsNormBwd {
            dx,
            d_weight,
            dy,
            x,
            weight,
            rstd,
            n,
            d,
            write: acc,
        } = a;
        let op = "rmsnorm_backward";
        let c = self.compute;
        want(op, "dx", &dx, c, n * d)?;
        if let Some(dw) = &d_weight {
            want(op, "d_weight", dw, self.grad, d)?;
        }
        want(op, "dy", &dy, c, n * d)?;
        want(op, "x", &x, c, n * d)?;
        want(op, "weight", &weight, c, d)?;
        want(op, "rstd", &rstd, Dtype::F32, n)?;
        if n == 0 || d == 0 {
            if let (Some(dw), GradWrite::Overwrite) = (&d_weight, acc) {
                self.zero_raw(dw.ptr, d, self.grad)?;
            }
            return Ok(());
        }
        let v8 = v8_ok(&[dx.ptr, x.ptr, weight.ptr, dy.ptr], &[d]);
        // One pass (rmsnorm_bwd_fused_v8_1) when rows are 8-wide and at most 2048 wide: blocks
        // of ~16 rows, at most 256 of them; otherwise dx per row and a 2-D d_weight pass (run 16:
        // 2.07 -> 1.59 ms per step at 2048 wide; a 4096-wide variant was slower, 1.49 -> 2.35).
        let fused = v8 && d <= 2048;
        let (splits, rows_per) = if fused {
            let splits = n.div_ceil(16).clamp(1, 256);
            let rows_per = n.div_ceil(splits);
            (n.div_ceil(rows_per), rows_per)
        } else {
            row_splits(n)
        };
        let partial = self.scratch(splits * d, Dtype::F32)?;
        let p = RmsnormParams {
            y: dx.ptr,
            rstd: rstd.ptr,
            x: x.ptr,
            weight: weight.ptr,
            dy: dy.ptr,
            partial: partial.ptr,
            n: n as i32,
            d: d as i32,
            eps: 0.0,
            rows_per: rows_per as i32,
        };
        if fused {
            let name = "rmsnorm_bwd_fused_v8_1";
            let cfg = Launch::blocks(splits, 1);
            // SAFETY: shapes checked above; partial holds splits·d fp32; 16-byte aligned rows
            // of at most 2048 columns (one 8-wide chunk per thread).
            unsafe { self.launch(RMSNORM, c, name, cfg, &p)? };
            return match d_weight {
                Some(dw) => self.finish_partials(dw.ptr, &partial, splits, d, acc),
                None => Ok(()),
            };
        }
        let cols = Launch::blocks(d.div_ceil(if v8 { 2048 } else { 256 }), splits);
        // SAFETY: shapes checked above; partial holds splits·d fp32; the v8 kernels only on
        // aligned views.
        unsafe {
            self.launch(
                RMSNORM,
                c,
                &v8_name("rmsnorm_bwd_dx", v8),
                Launch::per_row(n),
                &p,
            )?;
        }
        let Some(d_weight) = d_weight else {
            return Ok(());
        };
        // SAFETY: as above.
        unsafe {
            let dw = v8_name("rmsnorm_bwd_dw_partial", v8);
            self.launch(RMSNORM, c, &dw, cols, &p)?;
        }
        self.finish_partials(d_weight.ptr, &partial, splits, d, acc)
    }
}
