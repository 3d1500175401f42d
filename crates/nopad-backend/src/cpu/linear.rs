//! GEMM-based ops on the CPU: linear layers and the fused output head + cross-entropy.

use gemm::Parallelism;
use rayon::prelude::*;

use super::{check_len, clear, Cpu, Scalar, ROW_CHUNK};
use crate::args::{LinearBwd, LinearFwd, LmHeadLoss};
use crate::error::check;
use crate::{GradWrite, LinearDims, Result};

/// A strided matrix operand: element (i, j) is at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `[rows, cols]` matrix.
    pub(crate) fn rows(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose `[cols, rows]` of a row-major `[rows, cols]` matrix.
    pub(crate) fn transposed(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
}

/// How many threads a [`gemm`] may use.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Rayon's pool when the product is large, else the calling thread.
    Auto,
    /// The calling thread only (for use inside parallel tasks).
    One,
}

/// `dst[m, n] (row-major, row stride ldd) = (accumulate ? dst : 0) + scale · a[m, k] · b[k, n]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: Scalar>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    ldd: usize,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
    scale: T,
    threads: Threads,
) {
    // Small products are faster on one thread; the threshold only changes speed, never results
    // (gemm's blocking does not depend on the thread count).
    let par = if threads == Threads::Auto && m * n * k >= 1 << 18 {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * ldd + n, "gemm: dst too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ldd..r * ldd + n].fill(T::ZERO);
            }
        }
        return;
    }
    let last =
        |mat: Mat<'_, T>, rows: usize, cols: usize| (rows - 1) * mat.rs + (cols - 1) * mat.cs;
    assert!(a.data.len() > last(a, m, k), "gemm: lhs too small");
    assert!(b.data.len() > last(b, k, n), "gemm: rhs too small");
    // SAFETY: the asserts above keep every element gemm touches inside the slices; dst does not
    // alias a or b (a &mut and two & borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

fn check_linear<T>(op: &'static str, dims: LinearDims, x: &[T], w: &[T]) -> Result<()> {
    check_len(op, "x", x.len(), dims.n * dims.d_in)?;
    check_len(op, "w", w.len(), dims.d_out * dims.d_in)
}

pub(crate) fn linear_forward<T: Scalar>(a: LinearFwd<'_, Cpu<T>>) -> Result<()> {
    let LinearFwd { y, x, w, b, dims } = a;
    let LinearDims { n, d_in, d_out } = dims;
    check_linear("linear_forward", dims, x, w)?;
    check_len("linear_forward", "y", y.len(), n * d_out)?;
    let xm = Mat::rows(x, d_in);
    let wt = Mat::transposed(w, d_in); // wᵀ: [d_in, d_out]
    gemm(
        n,
        d_out,
        d_in,
        y,
        d_out,
        xm,
        wt,
        false,
        T::ONE,
        Threads::Auto,
    );
    if let Some(b) = b {
        check_len("linear_forward", "b", b.len(), d_out)?;
        y[..n * d_out]
            .par_chunks_mut(d_out)
            .for_each(|row| row.iter_mut().zip(b).for_each(|(o, &bb)| *o += bb));
    }
    Ok(())
}

/// Column sums `out[j] += Σ_r x[r, j]`, in a fixed order (chunks of rows, then chunk partials).
pub(crate) fn add_column_sums<T: Scalar>(out: &mut [T], x: &[T], rows: usize, cols: usize) {
    let partials: Vec<Vec<T>> = x[..rows * cols]
        .par_chunks(ROW_CHUNK * cols)
        .map(|chunk| {
            let mut acc = vec![T::ZERO; cols];
            for row in chunk.chunks(cols) {
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
            }
            acc
        })
        .collect();
    for p in partials {
        out[..cols].iter_mut().zip(&p).for_each(|(o, &v)| *o += v);
    }
}

pub(crate) fn linear_backward<T: Scalar>(a: LinearBwd<'_, Cpu<T>>) -> Result<()> {
    let LinearBwd {
        dx,
        dx_write,
        mut d_w,
        mut d_b,
        dy,
        x,
        w,
        dims,
        write,
    } = a;
    let LinearDims { n, d_in, d_out } = dims;
    clear(d_w.as_deref_mut(), d_out * d_in, write);
    clear(d_b.as_deref_mut(), d_out, write);
    check_linear("linear_backward", dims, x, w)?;
    check_len("linear_backward", "dy", dy.len(), n * d_out)?;
    if let Some(dx) = dx {
        check_len("linear_backward", "dx", dx.len(), n * d_in)?;
        let dym = Mat::rows(dy, d_out);
        let wm = Mat::rows(w, d_in);
        let acc = dx_write == GradWrite::Accumulate;
        gemm(
            n,
            d_in,
            d_out,
            dx,
            d_in,
            dym,
            wm,
            acc,
            T::ONE,
            Threads::Auto,
        );
    }
    // A frozen weight (no d_w) skips this GEMM, the larger half of the backward's work.
    if let Some(d_w) = d_w {
        check_len("linear_backward", "d_w", d_w.len(), d_out * d_in)?;
        let dyt = Mat::transposed(dy, d_out); // dyᵀ: [d_out, n]
        let xm = Mat::rows(x, d_in);
        gemm(
            d_out,
            d_in,
            n,
            d_w,
            d_in,
            dyt,
            xm,
            true,
            T::ONE,
            Threads::Auto,
        );
    }
    if let Some(d_b) = d_b {
        check_len("linear_backward", "d_b", d_b.len(), d_out)?;
        add_column_sums(d_b, dy, n, d_out);
    }
    Ok(())
}

