//! Linear layers: row-major GEMMs mapped onto cuBLASLt's column-major convention, the bias
//! epilogue (`linear.cu`) and the deterministic bias gradient (`reduce.cu`).
//!
//! Row-major `y[N, out] = x[N, in] · w[out, in]ᵀ` is, column-major, `yᵀ = w · xᵀ` with `w` read
//! transposed from its stored `[in, out]` column-major image; the backward products follow the
//! same rule. `d_w` accumulates in fp32 (beta = 1) from Compute `dy` and `x`.

use super::blas::GemmSpec;
use super::compile::{Launch, LINEAR, REDUCE};
use super::elementwise::stride_launch;
use super::{want, Cuda, Dtype};
use crate::args::{LinearBwd, LinearFwd};
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

/// The row-major shape of one of a linear layer's products: `rows` tokens, `[out, in]`
/// weights, and the distance between consecutive rows of `dy` (`d_out` when packed; the output
/// head's dlogits rows lie further apart).
#[derive(Clone, Copy)]
pub(crate) struct GemmRows {
    pub rows: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub ld_dy: usize,
}

impl GemmRows {
    /// Packed rows of a `[rows, in] → [rows, out]` layer.
    pub(crate) fn packed(dims: LinearDims) -> Self {
        GemmRows {
            rows: dims.n,
            d_in: dims.d_in,
            d_out: dims.d_out,
            ld_dy: dims.d_out,
        }
    }
}

impl Cuda {
    /// Runs one column-major GEMM (see `blas.rs`) on the backend's stream.
    ///
    /// # Safety
    /// The pointers must hold the matrices `spec` names.
    unsafe fn gemm(&self, spec: GemmSpec, a: u64, b: u64, c: u64) -> Result<()> {
        self.gemm_scaled(spec, 1.0, a, b, c)
    }

    /// [`Cuda::gemm`] with `C = alpha · op(A) · op(B) (+ C)`.
    ///
    /// # Safety
    /// As [`Cuda::gemm`].
    pub(crate) unsafe fn gemm_scaled(
        &self,
        spec: GemmSpec,
        alpha: f32,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(self.device_err("cuBLASLt (bind context)"))?;
        self.blas.gemm(spec, alpha, a, b, c, self.raw_stream())
    }

    /// `y[rows, out] = x[rows, in] · w[out, in]ᵀ`; `y` of type `y_type`.
    ///
    /// # Safety
    /// The pointers must hold the matrices named (row-major, dense).
    pub(crate) unsafe fn gemm_x_wt(
        &self,
        y: u64,
        x: u64,
        w: u64,
        s: GemmRows,
        y_type: Dtype,
    ) -> Result<()> {
        let spec = GemmSpec {
            m: s.d_out as u64,
            n: s.rows as u64,
            k: s.d_in as u64,
            trans_a: true,
            trans_b: false,
            lda: s.d_in as i64,
            ldb: s.d_in as i64,
            ldc: s.d_out as i64,
            ab: self.compute,
            c: y_type,
            accumulate: false,
        };
        self.gemm(spec, w, x, y)
    }

    /// `dx[rows, in] (+)= dy[rows, out] · w[out, in]` (Compute output, `+=` as `acc` says).
    ///
    /// # Safety
    /// As [`Cuda::gemm_x_wt`].
    pub(crate) unsafe fn gemm_dy_w(
        &self,
        dx: u64,
        dy: u64,
        w: u64,
        s: GemmRows,
        acc: GradWrite,
    ) -> Result<()> {
        let spec = GemmSpec {
            m: s.d_in as u64,
            n: s.rows as u64,
            k: s.d_out as u64,
            trans_a: false,
            trans_b: false,
            lda: s.d_in as i64,
            ldb: s.ld_dy as i64,
            ldc: s.d_in as i64,
            ab: self.compute,
            c: self.compute,
            accumulate: acc == GradWrite::Accumulate,
        };
        self.gemm(spec, w, dy, dx)
    }

    /// `d_w[out, in] (+)= dy[rows, out]ᵀ · x[rows, in]` (`d_w` of the gradient type).
    ///
    /// # Safety
    /// As [`Cuda::gemm_x_wt`].
    pub(crate) unsafe fn gemm_dyt_x(
        &self,
        d_w: u64,
        dy: u64,
        x: u64,
        s: GemmRows,
        acc: GradWrite,
    ) -> Result<()> {
        let spec = GemmSpec {
            m: s.d_in as u64,
            n: s.d_out as u64,
            k: s.rows as u64,
            trans_a: false,
            trans_b: true,
            lda: s.d_in as i64,
            ldb: s.ld_dy as i64,
            ldc: s.d_in as i64,
            ab: self.compute,
            c: self.grad,
            accumulate: acc == GradWrite::Accumulate,
        };
        self.gemm(spec, x, dy, d_w)
    }

    pub(crate) fn linear_forward_impl(&self, a: LinearFwd<'_, Self>) -> Result<()> {
        let LinearFwd { y, x, w, b, dims } = a;
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
            unsafe { self.gemm_x_wt(y.ptr, x.ptr, w.ptr, GemmRows::packed(dims), c)? };
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

    pub(crate) fn linear_backward_impl(&self, a: LinearBwd<'_, Self>) -> Result<()> {
        let LinearBwd {
            dx,
            dx_write,
            d_w,
            d_b,
            dy,
            x,
            w,
            dims,
            write: acc,
        } = a;
        let op = "linear_backward";
        let LinearDims { n, d_in, d_out } = dims;
        let c = self.compute;
        if let Some(dx) = &dx {
            want(op, "dx", dx, c, n * d_in)?;
        }
        if let Some(d_w) = &d_w {
            want(op, "d_w", d_w, self.grad, d_out * d_in)?;
        }
        if let Some(d_b) = &d_b {
            want(op, "d_b", d_b, self.grad, d_out)?;
        }
        want(op, "dy", &dy, c, n * d_out)?;
        want(op, "x", &x, c, n * d_in)?;
        want(op, "w", &w, c, d_out * d_in)?;
        if n == 0 {
            // Nothing to add; an overwrite still has to leave zeros.
            if acc == GradWrite::Overwrite {
                for (g, len) in [(&d_w, d_out * d_in), (&d_b, d_out)] {
                    if let Some(g) = g {
                        self.zero_raw(g.ptr, len, self.grad)?;
                    }
                }
            }
            return Ok(());
        }
        let shape = GemmRows::packed(dims);
        if let Some(dx) = dx {
            if d_out == 0 {
                if dx_write == GradWrite::Overwrite {
                    self.zero_raw(dx.ptr, n * d_in, c)?;
                }
            } else if d_in > 0 {
                // SAFETY: shapes checked above.
                unsafe { self.gemm_dy_w(dx.ptr, dy.ptr, w.ptr, shape, dx_write)? };
            }
        }
        // A frozen weight (no d_w) skips this GEMM, the larger half of the backward's work.
        if let Some(d_w) = d_w.filter(|_| d_in > 0 && d_out > 0) {
            // SAFETY: shapes checked above.
            unsafe { self.gemm_dyt_x(d_w.ptr, dy.ptr, x.ptr, shape, acc)? };
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
        let cfg = Launch::blocks(cols.div_ceil(256), splits);
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
                Launch::blocks(cols.div_ceil(32), 1),
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
