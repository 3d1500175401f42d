//! The fused output head and cross-entropy, chunked so that fp32 logits exist for at most
//! `CHUNK_ELEMS` elements at once (about 1k rows at V = 128k), never `[N, V]`.
//!
//! Rows whose target is -100 are dropped on the host (prompt rows are often half the tokens):
//! the target rows are gathered into a compact `xc: [M, D]`, and per chunk of rows:
//! logits `[C, V]` fp32 = xc · wᵀ (cuBLASLt) → `cross_entropy` (loss per row in one pass over
//! the logits; dlogits in Compute type written over each row's own logits, so the backward
//! GEMMs read a Compute matrix whose rows are `4·V / size` elements apart and no second
//! `[C, V]` buffer exists) → `dxc = dlogits · w` and `d_w (+)= dlogitsᵀ · xc`. Finally `dx` is zeroed and the `dxc` rows
//! scattered back, and the per-row losses are summed in a fixed order into `loss_sum[0]`.

use super::compile::{Launch, LM_HEAD, REDUCE};
use super::linear::GemmRows;
use super::{want, Cuda, Dtype};
use crate::args::LmHeadLoss;
use crate::error::check;
use crate::Device;
use crate::{BackendError, GradWrite, LinearDims, Result};

/// Default largest logits chunk, in elements (512 MiB of fp32, ~1k rows at V = 128k). Each chunk
/// costs a read and a write of `d_w` (1 GiB in fp32 at V = 128k, D = 2048): on the H200, 256 MiB
/// chunks made the head 2.6 ms slower per 2.9k target rows than 1 GiB ones, which held 0.75 GiB
/// more (the chunk and, then, a separate bf16 copy for the dlogits).
pub(crate) const CHUNK_ELEMS: usize = 1 << 27;
/// The largest chunk when the head is frozen (no `d_w`, a LoRA run), 256 MiB of fp32 (~520 rows
/// at V = 128k): without the pass over `d_w` a chunk costs only its GEMMs, which at this many
/// rows do about 520 FLOPs per byte of `w` they read, above the H100's ratio of peak FLOPs to
/// bandwidth (about 295), so the extra reads of `w` should cost little (arithmetic; not timed
/// apart from the rest of BENCHMARKS row L8's changes).
pub(crate) const FROZEN_CHUNK_ELEMS: usize = 1 << 26;
/// Largest chunk, in rows.
const CHUNK_ROWS: usize = 8192;

/// Mirrors `RowsParams` in lm_head.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct RowsParams {
    dst: u64,
    src: u64,
    rows: u64,
    d: i32,
}

/// Mirrors `CrossEntropyParams` in lm_head.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct CrossEntropyParams {
    logits: u64,
    loss: u64,
    targets: u64,
    v: i32,
    grad: i32,
    grad_scale: f32,
}

/// Mirrors `SumIntoParams` in reduce.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SumIntoParams {
    out: u64,
    x: u64,
    n: i32,
}

