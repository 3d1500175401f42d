//! Launchers of `adapter.cu`: an adapter's output added into columns of a fused projection, its
//! gradient gathered from them, and seeded dropout (the mask of `crate::dropout`).

use super::compile::ADAPTER;
use super::elementwise::stride_launch;
use super::{want, Cuda};
use crate::args::{AddColumns, Dropout, GatherColumns};
use crate::{dropout_scale, dropout_threshold, BackendError, GradWrite, Result};

/// Mirrors `ColumnsParams` in adapter.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct ColumnsParams {
    dst: u64,
    src: u64,
    n: i64,
    stride: i64,
    c0: i64,
    w: i64,
    s: f32,
}

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

fn check_cols(op: &'static str, stride: usize, c0: usize, w: usize) -> Result<()> {
    if c0 + w > stride {
        return Err(BackendError::Shape {
            op,
            what: format!("columns {c0}..{} exceed the row length {stride}", c0 + w),
        });
    }
    Ok(())
}

impl Cuda {
    /// y: `[n, stride]`, x: `[n, w]` (Compute).
    pub(crate) fn add_columns_impl(&self, a: AddColumns<'_, Self>) -> Result<()> {
        let AddColumns {
            y,
            x,
            n,
            stride,
            c0,
            w,
            s,
        } = a;
        let op = "add_columns";
        check_cols(op, stride, c0, w)?;
        want(op, "y", &y, self.compute, n * stride)?;
        want(op, "x", &x, self.compute, n * w)?;
        self.columns("add_columns", y.ptr, x.ptr, [n, stride, c0, w], s)
    }

    /// y: `[n, w]`, x: `[n, stride]` (Compute).
    pub(crate) fn gather_columns_impl(&self, a: GatherColumns<'_, Self>) -> Result<()> {
        let GatherColumns {
            y,
            x,
            n,
            stride,
            c0,
            w,
            s,
        } = a;
        let op = "gather_columns";
        check_cols(op, stride, c0, w)?;
        want(op, "y", &y, self.compute, n * w)?;
        want(op, "x", &x, self.compute, n * stride)?;
        self.columns("gather_columns", y.ptr, x.ptr, [n, stride, c0, w], s)
    }

    /// Launches `kernel` (`add_columns` or `gather_columns`) over `[n, w]`.
    fn columns(
        &self,
        kernel: &str,
        dst: u64,
        src: u64,
        [n, stride, c0, w]: [usize; 4],
        s: f32,
    ) -> Result<()> {
        if n * w == 0 {
            return Ok(());
        }
        let p = ColumnsParams {
            dst,
            src,
            n: n as i64,
            stride: stride as i64,
            c0: c0 as i64,
            w: w as i64,
            s,
        };
        // SAFETY: the caller checked that both views hold their [n, ·] rows and that the
        // columns lie inside the wide one.
        unsafe { self.launch(ADAPTER, self.compute, kernel, stride_launch(n * w), &p) }
    }

    /// y, x: `[n]` (Compute).
    pub(crate) fn dropout_impl(&self, a: Dropout<'_, Self>) -> Result<()> {
        let Dropout {
            y,
            x,
            n,
            p,
            seed,
            write,
        } = a;
        let op = "dropout";
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
}
