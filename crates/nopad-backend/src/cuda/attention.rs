//! Attention on CUDA. In bf16 mode with head_dim 64 or 128 (every default Llama shape) the calls
//! go to nopad-flash's tensor-core kernels. Everything else takes the simple varlen causal GQA
//! kernels here (`attention_fwd.cu`, `attention_bwd.cu`): F32 mode (the exact comparison with
//! the CPU backend, which the model's CUDA tests run) and bf16 with any other head_dim up to 128.
//! They do exact fp32 math from shared memory in 64 × 64 tiles, with no atomics; the host builds
//! the tile list (sequence, 64-row tile) from its copy of `cu_seqlens`, longest sequences first
//! so the heavy tiles start early.
//!
//! A sliding window (`AttnDims::window`) runs on nopad-flash's kernels only. The simple kernels
//! have none: a window that hides keys of a batch (a sequence longer than it) is refused there
//! with `BackendError::Unsupported`; a window every sequence fits in is plain causal attention
//! and runs anywhere.

use super::compile::{Launch, ATTENTION_BWD, ATTENTION_FWD};
use super::{want, Cuda, CudaInts, Dtype};
use crate::args::{AttnBwd, AttnFwd};
use crate::error::check;
use crate::{AttnDims, BackendError, Device, Result};

const TILE: usize = 64;
const MAX_HEAD_DIM: usize = 128;

/// Mirrors `AttnParams` in attention.cuh (shared by attention_fwd.cu and attention_bwd.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct AttnParams {
    out: u64,
    lse: u64,
    qkv: u64,
    d_out: u64,
    o: u64,
    delta: u64,
    cu: u64,
    tiles: u64,
    n: i32,
    h: i32,
    hkv: i32,
    dh: i32,
    scale: f32,
}

/// Checks the dims against `cu_seqlens` (both kernel paths).
fn check_batch(op: &'static str, cu: &CudaInts, dims: &AttnDims) -> Result<()> {
    let s = dims.n_seqs;
    check(cu.host.len() > s, op, || {
        format!("cu_seqlens has {} entries for {s} sequences", cu.host.len())
    })?;
    let cu = &cu.host[..=s];
    check(cu[0] == 0 && cu[s] as usize == dims.n, op, || {
        format!(
            "cu_seqlens runs {}..{}, expected 0..{}",
            cu[0], cu[s], dims.n
        )
    })?;
    check(cu.windows(2).all(|w| w[0] <= w[1]), op, || {
        "cu_seqlens is not non-decreasing".into()
    })?;
    check(
        dims.n_kv_heads > 0 && dims.n_heads.is_multiple_of(dims.n_kv_heads),
        op,
        || {
            format!(
                "{} heads not divisible by {} kv heads",
                dims.n_heads, dims.n_kv_heads
            )
        },
    )?;
    check(dims.window != Some(0), op, || {
        "a sliding window of 0 keys (a query always sees itself: at least 1)".into()
    })?;
    if dims.head_dim == 0 || dims.head_dim > MAX_HEAD_DIM {
        return Err(BackendError::Unsupported(format!(
            "{op}: head_dim {} (the simple kernel handles 1..={MAX_HEAD_DIM})",
            dims.head_dim
        )));
    }
    Ok(())
}

/// The simple kernels have no sliding window: an error where the window hides keys of this
/// batch (after `check_batch`).
fn no_window_needed(
    op: &'static str,
    cu: &CudaInts,
    dims: &AttnDims,
    compute: Dtype,
) -> Result<()> {
    let cu = &cu.host[..=dims.n_seqs];
    let longest = cu.windows(2).map(|w| (w[1] - w[0]) as usize).max();
    match dims.window_within(longest.unwrap_or(0)) {
        None => Ok(()),
        Some(w) => Err(BackendError::Unsupported(format!(
            "{op}: a sliding window of {w} keys over a sequence of {} tokens runs on the \
             nopad-flash kernels only (bf16 compute, head_dim 64 or 128), not in {compute:?} \
             mode with head_dim {}",
            longest.unwrap_or(0),
            dims.head_dim
        ))),
    }
}

/// The simple kernel's tile list `[(b, tile)]`, flattened, longest sequences first (after
/// `check_batch`).
fn tiles(cu: &CudaInts, dims: &AttnDims) -> Vec<i32> {
    let cu = &cu.host[..=dims.n_seqs];
    let mut list: Vec<(usize, i32, i32)> = Vec::new();
    for b in 0..dims.n_seqs {
        let len = (cu[b + 1] - cu[b]) as usize;
        for t in 0..len.div_ceil(TILE) {
            // Cost: key tiles visited by this query tile (causal), for longest-first order.
            list.push((t + 1, b as i32, t as i32));
        }
    }
    list.sort_by_key(|&(cost, _, _)| std::cmp::Reverse(cost));
    list.into_iter().flat_map(|(_, b, t)| [b, t]).collect()
}