impl Cuda {
    /// loss_sum: `[1]` fp32 (accumulated); dx: `[N, D]` Compute (overwritten); d_w: `[V, D]` of
    /// the gradient type (as `acc`); x: `[N, D]`; w: `[V, D]` Compute; targets: `[N]` (-100 = no target).
    pub(crate) fn lm_head_loss_impl(&self, a: LmHeadLoss<'_, Self>) -> Result<()> {
        let LmHeadLoss {
            loss_sum,
            dx,
            d_w,
            x,
            w,
            targets,
            dims,
            grad_scale,
            write: acc,
        } = a;
        let op = "lm_head_loss";
        let LinearDims {
            n,
            d_in: d,
            d_out: v,
        } = dims;
        let c = self.compute;
        want(op, "loss_sum", &loss_sum, Dtype::F32, 1)?;
        if let Some(dx) = &dx {
            want(op, "dx", dx, c, n * d)?;
        }
        if let Some(d_w) = &d_w {
            want(op, "d_w", d_w, self.grad, v * d)?;
        }
        want(op, "x", &x, c, n * d)?;
        want(op, "w", &w, c, v * d)?;
        check(targets.host.len() >= n, op, || {
            format!("{} targets for n = {n}", targets.host.len())
        })?;
        check(v > 0 && d > 0, op, || {
            format!("empty head: V = {v}, D = {d}")
        })?;

        // Compact the target rows on the host.
        let mut rows = Vec::new();
        let mut tgt = Vec::new();
        for (t, &y) in targets.host[..n].iter().enumerate() {
            if y == -100 {
                continue;
            }
            if y < 0 || y as usize >= v {
                return Err(BackendError::Shape {
                    op,
                    what: format!("target {y} at row {t} outside the vocabulary of {v}"),
                });
            }
            rows.push(t as i32);
            tgt.push(y);
        }
        if let Some(dx) = &dx {
            self.zero_raw(dx.ptr, n * d, c)?;
        }
        let m = rows.len();
        if m == 0 {
            if let (Some(d_w), GradWrite::Overwrite) = (&d_w, acc) {
                self.zero_raw(d_w.ptr, v * d, self.grad)?;
            }
            return Ok(());
        }
        let grad = dx.is_some() || d_w.is_some();
        let rows_dev = self.ints(&rows)?;
        let tgt_dev = self.ints(&tgt)?;
        let xc = self.scratch(m * d, c)?;
        let gather = RowsParams {
            dst: xc.ptr,
            src: x.ptr,
            rows: rows_dev.dev.ptr,
            d: d as i32,
        };
        // SAFETY: rows index valid rows of x; xc holds m·d.
        unsafe { self.launch(LM_HEAD, c, "gather_rows", Launch::per_row(m), &gather)? };

        // Equal chunks of at most the configured size: every chunk's d_w GEMM reads and writes
        // all of d_w (V·D fp32), so the count of chunks, not their size, sets that traffic.
        let elems = match d_w {
            Some(_) => self.lm_head_chunk_elems,
            None => self.lm_head_chunk_elems.min(FROZEN_CHUNK_ELEMS),
        };
        let max_rows = (elems / v).clamp(1, CHUNK_ROWS);
        let chunk = m.div_ceil(m.div_ceil(max_rows));
        let logits = self.scratch(chunk * v, Dtype::F32)?;
        // dlogits (Compute) overwrite the logits in place, row by row: `ld` elements apart.
        let ld = v * 4 / c.size();
        let dxc = if dx.is_some() {
            Some(self.scratch(m * d, c)?)
        } else {
            None
        };
        let losses = self.scratch(m, Dtype::F32)?;
        let esz = c.size() as u64;
        for (i, r0) in (0..m).step_by(chunk).enumerate() {
            // The first chunk's d_w GEMM overwrites when asked to, the others add.
            let acc = if i == 0 { acc } else { GradWrite::Accumulate };
            let rc = chunk.min(m - r0);
            let xc_r = xc.ptr + (r0 * d) as u64 * esz;
            let shape = GemmRows {
                rows: rc,
                d_in: d,
                d_out: v,
                ld_dy: ld,
            };
            // SAFETY: xc_r holds rc·d, w v·d and logits chunk·v elements.
            unsafe { self.gemm_x_wt(logits.ptr, xc_r, w.ptr, shape, Dtype::F32)? };
            let ce = CrossEntropyParams {
                logits: logits.ptr,
                loss: losses.ptr + (r0 * 4) as u64,
                targets: tgt_dev.dev.ptr + (r0 * 4) as u64,
                v: v as i32,
                grad: grad as i32,
                grad_scale,
            };
            // SAFETY: one block per chunk row; targets are in [0, v).
            unsafe { self.launch(LM_HEAD, c, "cross_entropy", Launch::per_row(rc), &ce)? };
            if grad {
                let dl = logits.ptr;
                if let Some(dxc) = &dxc {
                    let dxc_r = dxc.ptr + (r0 * d) as u64 * esz;
                    // SAFETY: dl holds rc rows of v elements, ld apart; dxc_r rc·d elements.
                    unsafe { self.gemm_dy_w(dxc_r, dl, w.ptr, shape, GradWrite::Overwrite)? };
                }
                if let Some(d_w) = &d_w {
                    // SAFETY: d_w holds v·d, dl rc rows ld apart, xc_r rc·d elements.
                    unsafe { self.gemm_dyt_x(d_w.ptr, dl, xc_r, shape, acc)? };
                }
            }
        }
        if let (Some(dx), Some(dxc)) = (&dx, &dxc) {
            let scatter = RowsParams {
                dst: dx.ptr,
                src: dxc.ptr,
                rows: rows_dev.dev.ptr,
                d: d as i32,
            };
            // SAFETY: rows index valid, distinct rows of dx.
            unsafe { self.launch(LM_HEAD, c, "scatter_rows", Launch::per_row(m), &scatter)? };
        }
        let sum = SumIntoParams {
            out: loss_sum.ptr,
            x: losses.ptr,
            n: m as i32,
        };
        let one = Launch {
            grid: (1, 1, 1),
            block: 1024,
            smem: 0,
        };
        // SAFETY: losses holds m fp32; loss_sum one.
        unsafe { self.launch(REDUCE, Dtype::F32, "sum_into", one, &sum) }
    }
}
