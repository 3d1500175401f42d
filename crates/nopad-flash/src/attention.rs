//! `FlashAttention`: the loaded kernels of one device, shape checks, and `forward` / `backward`,
//! which upload a plan's tile lists into the workspace and run the launches of the route
//! (`choice::route`, or `choice::window_route` where the sliding window hides keys of this
//! batch) in order, skipping empty lists.
//!
//! The math lives in the `.cu` files under `kernels/` (each opens with what it computes), the
//! choice in `choice.rs`, the launch geometry in `module.rs`, `forward.rs` and `backward.rs`.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaFunction, CudaStream};

use crate::backward::{launch_dkdv, launch_dkdv_long, launch_dq, BackwardArgs};
use crate::choice::{has_wgmma, route, window_route, Capability, Kernel, Route};
use crate::forward::{launch_forward, ForwardArgs};
use crate::module::{KernelTable, ModuleLoader};
use crate::plan::Plan;
use crate::staging::StagingPool;
use crate::{FlashDims, FlashError};

/// Whether plans let runs of short sequences share tiles (block-diagonal mask).
pub const PACK_SHORT: bool = true;

/// Loaded varlen FlashAttention kernels for head dims 64 and 128 on one device.
pub struct FlashAttention {
    kernels: KernelTable,
    /// The capability the route is chosen for (the device's, unless a test asked otherwise).
    capability: Capability,
    /// Page-locked buffers for the tile-list uploads, shared with the plans.
    pub(crate) staging: Arc<StagingPool>,
}

/// The current context's device capability; `None` where the driver cannot say.
fn current_capability() -> Option<Capability> {
    use sys::CUdevice_attribute::*;
    let mut dev: sys::CUdevice = 0;
    // SAFETY: plain queries of the current context's device.
    unsafe {
        if sys::cuCtxGetDevice(&mut dev) != sys::CUresult::CUDA_SUCCESS {
            return None;
        }
        let major =
            result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
        let minor =
            result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
        Some((major.ok()?, minor.ok()?))
    }
}

impl FlashAttention {
    /// Compile and load the kernels of the current context's device through
    /// `load(name, cuda_source)` (the caller's NVRTC with its disk cache). Sources are
    /// self-contained: no CUDA headers are needed.
    pub fn new(load: &ModuleLoader) -> Result<Self, FlashError> {
        // Where the driver cannot tell, the mma.sync route (it runs on every sm_80+ device).
        let cap = current_capability().unwrap_or((8, 0));
        Self::load(load, cap)
    }

    /// As [`FlashAttention::new`], but route as on a device of capability `cap`: tests and the
    /// check harness use it to run the mma.sync route on a Hopper device. Asking for the wgmma
    /// route on a device without wgmma is an error (those kernels trap there).
    pub fn with_capability(load: &ModuleLoader, cap: Capability) -> Result<Self, FlashError> {
        let device = current_capability().unwrap_or((8, 0));
        if has_wgmma(cap) && !has_wgmma(device) {
            return Err(FlashError::Unsupported(format!(
                "the wgmma route (capability {cap:?}) on a device of capability {device:?}"
            )));
        }
        Self::load(load, cap)
    }

    fn load(load: &ModuleLoader, cap: Capability) -> Result<Self, FlashError> {
        Ok(FlashAttention {
            kernels: KernelTable::load(load, cap)?,
            capability: cap,
            staging: Arc::new(StagingPool::default()),
        })
    }

    /// The capability the kernels are chosen for.
    pub fn capability(&self) -> Capability {
        self.capability
    }

    /// The launches `forward` and `backward` run at head dim `head_dim` without a window.
    pub fn route(&self, head_dim: usize) -> Route {
        route(head_dim, self.capability)
    }

    /// The launches of a call of `dims` over the batch of `plan`: [`window_route`] where the
    /// window hides keys (some sequence is longer than it), else the device's [`route`].
    pub fn route_for(&self, dims: &FlashDims, plan: &Plan) -> Route {
        match dims.window_within(plan.max_len()) {
            Some(_) => window_route(dims.head_dim),
            None => self.route(dims.head_dim),
        }
    }

    pub(crate) fn wg_selftest(&self) -> Option<&CudaFunction> {
        self.kernels.wg_selftest.as_ref()
    }

