//! Launcher of `rope.cu`: rotary embedding in place on the strided `qkv` buffer, with per-token
//! positions; the backward is the same kernel with the angle negated.

use super::compile::ROPE;
use super::elementwise::{stride_launch, v8_name, v8_ok};
use super::{want, Cuda, Dtype};
use crate::args::Rope;
use crate::error::check;
use crate::{Result, RopeDims};

/// Mirrors `RopeParams` in rope.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct RopeParams {
    x: u64,
    inv_freq: u64,
    positions: u64,
    n: i32,
    row_stride: i32,
    n_rot_heads: i32,
    head_dim: i32,
    sign: f32,
}

impl Cuda {
    /// x: N rows of `row_stride` Compute, the first `n_rot_heads·Dh` of each rotated;
    /// inv_freq: `[Dh/2]` fp32; positions: `[N]`. `sign` = 1 forward, -1 backward.
    pub(crate) fn rope_impl(&self, a: Rope<'_, Self>, sign: f32) -> Result<()> {
        let Rope {
            x,
            inv_freq,
            positions,
            dims,
        } = a;
        let op = if sign > 0.0 {
            "rope_forward"
        } else {
            "rope_backward"
        };
        let RopeDims {
            n,
            row_stride,
            n_rot_heads,
            head_dim,
        } = dims;
        check(head_dim % 2 == 0, op, || format!("odd head_dim {head_dim}"))?;
        check(n_rot_heads * head_dim <= row_stride, op, || {
            format!("{n_rot_heads} heads of {head_dim} do not fit a row of {row_stride}")
        })?;
        check(positions.host.len() >= n, op, || {
            format!("{} positions for n = {n}", positions.host.len())
        })?;
        if n == 0 || n_rot_heads == 0 || head_dim == 0 {
            return Ok(());
        }
        want(
            op,
            "x",
            &x,
            self.compute,
            (n - 1) * row_stride + n_rot_heads * head_dim,
        )?;
        want(op, "inv_freq", &inv_freq, Dtype::F32, head_dim / 2)?;
        let p = RopeParams {
            x: x.ptr,
            inv_freq: inv_freq.ptr,
            positions: positions.dev.ptr,
            n: n as i32,
            row_stride: row_stride as i32,
            n_rot_heads: n_rot_heads as i32,
            head_dim: head_dim as i32,
            sign,
        };
        let total = n * n_rot_heads * head_dim / 2;
        let v8 = v8_ok(&[p.x], &[head_dim / 2, row_stride]);
        let threads = if v8 { total / 8 } else { total };
        let name = v8_name("rope", v8);
        // SAFETY: shapes checked above; the v8 kernel only on aligned rows.
        unsafe { self.launch(ROPE, self.compute, &name, stride_launch(threads), &p) }
    }
}