fn smem_fwd(dh: usize) -> u32 {
    (4 * (3 * TILE * (dh + 1) + TILE * (TILE + 1))) as u32
}

fn smem_bwd(dh: usize) -> u32 {
    (4 * (4 * TILE * (dh + 1) + TILE * (TILE + 1) + 2 * TILE)) as u32
}

/// A flash plan and the batch it was built for.
pub(crate) struct CachedPlan {
    cu: Vec<i32>,
    heads: (usize, usize, usize),
    plan: std::sync::Arc<nopad_flash::Plan>,
}

impl Cuda {
    /// The plan for this batch: the cached one when `cu_seqlens` and the head shape match the
    /// last call's (all layers of a micro-batch), else a new one.
    fn flash_plan(
        &self,
        flash: &nopad_flash::FlashAttention,
        cu: &[i32],
        fd: &nopad_flash::FlashDims,
        op: &str,
    ) -> Result<std::sync::Arc<nopad_flash::Plan>> {
        let heads = (fd.n_heads, fd.n_kv_heads, fd.head_dim);
        let mut cache = self.flash_plan.lock().expect("plan cache mutex poisoned");
        if let Some(c) = cache.as_ref().filter(|c| c.heads == heads && c.cu == cu) {
            return Ok(c.plan.clone());
        }
        let plan = std::sync::Arc::new(flash.plan(cu, fd).map_err(Self::flash_err(op))?);
        *cache = Some(CachedPlan {
            cu: cu.to_vec(),
            heads,
            plan: plan.clone(),
        });
        Ok(plan)
    }

    /// nopad-flash's kernels when they apply to this call (bf16, head_dim 64 or 128), loaded on
    /// first use through the backend's NVRTC cache.
    fn flash_for(&self, dims: &AttnDims) -> Result<Option<&nopad_flash::FlashAttention>> {
        if self.compute != Dtype::Bf16 || !matches!(dims.head_dim, 64 | 128) {
            return Ok(None);
        }
        let loaded = self.flash.get_or_init(|| {
            let loader = self.kernels.external_loader();
            let load =
                move |name: &str, src: &str| loader.load(name, src).map_err(|e| e.to_string());
            nopad_flash::FlashAttention::new(&load).map_err(|e| e.to_string())
        });
        match loaded {
            Ok(f) => Ok(Some(f)),
            Err(e) => Err(BackendError::Device {
                op: "loading nopad-flash kernels".into(),
                msg: e.clone(),
            }),
        }
    }

    /// What both flash calls of a batch need: its dims, its (cached) plan and a workspace of
    /// the size the plan asks for.
    fn flash_setup(
        &self,
        flash: &nopad_flash::FlashAttention,
        cu: &CudaInts,
        dims: &AttnDims,
        op: &str,
    ) -> Result<(
        nopad_flash::FlashDims,
        std::sync::Arc<nopad_flash::Plan>,
        super::CudaBuf,
    )> {
        // `AttnDims` is `nopad_flash::FlashDims`: the window travels with the shape.
        let fd = *dims;
        let plan = self.flash_plan(flash, &cu.host[..=dims.n_seqs], &fd, op)?;
        let ws_words = flash.workspace_bytes(&plan, &fd).div_ceil(4).max(1);
        let ws = self.scratch(ws_words, Dtype::F32)?;
        Ok((fd, plan, ws))
    }

