//! Forward launches. Every forward kernel (`flash_fwd`, `flash_fwd_br128`, `flash_fwd_wg`, at
//! Dh 64 and 128) takes the same nine parameters, the windowed `flash_fwd_win` a tenth (the
//! window); the grid is tiles x query heads, heads fastest. Which kernel walks which list is
//! `choice::route`'s decision, not this file's.

use std::sync::Arc;

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use crate::error::driver;
use crate::module::Loaded;
use crate::FlashError;

/// The device pointers and sizes every forward launch of one call shares.
pub(crate) struct ForwardArgs {
    /// `qkv: [N, (H + 2 Hkv) Dh]` bf16.
    pub qkv: u64,
    /// `out: [N, H Dh]` bf16.
    pub out: u64,
    /// `lse: [H, N]` fp32.
    pub lse: u64,
    /// The plan's segment table in the workspace.
    pub segs: u64,
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub n: i32,
    pub scale: f32,
    /// The sliding window, passed to the windowed kernels only.
    pub window: i32,
}

/// One forward kernel over `count` tiles of the list at device address `tiles`.
///
/// # Safety
/// The pointers in `a` and `tiles` are live device allocations of the documented sizes on
/// `stream`'s context; `k` is a forward kernel of the call's head dim.
pub(crate) unsafe fn launch_forward(
    stream: &Arc<CudaStream>,
    k: &Loaded,
    tiles: u64,
    count: usize,
    a: &ForwardArgs,
) -> Result<(), FlashError> {
    let mut b = stream.launch_builder(&k.func);
    b.arg(&a.qkv)
        .arg(&a.out)
        .arg(&a.lse)
        .arg(&tiles)
        .arg(&a.segs);
    b.arg(&a.n_heads).arg(&a.n_kv_heads).arg(&a.n).arg(&a.scale);
    if k.windowed {
        b.arg(&a.window);
    }
    let cfg = LaunchConfig {
        grid_dim: ((count * a.n_heads as usize) as u32, 1, 1),
        block_dim: (k.threads, 1, 1),
        shared_mem_bytes: k.smem as u32,
    };
    // SAFETY: argument order and types match `flash_fwd[_br128|_wg]_<dh>` (9 parameters) and
    // `flash_fwd_win_<dh>` (10).
    b.launch(cfg)
        .map(|_| ())
        .map_err(driver(format!("launching {}", k.name)))
}
