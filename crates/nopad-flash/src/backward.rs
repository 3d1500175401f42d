//! Backward launches, one named function per kernel family: [`launch_dq`] (dQ over query
//! tiles, computing D and lse2 of its rows first), [`launch_dkdv`] (dK, dV over 64-key tiles)
//! and [`launch_dkdv_long`] (dK, dV over 128-key tiles of long sequences). Grids are tiles x
//! heads, heads fastest: query heads for dQ, kv heads for dK/dV (the GQA group is summed in
//! registers). The windowed kernels (`Loaded::windowed`) take the window as one more, last,
//! parameter. The order of the launches is `choice::route`'s.

use std::sync::Arc;

use cudarc::driver::{CudaStream, LaunchArgs, LaunchConfig, PushKernelArg};

use crate::error::driver;
use crate::module::Loaded;
use crate::FlashError;

/// The device pointers and sizes every backward launch of one call shares.
pub(crate) struct BackwardArgs {
    /// `qkv: [N, (H + 2 Hkv) Dh]` bf16.
    pub qkv: u64,
    /// The forward's `out: [N, H Dh]` bf16 and `lse: [H, N]` fp32.
    pub out: u64,
    pub lse: u64,
    /// `d_out: [N, H Dh]` bf16.
    pub d_out: u64,
    /// `d_qkv: [N, (H + 2 Hkv) Dh]` bf16, every element written.
    pub d_qkv: u64,
    /// Workspace sections: `lse2`, `D` `[H, Tpad]` fp32 and the segment table.
    pub lse2: u64,
    pub d: u64,
    pub segs: u64,
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub n: i32,
    pub t_pad: i32,
    pub scale: f32,
    /// The sliding window, passed to the windowed kernels only.
    pub window: i32,
}

fn config(blocks: usize, k: &Loaded) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (k.threads, 1, 1),
        shared_mem_bytes: k.smem as u32,
    }
}

/// dQ of `count` query tiles (`flash_bwd_dq` or `flash_bwd_wgs_dq`); given the forward's
/// `out` and `lse` it first computes D and lse2 of its rows and stores them for dK/dV.
///
/// # Safety
/// As [`crate::FlashAttention::backward`]; `tiles` is a query-tile list in the workspace.
pub(crate) unsafe fn launch_dq(
    stream: &Arc<CudaStream>,
    k: &Loaded,
    tiles: u64,
    count: usize,
    a: &BackwardArgs,
) -> Result<(), FlashError> {
    let mut b = stream.launch_builder(&k.func);
    b.arg(&a.qkv)
        .arg(&a.d_out)
        .arg(&a.lse2)
        .arg(&a.d)
        .arg(&a.d_qkv)
        .arg(&tiles)
        .arg(&a.segs)
        .arg(&a.out)
        .arg(&a.lse);
    b.arg(&a.n_heads)
        .arg(&a.n_kv_heads)
        .arg(&a.n)
        .arg(&a.t_pad)
        .arg(&a.scale);
    if k.windowed {
        b.arg(&a.window);
    }
    // SAFETY: matches `flash_bwd_dq_<dh>` and `flash_bwd_wgs_dq_<dh>` (14 parameters) and
    // `flash_bwd_dq_win_<dh>` (15).
    b.launch(config(count * a.n_heads as usize, k))
        .map(|_| ())
        .map_err(driver(format!("launching {}", k.name)))
}

/// dK, dV of `count` 64-key tiles (`flash_bwd_dkdv` or `flash_bwd_wgs_kv`), after
/// [`launch_dq`] wrote D and lse2.
///
/// # Safety
/// As [`launch_dq`]; `tiles` is a key-tile list in the workspace.
pub(crate) unsafe fn launch_dkdv(
    stream: &Arc<CudaStream>,
    k: &Loaded,
    tiles: u64,
    count: usize,
    a: &BackwardArgs,
) -> Result<(), FlashError> {
    // The dQ accumulator of the atomic variants, which have no entry point: always null.
    let dqacc = 0u64;
    let mut b = stream.launch_builder(&k.func);
    b.arg(&a.qkv)
        .arg(&a.d_out)
        .arg(&a.lse2)
        .arg(&a.d)
        .arg(&a.d_qkv)
        .arg(&tiles)
        .arg(&a.segs)
        .arg(&dqacc);
    // SAFETY: matches `flash_bwd_dkdv_<dh>` and `flash_bwd_wgs_kv_<dh>` (12 parameters) and
    // `flash_bwd_dkdv_win_<dh>` (13, the window pushed by `launch_kv`); the deterministic
    // kernels never read `dqacc`.
    launch_kv(b, k, count, a)
}

/// dK, dV of `count` 128-key tiles of long sequences (`flash_bwd_wg_128`), after
/// [`launch_dq`].
///
/// # Safety
/// As [`launch_dq`]; `tiles` is the plan's 128-key list in the workspace.
pub(crate) unsafe fn launch_dkdv_long(
    stream: &Arc<CudaStream>,
    k: &Loaded,
    tiles: u64,
    count: usize,
    a: &BackwardArgs,
) -> Result<(), FlashError> {
    let dqacc = 0u64;
    let mut b = stream.launch_builder(&k.func);
    b.arg(&a.qkv)
        .arg(&a.d_out)
        .arg(&a.lse2)
        .arg(&a.d)
        .arg(&a.d_qkv)
        .arg(&tiles)
        .arg(&dqacc);
    // SAFETY: matches `flash_bwd_wg_128` (11 parameters); it never reads `dqacc`.
    launch_kv(b, k, count, a)
}

/// The dK/dV kernels' common tail: `H, Hkv, Tpad, scale` (and the window, for a windowed
/// kernel), then the launch over `count` key tiles x kv heads.
///
/// # Safety
/// `b` holds the kernel's leading parameters in order, as its callers push them.
unsafe fn launch_kv<'a>(
    mut b: LaunchArgs<'a>,
    k: &Loaded,
    count: usize,
    a: &'a BackwardArgs,
) -> Result<(), FlashError> {
    b.arg(&a.n_heads)
        .arg(&a.n_kv_heads)
        .arg(&a.t_pad)
        .arg(&a.scale);
    if k.windowed {
        b.arg(&a.window);
    }
    b.launch(config(count * a.n_kv_heads as usize, k))
        .map(|_| ())
        .map_err(driver(format!("launching {}", k.name)))
}