    fn flash_err(op: &str) -> impl FnOnce(nopad_flash::FlashError) -> BackendError + '_ {
        move |e| BackendError::Device {
            op: op.into(),
            msg: e.to_string(),
        }
    }

    fn params(&self, dims: &AttnDims, cu: &CudaInts, tiles: &CudaInts) -> AttnParams {
        AttnParams {
            out: 0,
            lse: 0,
            qkv: 0,
            d_out: 0,
            o: 0,
            delta: 0,
            cu: cu.dev.ptr,
            tiles: tiles.dev.ptr,
            n: dims.n as i32,
            h: dims.n_heads as i32,
            hkv: dims.n_kv_heads as i32,
            dh: dims.head_dim as i32,
            scale: dims.scale,
        }
    }

    /// out: `[N, H·Dh]` Compute; lse: `[H, N]` fp32; qkv: `[N, (H + 2Hkv)·Dh]` Compute.
    pub(crate) fn attention_forward_impl(&self, a: AttnFwd<'_, Self>) -> Result<()> {
        let AttnFwd {
            out,
            lse,
            qkv,
            cu_seqlens,
            dims,
        } = a;
        let op = "attention_forward";
        check_batch(op, cu_seqlens, &dims)?;
        let n = dims.n;
        want(op, "out", &out, self.compute, n * dims.out_width())?;
        want(op, "lse", &lse, Dtype::F32, dims.n_heads * n)?;
        want(op, "qkv", &qkv, self.compute, n * dims.qkv_width())?;
        if n == 0 || dims.n_heads == 0 {
            return Ok(());
        }
        if let Some(flash) = self.flash_for(&dims)? {
            let (fd, plan, ws) = self.flash_setup(flash, cu_seqlens, &dims, op)?;
            // SAFETY: out, lse and qkv were checked against the dims above; the workspace has
            // the size the plan asks for; all live on this backend's context and stream.
            return unsafe {
                flash.forward(
                    &self.stream,
                    &plan,
                    &fd,
                    qkv.ptr,
                    cu_seqlens.dev.ptr,
                    out.ptr,
                    lse.ptr,
                    ws.ptr,
                )
            }
            .map_err(Self::flash_err(op));
        }
        no_window_needed(op, cu_seqlens, &dims, self.compute)?;
        let list = tiles(cu_seqlens, &dims);
        let tiles = self.ints(&list)?;
        let mut p = self.params(&dims, cu_seqlens, &tiles);
        p.out = out.ptr;
        p.lse = lse.ptr;
        p.qkv = qkv.ptr;
        let cfg = Launch {
            grid: ((list.len() / 2) as u32, dims.n_heads as u32, 1),
            block: 256,
            smem: smem_fwd(dims.head_dim),
        };
        // SAFETY: shapes and cu_seqlens checked above; the tile list covers valid rows only.
        unsafe { self.launch(ATTENTION_FWD, self.compute, "attention_fwd", cfg, &p) }
    }

    /// d_qkv: `[N, (H + 2Hkv)·Dh]` (every element of the first N rows overwritten); d_out,
    /// out: `[N, H·Dh]`; lse: `[H, N]` fp32 from the forward.
    pub(crate) fn attention_backward_impl(&self, a: AttnBwd<'_, Self>) -> Result<()> {
        let AttnBwd {
            d_qkv,
            d_out,
            qkv,
            out,
            lse,
            cu_seqlens,
            dims,
        } = a;
        let op = "attention_backward";
        check_batch(op, cu_seqlens, &dims)?;
        let n = dims.n;
        want(op, "d_qkv", &d_qkv, self.compute, n * dims.qkv_width())?;
        want(op, "d_out", &d_out, self.compute, n * dims.out_width())?;
        want(op, "qkv", &qkv, self.compute, n * dims.qkv_width())?;
        want(op, "out", &out, self.compute, n * dims.out_width())?;
        want(op, "lse", &lse, Dtype::F32, dims.n_heads * n)?;
        if n == 0 || dims.n_heads == 0 {
            return Ok(());
        }
        if let Some(flash) = self.flash_for(&dims)? {
            let (fd, plan, ws) = self.flash_setup(flash, cu_seqlens, &dims, op)?;
            // SAFETY: every buffer was checked against the dims above; out and lse come from the
            // forward of the same batch; the workspace has the size the plan asks for.
            return unsafe {
                flash.backward(
                    &self.stream,
                    &plan,
                    &fd,
                    qkv.ptr,
                    cu_seqlens.dev.ptr,
                    out.ptr,
                    lse.ptr,
                    d_out.ptr,
                    d_qkv.ptr,
                    ws.ptr,
                    // The deterministic backward (dQ by recompute, no atomics): what the
                    // default `false` also runs, as nothing here selects atomic dQ.
                    true,
                )
            }
            .map_err(Self::flash_err(op));
        }
        no_window_needed(op, cu_seqlens, &dims, self.compute)?;
        let list = tiles(cu_seqlens, &dims);
        let tiles = self.ints(&list)?;
        let delta = self.scratch(dims.n_heads * n, Dtype::F32)?;
        let mut p = self.params(&dims, cu_seqlens, &tiles);
        p.out = d_qkv.ptr;
        p.lse = lse.ptr;
        p.qkv = qkv.ptr;
        p.d_out = d_out.ptr;
        p.o = out.ptr;
        p.delta = delta.ptr;
        let c = self.compute;
        let n_tiles = (list.len() / 2) as u32;
        let smem = smem_bwd(dims.head_dim);
        // SAFETY: shapes and cu_seqlens checked above; delta holds H·N fp32.
        unsafe {
            self.launch(
                ATTENTION_BWD,
                c,
                "attention_bwd_delta",
                Launch::flat(n * dims.n_heads * 32, 256),
                &p,
            )?;
            let dkv = Launch {
                grid: (n_tiles, dims.n_kv_heads as u32, 1),
                block: 256,
                smem,
            };
            self.launch(ATTENTION_BWD, c, "attention_bwd_dkv", dkv, &p)?;
            let dq = Launch {
                grid: (n_tiles, dims.n_heads as u32, 1),
                block: 256,
                smem,
            };
            self.launch(ATTENTION_BWD, c, "attention_bwd_dq", dq, &p)
        }
    }
}
