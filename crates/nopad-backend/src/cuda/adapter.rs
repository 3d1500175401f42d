//! A low-rank adapter's ops on CUDA: its up-projection added into its columns of a fused
//! projection and the backward of that (cuBLASLt GEMMs on the strided column block), and the
//! launchers of `adapter.cu`: seeded dropout (the mask of `crate::dropout`), and an NF4 base
//! weight dequantised ahead of its GEMM (the format of `crate::nf4`).

use super::blas::GemmSpec;
use super::compile::ADAPTER;
use super::elementwise::stride_launch;
use super::{want, Cuda, Dtype};
use crate::args::{ColumnsLinearBwd, ColumnsLinearFwd, DequantNf4, Dropout};
use crate::{dropout_scale, dropout_threshold, BackendError, GradWrite, Result};

/// Mirrors `DropoutParams` in adapter.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct DropoutParams {
    y: u64,
    x: u64,
    n: i64,
    seed: u64,
    threshold: u32,
    keep_scale: f32,
    accumulate: i32,
}

/// Mirrors `DequantNf4Params` in adapter.cu; the code maps go by value (1.1 KiB, under the
/// 4 KiB parameter limit), as the 8-bit optimizer's do.
#[repr(C)]
#[derive(Clone, Copy)]
struct DequantNf4Params {
    nf4: [f32; 16],
    map: [f32; 256],
    n: i64,
    mean_at: i64,
    y: u64,
    codes: u64,
    scale_codes: u64,
    absmax: u64,
}

impl Cuda {
    /// `y[:, c0..c0 + out] += s · x · wᵀ`: one GEMM (beta = 1, alpha = s) whose C is the
    /// strided column block of `y` (see [`ColumnsLinearFwd`]); y, x, w Compute.
    pub(crate) fn columns_linear_forward_impl(&self, a: ColumnsLinearFwd<'_, Self>) -> Result<()> {
        let op = "columns_linear_forward";
        let (ylen, xlen, wlen) = a.block.lens(op)?;
        let c = self.compute;
        want(op, "y", &a.y, c, ylen)?;
        want(op, "x", &a.x, c, xlen)?;
        want(op, "w", &a.w, c, wlen)?;
        let (n, stride, c0, d_in, d_out) = a.block.dims();
        if n * d_out * d_in == 0 {
            return Ok(());
        }
        // Column-major: C [out × N] (ldc = stride) += s · wᵀ [out × in] · x [in × N].
        let spec = GemmSpec {
            m: d_out as u64,
            n: n as u64,
            k: d_in as u64,
            trans_a: true,
            trans_b: false,
            lda: d_in as i64,
            ldb: d_in as i64,
            ldc: stride as i64,
            ab: c,
            c,
            accumulate: true,
        };
        let y0 = a.y.ptr + (c0 * c.size()) as u64;
        // SAFETY: the block's rows lie inside y (lens), x and w hold their matrices.
        unsafe { self.gemm_scaled(spec, a.s, a.w.ptr, a.x.ptr, y0) }
    }

