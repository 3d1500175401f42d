//! Launchers of `elementwise.cu` (residual adds, scaling) and of the sum of squares in
//! `reduce.cu`.
//! Both work on either element type: the module is chosen by the views' type, so Master (fp32)
//! gradient buffers can be added and measured in mixed precision too.

use super::compile::{Launch, ELEMENTWISE, REDUCE};
use super::{want, Cuda, CudaMut, CudaRef, Dtype};
use crate::Result;

/// Mirrors `AddParams` in elementwise.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct AddParams {
    out: u64,
    a: u64,
    b: u64,
    n: i64,
}

/// Mirrors `ScaleParams` in elementwise.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct ScaleParams {
    x: u64,
    n: i64,
    s: f32,
}

/// Mirrors `SumSquaresParams` in reduce.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SumSquaresParams {
    x: u64,
    partial: u64,
    n: i64,
}

/// Grid of a grid-stride elementwise kernel: enough blocks to fill the device, no more.
/// Whether the `*_v8` kernels (8 elements per 16-byte access) may run: every address 16-byte
/// aligned and every row length (in elements) a multiple of 8.
pub(crate) fn v8_ok(ptrs: &[u64], lens: &[usize]) -> bool {
    ptrs.iter().all(|p| p.is_multiple_of(16)) && lens.iter().all(|l| l.is_multiple_of(8))
}

/// A kernel name with `_v8` appended when `v8`.
pub(crate) fn v8_name(base: &'static str, v8: bool) -> String {
    if v8 {
        format!("{base}_v8")
    } else {
        base.to_string()
    }
}

pub(crate) fn stride_launch(n: usize) -> Launch {
    let mut cfg = Launch::flat(n, 256);
    cfg.grid.0 = cfg.grid.0.min(132 * 16);
    cfg
}

impl Cuda {
    /// `out = a + b` (`b` given) or `out += a`; out, a, b: `[n]` of one element type.
    pub(crate) fn add_impl(
        &self,
        out: CudaMut<'_>,
        a: CudaRef<'_>,
        b: Option<CudaRef<'_>>,
        n: usize,
    ) -> Result<()> {
        let op = if b.is_some() { "add" } else { "add_assign" };
        let t = out.dtype;
        want(op, "out", &out, t, n)?;
        want(op, "a", &a, t, n)?;
        if let Some(b) = &b {
            want(op, "b", b, t, n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let p = AddParams {
            out: out.ptr,
            a: a.ptr,
            b: b.as_ref().map_or(0, |b| b.ptr),
            n: n as i64,
        };
        let v8 = v8_ok(&[p.out, p.a, b.as_ref().map_or(0, |b| b.ptr)], &[n]);
        let threads = if v8 { n / 8 } else { n };
        // SAFETY: out, a (and b) hold at least n elements of type `t` (checked above); the v8
        // kernels only on aligned views.
        unsafe { self.launch(ELEMENTWISE, t, &v8_name(op, v8), stride_launch(threads), &p) }
    }

    /// `x *= s`; x: `[n]` of either element type, fp32 arithmetic.
    pub(crate) fn scale_impl(&self, x: CudaMut<'_>, s: f32, n: usize) -> Result<()> {
        want("scale", "x", &x, x.dtype, n)?;
        if n == 0 {
            return Ok(());
        }
        let p = ScaleParams {
            x: x.ptr,
            n: n as i64,
            s,
        };
        // SAFETY: x holds at least n elements of its type (checked above).
        unsafe { self.launch(ELEMENTWISE, x.dtype, "scale", stride_launch(n), &p) }
    }

    /// `Σ x[i]²` over `i < n`: per-block fp64 partials, added on the host in a fixed order.
    pub(crate) fn sum_squares_impl(&self, x: CudaRef<'_>, n: usize) -> Result<f64> {
        want("sum_squares", "x", &x, x.dtype, n)?;
        if n == 0 {
            return Ok(0.0);
        }
        let cfg = {
            let mut c = Launch::flat(n, 256);
            c.grid.0 = c.grid.0.min(1024);
            c
        };
        let blocks = cfg.grid.0 as usize;
        // fp64 partials live in a buffer of 2·blocks fp32 slots.
        let partial = self.scratch(2 * blocks, Dtype::F32)?;
        let p = SumSquaresParams {
            x: x.ptr,
            partial: partial.ptr,
            n: n as i64,
        };
        // SAFETY: x holds n elements; partial holds `blocks` f64.
        unsafe { self.launch(REDUCE, x.dtype, "sum_squares", cfg, &p)? };
        let mut host = vec![0f64; blocks];
        let s = self.raw_stream();
        let err = self.device_err("sum_squares (read partials)");
        // SAFETY: `partial` holds `blocks` f64 written by the kernel; synchronised before use.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut host, partial.ptr, s).map_err(&err)?;
            cudarc::driver::result::stream::synchronize(s).map_err(&err)?;
        }
        Ok(host.iter().sum())
    }
}