/// Rows per chunk of the fused head: bounds the logits held at once to `chunk · V` values.
fn head_chunk_rows(v: usize) -> usize {
    ((1usize << 22) / v.max(1)).clamp(16, 1024)
}

pub(crate) fn lm_head_loss<T: Scalar>(a: LmHeadLoss<'_, Cpu<T>>) -> Result<()> {
    const OP: &str = "lm_head_loss";
    let LmHeadLoss {
        loss_sum,
        mut dx,
        mut d_w,
        x,
        w,
        targets,
        dims,
        grad_scale,
        write,
    } = a;
    clear(d_w.as_deref_mut(), dims.d_out * dims.d_in, write);
    let LinearDims {
        n,
        d_in: d,
        d_out: v,
    } = dims;
    check_linear(OP, dims, x, w)?;
    check_len(OP, "targets", targets.len(), n)?;
    check_len(OP, "loss_sum", loss_sum.len(), 1)?;
    if let Some(dx) = dx.as_deref_mut() {
        check_len(OP, "dx", dx.len(), n * d)?;
        dx[..n * d].fill(T::ZERO);
    }
    if let Some(dw) = d_w.as_deref() {
        check_len(OP, "d_w", dw.len(), v * d)?;
    }
    // Only rows with a target reach the head: prompt rows cost nothing.
    let mut rows = Vec::new();
    for (t, &tg) in targets[..n].iter().enumerate() {
        if tg != -100 {
            check(tg >= 0 && (tg as usize) < v, OP, || {
                format!("target {tg} at row {t} is outside the vocabulary of {v}")
            })?;
            rows.push(t);
        }
    }
    let backward = dx.is_some() || d_w.is_some();
    let scale = T::from_f32(grad_scale);
    let chunk = head_chunk_rows(v);
    let mut xc = vec![T::ZERO; chunk.min(rows.len()) * d];
    let mut logits = vec![T::ZERO; chunk.min(rows.len()) * v];
    let mut total = 0.0f64;
    for rows in rows.chunks(chunk) {
        let c = rows.len();
        for (i, &t) in rows.iter().enumerate() {
            xc[i * d..(i + 1) * d].copy_from_slice(&x[t * d..(t + 1) * d]);
        }
        let xm = Mat::rows(&xc, d);
        let wt = Mat::transposed(w, d);
        gemm(
            c,
            v,
            d,
            &mut logits,
            v,
            xm,
            wt,
            false,
            T::ONE,
            Threads::Auto,
        );
        // Per-row loss; in backward the logits row becomes scale · (softmax − onehot).
        let losses: Vec<f64> = logits[..c * v]
            .par_chunks_mut(v)
            .zip(rows.par_iter())
            .map(|(row, &t)| {
                let tg = targets[t] as usize;
                let m = row.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
                let mut s = T::ZERO;
                for &l in row.iter() {
                    s += (l - m).exp();
                }
                let lse = m + s.ln();
                let loss = (lse - row[tg]).to_f64();
                if backward {
                    for l in row.iter_mut() {
                        *l = (*l - lse).exp() * scale;
                    }
                    row[tg] -= scale;
                }
                loss
            })
            .collect();
        total += losses.iter().sum::<f64>();
        if !backward {
            continue;
        }
        // d_w first, while the chunk buffer still holds the inputs; then dx rows = dlogits · w,
        // computed into the chunk buffer and scattered.
        if let Some(dw) = d_w.as_deref_mut() {
            let dlt = Mat::transposed(&logits, v);
            let xm = Mat::rows(&xc, d);
            gemm(v, d, c, dw, d, dlt, xm, true, T::ONE, Threads::Auto);
        }
        if let Some(dx) = dx.as_deref_mut() {
            let dl = Mat::rows(&logits, v);
            let wm = Mat::rows(w, d);
            gemm(c, d, v, &mut xc, d, dl, wm, false, T::ONE, Threads::Auto);
            for (i, &t) in rows.iter().enumerate() {
                dx[t * d..(t + 1) * d].copy_from_slice(&xc[i * d..(i + 1) * d]);
            }
        }
    }
    loss_sum[0] += T::from_f64(total);
    Ok(())
}
