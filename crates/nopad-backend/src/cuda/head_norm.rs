//! Launchers of `head_norm.cu`: the per-head RMSNorm of the query and key heads of `qkv`
//! (Qwen3's `q_norm`/`k_norm`), in place, one warp per (token, head); the backward's weight
//! gradient through per-block partial sums finished by `reduce.cu`, as RMSNorm's is.

use super::compile::{Launch, HEAD_NORM};
use super::{want, Cuda, CudaMut, Dtype};
use crate::args::{HeadRmsNormBwd, HeadRmsNormFwd};
use crate::error::check;
use crate::{GradWrite, HeadNormDims, Result};

/// Mirrors `HeadNormParams` in head_norm.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct HeadNormParams {
    qkv: u64,
    x: u64,
    rstd: u64,
    weight: u64,
    partial: u64,
    n: i32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    eps: f32,
    rows_per: i32,
}

/// Rows of one 256-thread block (`HN_WARPS`), and the widest head a warp holds (`32·HN_MAX_K`).
const WARPS: usize = 8;
const MAX_HEAD_DIM: usize = 256;

impl Cuda {
    /// The shape checks both directions share (`qkv` the in-place buffer: qkv or d_qkv) and
    /// the launch parameters without the backward's partials.
    fn head_norm_params(
        &self,
        op: &'static str,
        (qkv, x, rstd, weight): (&CudaMut<'_>, u64, u64, u64),
        dims: HeadNormDims,
        eps: f32,
    ) -> Result<HeadNormParams> {
        let HeadNormDims {
            n,
            heads,
            kv_heads,
            head_dim,
        } = dims;
        check(heads > 0 && kv_heads > 0, op, || {
            format!("{heads} query and {kv_heads} key heads: each must be at least 1")
        })?;
        check((1..=MAX_HEAD_DIM).contains(&head_dim), op, || {
            format!("head_dim {head_dim}: the CUDA kernel takes 1 to {MAX_HEAD_DIM}")
        })?;
        want(op, "qkv", qkv, self.compute, n * dims.row_stride())?;
        Ok(HeadNormParams {
            qkv: qkv.ptr,
            x,
            rstd,
            weight,
            partial: 0,
            n: n as i32,
            heads: heads as i32,
            kv_heads: kv_heads as i32,
            head_dim: head_dim as i32,
            eps,
            rows_per: 0,
        })
    }

    /// qkv: `[n, (H + 2·Hkv)·Dh]` Compute, q and k heads normalised in place; x: `[n, H + Hkv,
    /// Dh]` Compute, overwritten; rstd: `[n, H + Hkv]` fp32; weight: `[2·Dh]` Compute.
    pub(crate) fn head_rmsnorm_forward_impl(&self, a: HeadRmsNormFwd<'_, Self>) -> Result<()> {
        let op = "head_rmsnorm_forward";
        let rows = a.dims.n * a.dims.normed_heads();
        let bufs = (&a.qkv, a.x.ptr, a.rstd.ptr, a.weight.ptr);
        let p = self.head_norm_params(op, bufs, a.dims, a.eps)?;
        want(op, "x", &a.x, self.compute, rows * a.dims.head_dim)?;
        want(op, "rstd", &a.rstd, Dtype::F32, rows)?;
        want(op, "weight", &a.weight, self.compute, 2 * a.dims.head_dim)?;
        if rows == 0 {
            return Ok(());
        }
        let cfg = Launch::blocks(rows.div_ceil(WARPS), 1);
        // SAFETY: shapes checked above; one warp per row of `rows`, head_dim within the
        // kernel's registers.
        unsafe { self.launch(HEAD_NORM, self.compute, "head_rmsnorm_fwd", cfg, &p) }
    }

    /// d_qkv: `[n, (H + 2·Hkv)·Dh]` Compute, the q and k heads' dy replaced by dx; d_weight:
    /// `[2·Dh]` of the gradient type (as `write`), or None (frozen); x, rstd, weight as the
    /// forward's.
    pub(crate) fn head_rmsnorm_backward_impl(&self, a: HeadRmsNormBwd<'_, Self>) -> Result<()> {
        let op = "head_rmsnorm_backward";
        let (n, dh, write, d_weight) = (a.dims.n, a.dims.head_dim, a.write, a.d_weight);
        let rows = n * a.dims.normed_heads();
        let bufs = (&a.d_qkv, a.x.ptr, a.rstd.ptr, a.weight.ptr);
        let mut p = self.head_norm_params(op, bufs, a.dims, 0.0)?;
        want(op, "x", &a.x, self.compute, rows * dh)?;
        want(op, "rstd", &a.rstd, Dtype::F32, rows)?;
        want(op, "weight", &a.weight, self.compute, 2 * dh)?;
        if let Some(dw) = &d_weight {
            want(op, "d_weight", dw, self.grad, 2 * dh)?;
        }
        if n == 0 {
            if let (Some(dw), GradWrite::Overwrite) = (&d_weight, write) {
                self.zero_raw(dw.ptr, 2 * dh, self.grad)?;
            }
            return Ok(());
        }
        // Blocks of a few tokens each (up to 1024 blocks): enough warps to fill the GPU, and
        // a partial sum per block that partials_finish adds in a fixed order.
        let splits = n.div_ceil(8).clamp(1, 1024);
        let rows_per = n.div_ceil(splits);
        let blocks = n.div_ceil(rows_per);
        p.rows_per = rows_per as i32;
        let partial = match &d_weight {
            Some(_) => Some(self.scratch(blocks * 2 * dh, Dtype::F32)?),
            None => None,
        };
        p.partial = partial.as_ref().map_or(0, |b| b.ptr);
        // SAFETY: shapes checked above; partial (when given) holds blocks·2·Dh fp32; 256
        // threads a block, as the kernel's shared sums assume.
        unsafe {
            let cfg = Launch::blocks(blocks, 1);
            self.launch(HEAD_NORM, self.compute, "head_rmsnorm_bwd", cfg, &p)?;
        }
        match (d_weight, partial) {
            (Some(dw), Some(partial)) => {
                self.finish_partials(dw.ptr, &partial, blocks, 2 * dh, write)
            }
            _ => Ok(()),
        }
    }
}
