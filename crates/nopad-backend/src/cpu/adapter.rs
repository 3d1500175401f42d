//! The ops a low-rank adapter adds on the CPU: its up-projection added into (and its backward
//! read from) columns of a fused projection, seeded dropout, and the dequantisation of an
//! NF4 base weight (QLoRA).

use rayon::prelude::*;

use super::linear::{gemm, Mat, Threads};
use super::{check_len, Cpu, Scalar};
use crate::args::{ColumnsLinearBwd, ColumnsLinearFwd, DequantNf4, Dropout};
use crate::error::check;
use crate::{dropout_keep, dropout_scale, dropout_threshold, GradWrite, Result};

/// `y[:, c0..c0 + out] += s · x · wᵀ` (see [`ColumnsLinearFwd`]).
pub(crate) fn columns_linear_forward<T: Scalar>(a: ColumnsLinearFwd<'_, Cpu<T>>) -> Result<()> {
    const OP: &str = "columns_linear_forward";
    let (n, stride, c0, d_in, d_out) = a.block.dims();
    let (ylen, xlen, wlen) = a.block.lens(OP)?;
    check_len(OP, "y", a.y.len(), ylen)?;
    check_len(OP, "x", a.x.len(), xlen)?;
    check_len(OP, "w", a.w.len(), wlen)?;
    if n * d_out == 0 {
        return Ok(());
    }
    let (xm, wt) = (Mat::rows(a.x, d_in), Mat::transposed(a.w, d_in));
    let s = T::from_f32(a.s);
    gemm(
        n,
        d_out,
        d_in,
        &mut a.y[c0..],
        stride,
        xm,
        wt,
        true,
        s,
        Threads::Auto,
    );
    Ok(())
}

/// `dt = s · dy[:, c0..c0 + out]`: `dx = dt · w`, `d_w (+)= dtᵀ · x` (see [`ColumnsLinearBwd`]).
pub(crate) fn columns_linear_backward<T: Scalar>(a: ColumnsLinearBwd<'_, Cpu<T>>) -> Result<()> {
    const OP: &str = "columns_linear_backward";
    let (n, stride, c0, d_in, d_out) = a.block.dims();
    let (ylen, xlen, wlen) = a.block.lens(OP)?;
    check_len(OP, "dy", a.dy.len(), ylen)?;
    check_len(OP, "x", a.x.len(), xlen)?;
    check_len(OP, "dx", a.dx.len(), xlen)?;
    check_len(OP, "w", a.w.len(), wlen)?;
    check_len(OP, "d_w", a.d_w.len(), wlen)?;
    let s = T::from_f32(a.s);
    let acc = a.write == GradWrite::Accumulate;
    if n == 0 || d_out == 0 {
        // No rows (or no columns): dx is zero, and an overwritten d_w too.
        a.dx[..xlen].fill(T::ZERO);
        if !acc {
            a.d_w[..wlen].fill(T::ZERO);
        }
        return Ok(());
    }
    let dy = &a.dy[c0..];
    let dym = Mat {
        data: dy,
        rs: stride,
        cs: 1,
    };
    gemm(
        n,
        d_in,
        d_out,
        a.dx,
        d_in,
        dym,
        Mat::rows(a.w, d_in),
        false,
        s,
        Threads::Auto,
    );
    let dyt = Mat {
        data: dy,
        rs: 1,
        cs: stride,
    };
    gemm(
        d_out,
        d_in,
        n,
        a.d_w,
        d_in,
        dyt,
        Mat::rows(a.x, d_in),
        acc,
        s,
        Threads::Auto,
    );
    Ok(())
}

pub(crate) fn dropout<T: Scalar>(a: Dropout<'_, Cpu<T>>) -> Result<()> {
    const OP: &str = "dropout";
    let (n, p, seed, write) = (a.n, a.p, a.seed, a.write);
    let (y, x) = (a.y, a.x);
    check((0.0..1.0).contains(&p), OP, || {
        format!("the drop probability {p} is outside [0, 1)")
    })?;
    check_len(OP, "y", y.len(), n)?;
    check_len(OP, "x", x.len(), n)?;
    let (thr, keep) = (dropout_threshold(p), T::from_f64(dropout_scale(p)));
    y[..n]
        .par_iter_mut()
        .zip(x[..n].par_iter())
        .enumerate()
        .with_min_len(1 << 12)
        .for_each(|(i, (o, &v))| {
            let m = if dropout_keep(seed, i as u64, thr) {
                v * keep
            } else {
                T::ZERO
            };
            match write {
                GradWrite::Overwrite => *o = m,
                GradWrite::Accumulate => *o += m,
            }
        });
    Ok(())
}

/// An NF4 matrix read into values of `T` (see [`DequantNf4`]): [`crate::nf4::dequant_value`]
/// per element, in f32, then converted.
pub(crate) fn dequant_nf4<T: Scalar>(a: DequantNf4<'_, Cpu<T>>) -> Result<()> {
    const OP: &str = "dequant_nf4";
    let n = a.n;
    let (codes, blocks, absmax) = crate::nf4::nf4_lens(n);
    check_len(OP, "y", a.y.len(), n)?;
    check_len(OP, "codes", a.codes.len(), codes)?;
    check_len(OP, "scale_codes", a.scale_codes.len(), blocks)?;
    check_len(OP, "absmax", a.absmax.len(), absmax)?;
    // Code8 holds each byte as a number on the CPU.
    let bytes = |v: &[T]| -> Vec<u8> { v.iter().map(|x| x.to_f32() as u8).collect() };
    let (c, sc) = (bytes(&a.codes[..codes]), bytes(&a.scale_codes[..blocks]));
    let am: Vec<f32> = a.absmax[..absmax].iter().map(|x| x.to_f32()).collect();
    let map = crate::codes::code_map(true);
    a.y[..n]
        .par_chunks_mut(crate::nf4::NF4_BLOCK)
        .enumerate()
        .for_each(|(blk, ys)| {
            let i0 = blk * crate::nf4::NF4_BLOCK;
            for (j, y) in ys.iter_mut().enumerate() {
                *y = T::from_f32(crate::nf4::dequant_value(&map, &c, &sc, &am, i0 + j));
            }
        });
    Ok(())
}
