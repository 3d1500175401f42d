//! Launchers of `adapter.cu`: an adapter's output added into columns of a fused projection, its
//! gradient gathered from them, seeded dropout (the mask of `crate::dropout`), and an NF4 base
//! weight dequantised ahead of its GEMM (the format of `crate::nf4`).

use super::compile::ADAPTER;
use super::elementwise::stride_launch;
use super::{want, Cuda, Dtype};
use crate::args::{Columns, DequantNf4, Dropout};
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
    /// An adapter's columns added in or gathered (see [`Columns`]); both views Compute.
    pub(crate) fn columns_impl(&self, a: Columns<'_, Self>) -> Result<()> {
        let [n, stride, c0, w] = a.rows;
        let (op, ylen, xlen) = a.lens()?;
        want(op, "y", &a.y, self.compute, ylen)?;
        want(op, "x", &a.x, self.compute, xlen)?;
        if n * w == 0 {
            return Ok(());
        }
        let p = ColumnsParams {
            dst: a.y.ptr,
            src: a.x.ptr,
            n: n as i64,
            stride: stride as i64,
            c0: c0 as i64,
            w: w as i64,
            s: a.s,
        };
        // SAFETY: both views hold their rows (checked above) and the columns lie inside the
        // wide ones.
        unsafe { self.launch(ADAPTER, self.compute, op, stride_launch(n * w), &p) }
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
        // SAFETY: every view holds what n elements need (checked above).
        unsafe { self.launch(ADAPTER, self.compute, op, stride_launch(codes), &p) }
    }
}
