//! Linear layers: row-major GEMMs mapped onto cuBLASLt's column-major convention, the bias
//! epilogue (`linear.cu`) and the deterministic bias gradient (`reduce.cu`).
//!
//! Row-major `y[N, out] = x[N, in] · w[out, in]ᵀ` is, column-major, `yᵀ = w · xᵀ` with `w` read
//! transposed from its stored `[in, out]` column-major image; the backward products follow the
//! same rule. `d_w` accumulates in fp32 (beta = 1) from Compute `dy` and `x`.

use super::blas::GemmSpec;
use super::compile::{Launch, LINEAR, REDUCE};
use super::elementwise::stride_launch;
use super::{want, Cuda, CudaMut, CudaRef, Dtype};
use crate::{GradWrite, LinearDims, Result};

/// Mirrors `BiasParams` in linear.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct BiasParams {
    y: u64,
    b: u64,
    n: i64,
    cols: i32,
}

/// Mirrors `ColsumParams` in reduce.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct ColsumParams {
    dy: u64,
    partial: u64,
    rows: i32,
    cols: i32,
    rows_per: i32,
}

/// Mirrors `FinishParams` in reduce.cu.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct FinishParams {
    pub out: u64,
    pub partial: u64,
    pub splits: i32,
    pub cols: i32,
    pub accumulate: i32,
}

/// Row splits of a two-stage column reduction over `rows` rows: enough blocks to fill the GPU,
/// each summing a contiguous run of rows.
pub(crate) fn row_splits(rows: usize) -> (usize, usize) {
    let splits = rows.div_ceil(64).clamp(1, 128);
    let rows_per = rows.div_ceil(splits).max(1);
    (rows.div_ceil(rows_per).max(1), rows_per)
}