    /// `dt = s · dy[:, c0..c0 + out]` read in place: `dx = dt · w`, `d_w (+)= dtᵀ · x` (see
    /// [`ColumnsLinearBwd`]); dx, dy, x, w Compute, d_w Grad.
    pub(crate) fn columns_linear_backward_impl(&self, a: ColumnsLinearBwd<'_, Self>) -> Result<()> {
        let op = "columns_linear_backward";
        let (ylen, xlen, wlen) = a.block.lens(op)?;
        let c = self.compute;
        want(op, "dx", &a.dx, c, xlen)?;
        want(op, "d_w", &a.d_w, self.grad, wlen)?;
        want(op, "dy", &a.dy, c, ylen)?;
        want(op, "x", &a.x, c, xlen)?;
        want(op, "w", &a.w, c, wlen)?;
        let (n, stride, c0, d_in, d_out) = a.block.dims();
        let acc = a.write == GradWrite::Accumulate;
        if n == 0 || d_out == 0 {
            // No rows (or no columns): dx is zero, and an overwritten d_w too.
            self.zero_raw(a.dx.ptr, xlen, c)?;
            if !acc {
                self.zero_raw(a.d_w.ptr, wlen, self.grad)?;
            }
            return Ok(());
        }
        if d_in == 0 {
            return Ok(());
        }
        let dy0 = a.dy.ptr + (c0 * c.size()) as u64;
        // Column-major: dx [in × N] = s · w [in × out] · dt [out × N] (ldb = stride).
        let dx = GemmSpec {
            m: d_in as u64,
            n: n as u64,
            k: d_out as u64,
            trans_a: false,
            trans_b: false,
            lda: d_in as i64,
            ldb: stride as i64,
            ldc: d_in as i64,
            ab: c,
            c,
            accumulate: false,
        };
        // d_w [in × out] (+)= s · x [in × N] · dtᵀ [N × out].
        let dw = GemmSpec {
            m: d_in as u64,
            n: d_out as u64,
            k: n as u64,
            trans_a: false,
            trans_b: true,
            lda: d_in as i64,
            ldb: stride as i64,
            ldc: d_in as i64,
            ab: c,
            c: self.grad,
            accumulate: acc,
        };
        // SAFETY: shapes checked above; the block's rows lie inside dy.
        unsafe {
            self.gemm_scaled(dx, a.s, a.w.ptr, dy0, a.dx.ptr)?;
            self.gemm_scaled(dw, a.s, a.x.ptr, dy0, a.d_w.ptr)
        }
    }

    /// y, x: `[n]` (Compute).
    pub(crate) fn dropout_impl(&self, a: Dropout<'_, Self>) -> Result<()> {
        let op = "dropout";
        let (n, p, seed, write) = (a.n, a.p, a.seed, a.write);
        let (y, x) = (a.y, a.x);
        if !(0.0..1.0).contains(&p) {
            return Err(BackendError::Shape {
                op,
                what: format!("the drop probability {p} is outside [0, 1)"),
            });
        }
        want(op, "y", &y, self.compute, n)?;
        want(op, "x", &x, self.compute, n)?;
        if n == 0 {
            return Ok(());
        }
        let prm = DropoutParams {
            y: y.ptr,
            x: x.ptr,
            n: n as i64,
            seed,
            threshold: dropout_threshold(p),
            keep_scale: dropout_scale(p) as f32,
            accumulate: (write == GradWrite::Accumulate) as i32,
        };
        // SAFETY: y and x hold at least n elements of the compute type (checked above).
        unsafe { self.launch(ADAPTER, self.compute, "dropout", stride_launch(n), &prm) }
    }

    /// y: `[n]` Compute; codes, scale_codes: Code8; absmax: Master (see [`DequantNf4`]).
    pub(crate) fn dequant_nf4_impl(&self, a: DequantNf4<'_, Self>) -> Result<()> {
        let op = "dequant_nf4";
        let n = a.n;
        let (codes, blocks, absmax) = crate::nf4::nf4_lens(n);
        want(op, "y", &a.y, self.compute, n)?;
        want(op, "codes", &a.codes, Dtype::U8, codes)?;
        want(op, "scale_codes", &a.scale_codes, Dtype::U8, blocks)?;
        want(op, "absmax", &a.absmax, Dtype::F32, absmax)?;
        if n == 0 {
            return Ok(());
        }
        let p = DequantNf4Params {
            y: a.y.ptr,
            codes: a.codes.ptr,
            scale_codes: a.scale_codes.ptr,
            absmax: a.absmax.ptr,
            n: n as i64,
            mean_at: absmax as i64 - 1,
            nf4: crate::nf4::NF4,
            map: crate::codes::code_map(true),
        };
        // The wide kernel where its loads and stores are aligned (every projection of a Llama
        // shape: n a multiple of 64, buffers 256-byte aligned, the site's matrices at offsets
        // that are multiples of n).
        let wide =
            n.is_multiple_of(8) && a.y.ptr.is_multiple_of(16) && a.codes.ptr.is_multiple_of(4);
        let (kernel, threads) = match wide {
            true => ("dequant_nf4_x8", n / 8),
            false => (op, codes),
        };
        // SAFETY: every view holds what n elements need (checked above); the wide kernel's
        // alignment is checked just above.
        unsafe { self.launch(ADAPTER, self.compute, kernel, stride_launch(threads), &p) }
    }
}
