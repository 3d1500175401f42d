//! Launchers of `swiglu.cu`: `a = silu(gate) · up` over `gu: [N, 2F]` and its backward, which
//! overwrites `d_gu`.

use super::compile::SWIGLU;
use super::elementwise::{stride_launch, v8_name, v8_ok};
use super::{want, Cuda};
use crate::args::{SwigluBwd, SwigluFwd};
use crate::Result;

/// Mirrors `SwigluParams` in swiglu.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SwigluParams {
    out: u64,
    gu: u64,
    d_a: u64,
    n: i32,
    f: i32,
}

impl Cuda {
    /// a: `[n, f]`; gu: `[n, 2f]` (Compute).
    pub(crate) fn swiglu_forward_impl(&self, args: SwigluFwd<'_, Self>) -> Result<()> {
        let SwigluFwd { a, gu, n, f } = args;
        let op = "swiglu_forward";
        want(op, "a", &a, self.compute, n * f)?;
        want(op, "gu", &gu, self.compute, 2 * n * f)?;
        if n * f == 0 {
            return Ok(());
        }
        let p = SwigluParams {
            out: a.ptr,
            gu: gu.ptr,
            d_a: 0,
            n: n as i32,
            f: f as i32,
        };
        let v8 = v8_ok(&[p.out, p.gu, p.d_a], &[f]);
        let threads = if v8 { n * f / 8 } else { n * f };
        let name = v8_name("swiglu_fwd", v8);
        // SAFETY: shapes checked above; the v8 kernel only on aligned views.
        unsafe { self.launch(SWIGLU, self.compute, &name, stride_launch(threads), &p) }
    }

    /// gu: `[n, 2f]`, overwritten with its gradient; d_a: `[n, f]`.
    pub(crate) fn swiglu_backward_impl(&self, a: SwigluBwd<'_, Self>) -> Result<()> {
        let SwigluBwd { gu, d_a, n, f } = a;
        let op = "swiglu_backward";
        want(op, "d_a", &d_a, self.compute, n * f)?;
        want(op, "gu", &gu, self.compute, 2 * n * f)?;
        if n * f == 0 {
            return Ok(());
        }
        let p = SwigluParams {
            out: gu.ptr,
            gu: gu.ptr,
            d_a: d_a.ptr,
            n: n as i32,
            f: f as i32,
        };
        let v8 = v8_ok(&[p.out, p.gu, p.d_a], &[f]);
        let threads = if v8 { n * f / 8 } else { n * f };
        let name = v8_name("swiglu_bwd", v8);
        // SAFETY: shapes checked above; the v8 kernel only on aligned views.
        unsafe { self.launch(SWIGLU, self.compute, &name, stride_launch(threads), &p) }
    }
}