    fn check_dims(dims: &FlashDims) -> Result<(), FlashError> {
        if dims.head_dim != 64 && dims.head_dim != 128 {
            return Err(FlashError::Unsupported(format!(
                "head_dim {} (kernels exist for 64 and 128)",
                dims.head_dim
            )));
        }
        if dims.n_kv_heads == 0 || !dims.n_heads.is_multiple_of(dims.n_kv_heads) {
            return Err(FlashError::Unsupported(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                dims.n_heads, dims.n_kv_heads
            )));
        }
        if !(dims.scale.is_finite() && dims.scale > 0.0) {
            return Err(FlashError::Unsupported(format!(
                "scale {} must be finite and > 0",
                dims.scale
            )));
        }
        if dims.window == Some(0) {
            return Err(FlashError::Unsupported(
                "a sliding window of 0 keys (a query always sees itself: at least 1)".into(),
            ));
        }
        Ok(())
    }

    /// The window as the kernels take it (`i32`; 0 where no windowed kernel runs).
    fn window_arg(dims: &FlashDims, plan: &Plan) -> i32 {
        // A window that hides a key is below the longest sequence, which fits an i32 (the
        // plan checked the row indices).
        dims.window_within(plan.max_len()).map_or(0, |w| w as i32)
    }

    /// Build the tile lists for `cu_seqlens_host` (host copy of the device `cu_seqlens`).
    pub fn plan(&self, cu_seqlens_host: &[i32], dims: &FlashDims) -> Result<Plan, FlashError> {
        Self::check_dims(dims)?;
        Plan::with_packing(cu_seqlens_host, dims, PACK_SHORT)
    }

    /// Device scratch bytes the caller passes as `workspace` to `forward` and `backward`: tile
    /// lists, then lse2 and D `[H, Tpad]` fp32 (Tpad = tokens with each sequence rounded up
    /// to 64).
    pub fn workspace_bytes(&self, plan: &Plan, dims: &FlashDims) -> usize {
        plan.layout(dims.n_heads).total
    }

    /// Forward: `out: [N, H*Dh]` bf16 and `lse: [H, N]` fp32 from `qkv: [N, (H+2Hkv)*Dh]` bf16.
    /// `cu_seqlens` (the device copy) is accepted but not read: the plan carries everything.
    ///
    /// # Safety
    /// All pointers are valid device allocations of the documented sizes on `stream`'s context;
    /// `workspace` holds `workspace_bytes` bytes; `plan` was built from this batch's cu_seqlens.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        dims: &FlashDims,
        qkv: u64,
        _cu_seqlens: u64,
        out: u64,
        lse: u64,
        workspace: u64,
    ) -> Result<(), FlashError> {
        Self::check_dims(dims)?;
        if plan.q_tiles.is_empty() {
            return Ok(());
        }
        plan.upload(&self.staging, stream, workspace)?;
        let lay = plan.layout(dims.n_heads);
        let args = ForwardArgs {
            qkv,
            out,
            lse,
            segs: workspace + lay.segs as u64,
            n_heads: dims.n_heads as i32,
            n_kv_heads: dims.n_kv_heads as i32,
            n: dims.n as i32,
            scale: dims.scale,
            window: Self::window_arg(dims, plan),
        };
        for step in self.route_for(dims, plan).forward {
            let (offset, count) = plan.list(&lay, step.tiles);
            if count > 0 {
                let k = self.kernels.get(step.kernel, dims.head_dim)?;
                launch_forward(stream, k, workspace + offset as u64, count, &args)?;
            }
        }
        Ok(())
    }

    /// Backward: writes all of `d_qkv: [N, (H+2Hkv)*Dh]` bf16 from `d_out: [N, H*Dh]`, the
    /// forward's `out` and `lse`. Every route is deterministic: dQ comes from a kernel over
    /// query tiles that recomputes P and dP (no atomics, bitwise reproducible), so
    /// `_deterministic` changes nothing; it stays until the caller's option that feeds it goes.
    ///
    /// # Safety
    /// As [`FlashAttention::forward`]; `out` and `lse` are that forward's outputs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        dims: &FlashDims,
        qkv: u64,
        _cu_seqlens: u64,
        out: u64,
        lse: u64,
        d_out: u64,
        d_qkv: u64,
        workspace: u64,
        _deterministic: bool,
    ) -> Result<(), FlashError> {
        Self::check_dims(dims)?;
        if plan.q_tiles.is_empty() {
            return Ok(());
        }
        plan.upload(&self.staging, stream, workspace)?;
        let lay = plan.layout(dims.n_heads);
        let at = |off: usize| workspace + off as u64;
        let args = BackwardArgs {
            qkv,
            out,
            lse,
            d_out,
            d_qkv,
            lse2: at(lay.lse2),
            d: at(lay.d),
            segs: at(lay.segs),
            n_heads: dims.n_heads as i32,
            n_kv_heads: dims.n_kv_heads as i32,
            n: dims.n as i32,
            t_pad: plan.t_pad as i32,
            scale: dims.scale,
            window: Self::window_arg(dims, plan),
        };
        for step in self.route_for(dims, plan).backward {
            let (offset, count) = plan.list(&lay, step.tiles);
            if count == 0 {
                continue;
            }
            let k = self.kernels.get(step.kernel, dims.head_dim)?;
            let tiles = at(offset);
            match step.kernel {
                Kernel::BwdDq | Kernel::BwdDqWgmma | Kernel::BwdDqWindow => {
                    launch_dq(stream, k, tiles, count, &args)?
                }
                Kernel::BwdDkdv | Kernel::BwdDkdvWgmma | Kernel::BwdDkdvWindow => {
                    launch_dkdv(stream, k, tiles, count, &args)?
                }
                Kernel::BwdDkdvLongWgmma => launch_dkdv_long(stream, k, tiles, count, &args)?,
                Kernel::Fwd | Kernel::FwdWide | Kernel::FwdWgmma | Kernel::FwdWindow => {
                    return Err(FlashError::Unsupported(format!(
                        "forward kernel {:?} in a backward route",
                        step.kernel
                    )))
                }
            }
        }
        Ok(())
    }
}