impl Cuda {
    /// `y[rows, out] (+)= alpha · x[rows, in] · w[out, in]ᵀ`; `y` of type `y_type`.
    ///
    /// # Safety
    /// The pointers must hold the matrices named (row-major, dense).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_x_wt(
        &self,
        y: u64,
        x: u64,
        w: u64,
        rows: usize,
        d_in: usize,
        d_out: usize,
        y_type: Dtype,
    ) -> Result<()> {
        let spec = GemmSpec {
            m: d_out as u64,
            n: rows as u64,
            k: d_in as u64,
            trans_a: true,
            trans_b: false,
            lda: d_in as i64,
            ldb: d_in as i64,
            ldc: d_out as i64,
            ab: self.compute,
            c: y_type,
            accumulate: false,
        };
        self.ctx
            .bind_to_thread()
            .map_err(self.device_err("cuBLASLt (bind context)"))?;
        self.blas.gemm(spec, 1.0, w, x, y, self.raw_stream())
    }

    /// `dx[rows, in] = dy[rows, out] · w[out, in]` (Compute output); `dy`'s rows are `ld_dy`
    /// elements apart (`d_out` when packed).
    ///
    /// # Safety
    /// As [`Cuda::gemm_x_wt`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_dy_w(
        &self,
        dx: u64,
        dy: u64,
        w: u64,
        rows: usize,
        d_in: usize,
        d_out: usize,
        ld_dy: usize,
    ) -> Result<()> {
        let spec = GemmSpec {
            m: d_in as u64,
            n: rows as u64,
            k: d_out as u64,
            trans_a: false,
            trans_b: false,
            lda: d_in as i64,
            ldb: ld_dy as i64,
            ldc: d_in as i64,
            ab: self.compute,
            c: self.compute,
            accumulate: false,
        };
        self.ctx
            .bind_to_thread()
            .map_err(self.device_err("cuBLASLt (bind context)"))?;
        self.blas.gemm(spec, 1.0, w, dy, dx, self.raw_stream())
    }

    /// `d_w[out, in] (+)= alpha · dy[rows, out]ᵀ · x[rows, in]` (`d_w` of the gradient type;
    /// `dy`'s rows `ld_dy` elements apart).
    ///
    /// # Safety
    /// As [`Cuda::gemm_x_wt`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_dyt_x(
        &self,
        d_w: u64,
        dy: u64,
        x: u64,
        rows: usize,
        d_in: usize,
        d_out: usize,
        ld_dy: usize,
        alpha: f32,
        acc: GradWrite,
    ) -> Result<()> {
        let spec = GemmSpec {
            m: d_in as u64,
            n: d_out as u64,
            k: rows as u64,
            trans_a: false,
            trans_b: true,
            lda: d_in as i64,
            ldb: ld_dy as i64,
            ldc: d_in as i64,
            ab: self.compute,
            c: self.grad,
            accumulate: acc == GradWrite::Accumulate,
        };
        self.ctx
            .bind_to_thread()
            .map_err(self.device_err("cuBLASLt (bind context)"))?;
        self.blas.gemm(spec, alpha, x, dy, d_w, self.raw_stream())
    }

    pub(crate) fn linear_forward_impl(
        &self,
        y: CudaMut<'_>,
        x: CudaRef<'_>,
        w: CudaRef<'_>,
        b: Option<CudaRef<'_>>,
        dims: LinearDims,
    ) -> Result<()> {
        let op = "linear_forward";
        let LinearDims { n, d_in, d_out } = dims;
        let c = self.compute;
        want(op, "y", &y, c, n * d_out)?;
        want(op, "x", &x, c, n * d_in)?;
        want(op, "w", &w, c, d_out * d_in)?;
        if let Some(b) = &b {
            want(op, "b", b, c, d_out)?;
        }
        if n == 0 || d_out == 0 {
            return Ok(());
        }
        if d_in == 0 {
            self.zero_raw(y.ptr, n * d_out, c)?;
        } else {
            // SAFETY: shapes checked above.
            unsafe { self.gemm_x_wt(y.ptr, x.ptr, w.ptr, n, d_in, d_out, c)? };
        }
        if let Some(b) = b {
            let p = BiasParams {
                y: y.ptr,
                b: b.ptr,
                n: (n * d_out) as i64,
                cols: d_out as i32,
            };
            // SAFETY: y holds n·out and b out elements.
            unsafe { self.launch(LINEAR, c, "bias_add", stride_launch(n * d_out), &p)? };
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear_backward_impl(
        &self,
        dx: Option<CudaMut<'_>>,
        d_w: CudaMut<'_>,
        d_b: Option<CudaMut<'_>>,
        dy: CudaRef<'_>,
        x: CudaRef<'_>,
        w: CudaRef<'_>,
        dims: LinearDims,
        acc: GradWrite,
    ) -> Result<()> {
        let op = "linear_backward";
        let LinearDims { n, d_in, d_out } = dims;
        let c = self.compute;
        if let Some(dx) = &dx {
            want(op, "dx", dx, c, n * d_in)?;
        }
        want(op, "d_w", &d_w, self.grad, d_out * d_in)?;
        if let Some(d_b) = &d_b {
            want(op, "d_b", d_b, self.grad, d_out)?;
        }
        want(op, "dy", &dy, c, n * d_out)?;
        want(op, "x", &x, c, n * d_in)?;
        want(op, "w", &w, c, d_out * d_in)?;
        if n == 0 {
            // Nothing to add; an overwrite still has to leave zeros.
            if acc == GradWrite::Overwrite {
                self.zero_raw(d_w.ptr, d_out * d_in, self.grad)?;
                if let Some(d_b) = &d_b {
                    self.zero_raw(d_b.ptr, d_out, self.grad)?;
                }
            }
            return Ok(());
        }
        if let Some(dx) = dx {
            if d_out == 0 {
                self.zero_raw(dx.ptr, n * d_in, c)?;
            } else if d_in > 0 {
                // SAFETY: shapes checked above.
                unsafe { self.gemm_dy_w(dx.ptr, dy.ptr, w.ptr, n, d_in, d_out, d_out)? };
            }
        }
        if d_in > 0 && d_out > 0 {
            // SAFETY: shapes checked above.
            unsafe { self.gemm_dyt_x(d_w.ptr, dy.ptr, x.ptr, n, d_in, d_out, d_out, 1.0, acc)? };
        }
        if let Some(d_b) = d_b {
            self.column_sum_into(d_b.ptr, dy.ptr, n, d_out, acc)?;
        }
        Ok(())
    }

    /// `out[c] (+)= Σ_rows m[r, c]` for a Compute matrix `m: [rows, cols]`, `out` of the gradient
    /// type; two deterministic passes (row-split partials, then their sum).
    fn column_sum_into(
        &self,
        out: u64,
        m: u64,
        rows: usize,
        cols: usize,
        acc: GradWrite,
    ) -> Result<()> {
        if cols == 0 {
            return Ok(());
        }
        let (splits, rows_per) = row_splits(rows);
        let partial = self.scratch(splits * cols, Dtype::F32)?;
        let p = ColsumParams {
            dy: m,
            partial: partial.ptr,
            rows: rows as i32,
            cols: cols as i32,
            rows_per: rows_per as i32,
        };
        let cfg = Launch {
            grid: (cols.div_ceil(256) as u32, splits as u32, 1),
            block: 256,
            smem: 0,
        };
        // SAFETY: m holds rows·cols, partial splits·cols elements.
        unsafe { self.launch(REDUCE, self.compute, "colsum_partial", cfg, &p)? };
        self.finish_partials(out, &partial, splits, cols, acc)
    }

    /// `out[c] (+)= Σ_s partial[s, c]` (reduce.cu's `partials_finish`, fp32 throughout).
    pub(crate) fn finish_partials(
        &self,
        out: u64,
        partial: &super::CudaBuf,
        splits: usize,
        cols: usize,
        acc: GradWrite,
    ) -> Result<()> {
        let p = FinishParams {
            out,
            partial: partial.ptr,
            splits: splits as i32,
            cols: cols as i32,
            accumulate: (acc == GradWrite::Accumulate) as i32,
        };
        // SAFETY: partial holds splits·cols and out cols fp32 values.
        unsafe {
            self.launch(
                REDUCE,
                self.grad,
                "partials_finish",
                Launch {
                    grid: (cols.div_ceil(32) as u32, 1, 1),
                    block: 256,
                    smem: 0,
                },
                &p,
            )
        }
    }

    /// Zeroes `len` elements of type `t` at `ptr`.
    pub(crate) fn zero_raw(&self, ptr: u64, len: usize, t: Dtype) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the caller passes a live range of `len` elements.
        unsafe {
            cudarc::driver::result::memset_d8_async(ptr, 0, len * t.size(), self.raw_stream())
        }
        .map_err(self.device_err("cuMemsetD8Async"))
    }
}
