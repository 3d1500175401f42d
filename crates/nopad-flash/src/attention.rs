//! `FlashAttention`: loads the kernels through the caller's NVRTC loader, checks shapes, uploads
//! a plan's tile lists into the workspace and launches forward and backward.
//!
//! Launch geometry lives here; the math lives in the `.cu` files under `kernels/` (each opens
//! with what it computes). Every launch returns a `Result` naming its kernel.

use std::sync::Arc;

use cudarc::driver::{
    result, sys, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};

use crate::plan::{Plan, WorkspaceLayout, TILE};
use crate::staging::StagingPool;
use crate::{FlashDims, FlashError};

pub(crate) const COMMON: &str = include_str!("kernels/common.cuh");
pub(crate) const WGMMA: &str = include_str!("kernels/wgmma.cuh");
pub(crate) const FWD: &str = include_str!("kernels/fwd.cu");
pub(crate) const FWD_WG: &str = include_str!("kernels/fwd_wg.cu");
pub(crate) const BWD_PREP: &str = include_str!("kernels/bwd_prep.cu");
pub(crate) const BWD_DKDV: &str = include_str!("kernels/bwd_dkdv.cu");
pub(crate) const BWD_DQ: &str = include_str!("kernels/bwd_dq.cu");
pub(crate) const BWD_LONG: &str = include_str!("kernels/bwd_long.cu");
pub(crate) const BWD_WG: &str = include_str!("kernels/bwd_wg.cu");
pub(crate) const BWD_WGS: &str = include_str!("kernels/bwd_wgs.cu");
pub(crate) const BWD_CONVERT: &str = include_str!("kernels/bwd_convert.cu");
pub(crate) const SIMPLE: &str = include_str!("kernels/simple.cu");

/// The caller's loader: `load(name, cuda_source) -> module` (NVRTC plus its disk cache). On a
/// device of compute capability 9.0 it must compile for `sm_90a` (as nopad's loaders do): the
/// wgmma kernels, selected there, are built only with that target and trap otherwise.
pub type ModuleLoader = dyn Fn(&str, &str) -> Result<Arc<CudaModule>, String>;

/// Which kernels `forward`/`backward` launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelSet {
    /// Tensor-core kernels (`fwd.cu`, `bwd_*.cu`): the production path.
    Mma,
    /// Scalar stage-1 kernels (`simple.cu`): slow, obvious, the GPU oracle.
    Simple,
}

/// The functions of one head dimension.
struct PerDim {
    fwd: CudaFunction,
    fwd_wide: CudaFunction,
    /// `fwd_wg.cu`: sm_90a only.
    fwd_wg: Option<CudaFunction>,
    prep: CudaFunction,
    dkdv: CudaFunction,
    dkdv_dq: CudaFunction,
    dkdv_dq_w: CudaFunction,
    long: CudaFunction,
    long_dq: CudaFunction,
    /// `bwd_wg.cu` (dK/dV only, and with dQ reds): Dh 128 on sm_90a only.
    wg: Option<(CudaFunction, CudaFunction)>,
    /// `bwd_wgs.cu` (dQ by recompute, dK/dV over 64-key tiles): sm_90a only.
    wgs: Option<(CudaFunction, CudaFunction)>,
    dq: CudaFunction,
    convert: CudaFunction,
    s_fwd: CudaFunction,
    s_prep: CudaFunction,
    s_dq: CudaFunction,
    s_dkdv: CudaFunction,
}

/// Query rows per forward tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardTiles {
    /// 64 rows, 16 per warp, 4 CTAs per SM (128 registers); skips masked 16-key blocks.
    Narrow,
    /// 128 rows x 64 keys, 32 rows per warp: half the shared-memory reads per FLOP, 2 CTAs
    /// per SM (255 / 228 registers, no spills); no block skipping.
    Wide,
    /// The measured best (run 4a, crate README): at Dh 128 `Wide` for the sequences of at
    /// least `plan::AUTO_WIDE_MIN` tokens and `Narrow` for the rest (two launches); at Dh 64
    /// `Narrow` everywhere. Where the device has warpgroup MMAs (compute capability 9.0)
    /// `FlashAttention::set_forward_wgmma` decides which tiles go to `fwd_wg.cu` instead.
    Auto,
}

/// Which `ForwardTiles::Auto` tiles run on the warpgroup-MMA forward (`fwd_wg.cu`; compute
/// capability 9.0, ignored elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardWgmma {
    /// None: `Auto` as on other devices.
    Off,
    /// The sequences shorter than `plan::AUTO_WIDE_MIN`; the long ones keep the `Wide` kernel.
    Short,
    /// Every tile.
    All,
}

/// How the backward computes dQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DqMode {
    /// A second kernel over query tiles recomputes P and dP (7 matmuls instead of 5, no
    /// atomics, bitwise reproducible). Measured faster than `Atomic` on the H200 at 64-key tiles.
    Recompute,
    /// dQ from the dK/dV kernel through fp32 `red.global.add` (non-deterministic).
    Atomic,
}

/// Which kernel runs the key tiles of long sequences (at least `plan::AUTO_WIDE_MIN` tokens) in
/// the backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LongKeys {
    /// 64-key tiles, 4 warps of 16 keys, like every other sequence (`bwd_dkdv.cu`).
    Narrow,
    /// 128-key tiles, 8 warps of 16 keys, P^T and dS^T in registers (`bwd_dkdv.cu`, NW = 8);
    /// atomic backward only (the deterministic one treats it as `Narrow`).
    Rows,
    /// 128-key tiles in FA2's layout: 8 warps split S/dP, dK/dV and dQ by blocks, P and dS
    /// through shared memory (`bwd_long.cu`).
    Split,
    /// `Split`'s work on Hopper warpgroup MMAs (`wgmma`, `bwd_wg.cu`): 2 warpgroups, both
    /// operands from shared memory. Dh 128 on compute capability 9.0 only; elsewhere `Split`
    /// in the atomic backward and `Narrow` in the deterministic one.
    Wgmma,
}

/// Backward kernel choices (see the crate README for what was measured).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardConfig {
    /// Deterministic path (and the short sequences of the split atomic one): the dQ kernel
    /// computes D = rowsum(dO o O) and lse2 itself and runs before the dK/dV kernel, so there
    /// is no separate preprocess pass over O and dO.
    pub fused_prep: bool,
    /// Long sequences' key tiles in the deterministic backward (`Narrow`, `Split` or `Wgmma`,
    /// the default: run 7a measured it 15-20% faster than `Split` on a, b, e; where there is no
    /// long wgmma kernel, i.e. at Dh 64 or off sm_90a, `Wgmma` acts as `Narrow`).
    pub long_deterministic: LongKeys,
    /// Long sequences' key tiles in the atomic backward (default `Wgmma`: run 7a measured it
    /// 24-36% faster than `Split` on a, b, e). With `Rows`, `Split` or `Wgmma` the short
    /// sequences take the deterministic kernels (dQ by recompute, measured faster there).
    pub long_atomic: LongKeys,
    /// The deterministic kernels (dQ of every query tile; dK/dV of the key tiles that do not
    /// go to the long kernel) on warpgroup MMAs (`bwd_wgs.cu`) where the device has them
    /// (compute capability 9.0); `bwd_dq.cu` / `bwd_dkdv.cu` otherwise.
    pub short_wgmma: bool,
}

impl Default for BackwardConfig {
    fn default() -> Self {
        BackwardConfig {
            fused_prep: true,
            long_deterministic: LongKeys::Wgmma,
            long_atomic: LongKeys::Wgmma,
            short_wgmma: true,
        }
    }
}

/// Whether plans let runs of short sequences share tiles (block-diagonal mask).
pub const PACK_SHORT: bool = true;

/// Loaded varlen FlashAttention kernels for head dims 64 and 128.
pub struct FlashAttention {
    d64: PerDim,
    d128: PerDim,
    kernels: KernelSet,
    forward_tiles: ForwardTiles,
    forward_wgmma: ForwardWgmma,
    nondeterministic_dq: DqMode,
    backward_config: BackwardConfig,
    /// Page-locked buffers for the tile-list uploads, shared with the plans.
    pub(crate) staging: Arc<StagingPool>,
    /// `flash_wg_selftest` where the device runs wgmma (`wgmma.rs`).
    pub(crate) wg_selftest: Option<CudaFunction>,
}

fn smem_dkdv(dh: usize, atomic: bool) -> usize {
    6 * TILE * dh * 2 + 4 * TILE * 4 + if atomic { TILE * TILE * 2 } else { 0 }
}
/// The 128-key atomic kernel: K, V [128][Dh] + Q, dO [2][64][Dh] bf16, lse2/D, dS [128][64].
fn smem_dkdv_wide(dh: usize) -> usize {
    (2 * 128 + 4 * TILE) * dh * 2 + 4 * TILE * 4 + 128 * TILE * 2
}
/// Q [BR][Dh] + K, V [BC][Dh] bf16 (fwd.cu: BR = 64 or 128, BC = 64).
fn smem_fwd(dh: usize, wide: bool) -> usize {
    let br = if wide { 128 } else { 64 };
    (br + 2 * 64) * dh * 2
}
fn smem_dq(dh: usize) -> usize {
    6 * TILE * dh * 2
}
/// `bwd_long.cu`: K, V [128][Dh] + Q, dO [2][64][Dh] + P, dS [64][128] bf16 + lse2, D [2][64].
fn smem_long(dh: usize) -> usize {
    (2 * 128 + 4 * TILE) * dh * 2 + 2 * TILE * 128 * 2 + 4 * TILE * 4
}
/// `bwd_wg.cu` (Dh 128): `smem_long` plus 1 KB to align the tiles to 1024 bytes.
const SMEM_WG: usize =
    2 * 128 * 128 * 2 + 4 * TILE * 128 * 2 + 2 * TILE * 128 * 2 + 4 * TILE * 4 + 1024;
/// `flash_wg_selftest`: x [64][128] + y [128][128] bf16, aligned.
pub(crate) const SMEM_WG_SELFTEST: usize = (64 + 128) * 128 * 2 + 1024;
/// `flash_fwd_wg_<dh>`: Q, K, V [64][Dh] bf16, aligned to 1024 bytes.
fn smem_fwd_wg(dh: usize) -> usize {
    3 * TILE * dh * 2 + 1024
}
/// `flash_bwd_wgs_dq_<dh>`: Q, dO + K, V [2] [64][Dh] bf16 + lse2, D [64] fp32, aligned.
fn smem_wgs_dq(dh: usize) -> usize {
    6 * TILE * dh * 2 + 2 * TILE * 4 + 1024
}
/// `flash_bwd_wgs_kv_<dh>`: K, V + Q, dO [2] [64][Dh] bf16 + lse2, D [2][64] fp32 + segs [64].
fn smem_wgs_kv(dh: usize) -> usize {
    6 * TILE * dh * 2 + 4 * TILE * 4 + TILE * 4 + 1024
}

/// Whether the current context's device runs sm_90a code (wgmma): compute capability 9.0.
fn device_has_wgmma() -> bool {
    use sys::CUdevice_attribute::*;
    let mut dev: sys::CUdevice = 0;
    // SAFETY: plain queries of the current context's device; failures mean "no".
    unsafe {
        if sys::cuCtxGetDevice(&mut dev) != sys::CUresult::CUDA_SUCCESS {
            return false;
        }
        let major =
            result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
        let minor =
            result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
        matches!((major, minor), (Ok(9), Ok(0)))
    }
}

pub(crate) fn driver(what: impl Into<String>) -> impl FnOnce(result::DriverError) -> FlashError {
    let what = what.into();
    move |source| FlashError::Driver { what, source }
}

impl FlashAttention {
    /// Compile and load every kernel through `load(name, cuda_source)` (the caller's NVRTC with
    /// its disk cache). Sources are self-contained: no CUDA headers are needed.
    pub fn new(load: &ModuleLoader) -> Result<Self, FlashError> {
        let module = |name: &str, src: &str| {
            load(name, &format!("{COMMON}\n{src}")).map_err(|msg| FlashError::Load {
                module: name.to_string(),
                msg,
            })
        };
        let fwd = module("flash_fwd.cu", &format!("{WGMMA}\n{FWD}\n{FWD_WG}"))?;
        let bwd = module(
            "flash_bwd.cu",
            &format!(
                "{WGMMA}\n{BWD_PREP}\n{BWD_DKDV}\n{BWD_DQ}\n{BWD_LONG}\n{BWD_WG}\n{BWD_WGS}\n{BWD_CONVERT}"
            ),
        )?;
        let wgmma = device_has_wgmma();
        let simple = module("flash_simple.cu", SIMPLE)?;
        let get = |m: &Arc<CudaModule>, name: String| {
            m.load_function(&name)
                .map_err(driver(format!("loading kernel {name}")))
        };
        let per_dim = |dh: usize| -> Result<PerDim, FlashError> {
            let p = PerDim {
                fwd: get(&fwd, format!("flash_fwd_{dh}"))?,
                fwd_wide: get(&fwd, format!("flash_fwd_br128_{dh}"))?,
                fwd_wg: match wgmma {
                    true => Some(get(&fwd, format!("flash_fwd_wg_{dh}"))?),
                    false => None,
                },
                prep: get(&bwd, format!("flash_bwd_prep_{dh}"))?,
                dkdv: get(&bwd, format!("flash_bwd_dkdv_{dh}"))?,
                dkdv_dq: get(&bwd, format!("flash_bwd_dkdv_dq_{dh}"))?,
                dkdv_dq_w: get(&bwd, format!("flash_bwd_dkdv_dq_w_{dh}"))?,
                long: get(&bwd, format!("flash_bwd_long_{dh}"))?,
                long_dq: get(&bwd, format!("flash_bwd_long_dq_{dh}"))?,
                wg: if wgmma && dh == 128 {
                    Some((
                        get(&bwd, format!("flash_bwd_wg_{dh}"))?,
                        get(&bwd, format!("flash_bwd_wg_dq_{dh}"))?,
                    ))
                } else {
                    None
                },
                wgs: if wgmma {
                    Some((
                        get(&bwd, format!("flash_bwd_wgs_dq_{dh}"))?,
                        get(&bwd, format!("flash_bwd_wgs_kv_{dh}"))?,
                    ))
                } else {
                    None
                },
                dq: get(&bwd, format!("flash_bwd_dq_{dh}"))?,
                convert: get(&bwd, format!("flash_bwd_convert_{dh}"))?,
                s_fwd: get(&simple, format!("flash_simple_fwd_{dh}"))?,
                s_prep: get(&simple, format!("flash_simple_bwd_prep_{dh}"))?,
                s_dq: get(&simple, format!("flash_simple_bwd_dq_{dh}"))?,
                s_dkdv: get(&simple, format!("flash_simple_bwd_dkdv_{dh}"))?,
            };
            let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            p.fwd
                .set_attribute(attr, smem_fwd(dh, false) as i32)
                .map_err(driver(format!("raising smem of flash_fwd_{dh}")))?;
            p.fwd_wide
                .set_attribute(attr, smem_fwd(dh, true) as i32)
                .map_err(driver(format!("raising smem of flash_fwd_br128_{dh}")))?;
            p.dkdv
                .set_attribute(attr, smem_dkdv(dh, false) as i32)
                .map_err(driver(format!("raising smem of flash_bwd_dkdv_{dh}")))?;
            p.dkdv_dq
                .set_attribute(attr, smem_dkdv(dh, true) as i32)
                .map_err(driver(format!("raising smem of flash_bwd_dkdv_dq_{dh}")))?;
            p.dkdv_dq_w
                .set_attribute(attr, smem_dkdv_wide(dh) as i32)
                .map_err(driver(format!("raising smem of flash_bwd_dkdv_dq_w_{dh}")))?;
            for (func, name) in [
                (&p.long, "flash_bwd_long"),
                (&p.long_dq, "flash_bwd_long_dq"),
            ] {
                func.set_attribute(attr, smem_long(dh) as i32)
                    .map_err(driver(format!("raising smem of {name}_{dh}")))?;
            }
            p.dq.set_attribute(attr, smem_dq(dh) as i32)
                .map_err(driver(format!("raising smem of flash_bwd_dq_{dh}")))?;
            if let Some(fwd_wg) = &p.fwd_wg {
                fwd_wg
                    .set_attribute(attr, smem_fwd_wg(dh) as i32)
                    .map_err(driver(format!("raising smem of flash_fwd_wg_{dh}")))?;
            }
            if let Some((dq, kv)) = &p.wgs {
                dq.set_attribute(attr, smem_wgs_dq(dh) as i32)
                    .map_err(driver(format!("raising smem of flash_bwd_wgs_dq_{dh}")))?;
                kv.set_attribute(attr, smem_wgs_kv(dh) as i32)
                    .map_err(driver(format!("raising smem of flash_bwd_wgs_kv_{dh}")))?;
            }
            if let Some((wg, wg_dq)) = &p.wg {
                for func in [wg, wg_dq] {
                    func.set_attribute(attr, SMEM_WG as i32)
                        .map_err(driver(format!("raising smem of flash_bwd_wg[_dq]_{dh}")))?;
                }
            }
            Ok(p)
        };
        Ok(FlashAttention {
            d64: per_dim(64)?,
            d128: per_dim(128)?,
            kernels: KernelSet::Mma,
            forward_tiles: ForwardTiles::Auto,
            forward_wgmma: ForwardWgmma::All,
            nondeterministic_dq: DqMode::Recompute,
            backward_config: BackwardConfig::default(),
            staging: Arc::new(StagingPool::default()),
            wg_selftest: match wgmma {
                true => {
                    let f = get(&bwd, "flash_wg_selftest".to_string())?;
                    let attr =
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                    f.set_attribute(attr, SMEM_WG_SELFTEST as i32)
                        .map_err(driver("raising smem of flash_wg_selftest"))?;
                    Some(f)
                }
                false => None,
            },
        })
    }

    /// Switch between the tensor-core kernels (default) and the scalar oracle.
    pub fn set_kernels(&mut self, kernels: KernelSet) {
        self.kernels = kernels;
    }

    /// Choose the forward tile height (default `Auto`).
    pub fn set_forward_tiles(&mut self, tiles: ForwardTiles) {
        self.forward_tiles = tiles;
    }

    /// Choose which `Auto` forward tiles run on warpgroup MMAs where available (default `All`).
    pub fn set_forward_wgmma(&mut self, wgmma: ForwardWgmma) {
        self.forward_wgmma = wgmma;
    }

    /// The dQ strategy `backward(.., deterministic = false)` uses (default `Recompute`: with
    /// 64-key tiles the atomic path moved more bytes than it saved, see the crate README).
    pub fn set_nondeterministic_dq(&mut self, dq: DqMode) {
        self.nondeterministic_dq = dq;
    }

    /// Choose the backward kernels (default `BackwardConfig::default()`).
    pub fn set_backward_config(&mut self, config: BackwardConfig) {
        self.backward_config = config;
    }

    /// The active backward kernel choices.
    pub fn backward_config(&self) -> BackwardConfig {
        self.backward_config
    }

    /// Which kernel set is active.
    pub fn kernels(&self) -> KernelSet {
        self.kernels
    }

    fn check_dims(dims: &FlashDims) -> Result<(), FlashError> {
        if dims.head_dim != 64 && dims.head_dim != 128 {
            return Err(FlashError::Unsupported(format!(
                "head_dim {} (kernels exist for 64 and 128)",
                dims.head_dim
            )));
        }
        if dims.n_kv_heads == 0 || dims.n_heads % dims.n_kv_heads != 0 {
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
        Ok(())
    }

    fn per_dim(&self, dims: &FlashDims) -> &PerDim {
        if dims.head_dim == 64 {
            &self.d64
        } else {
            &self.d128
        }
    }

    /// Build the tile lists for `cu_seqlens_host` (host copy of the device `cu_seqlens`).
    pub fn plan(&self, cu_seqlens_host: &[i32], dims: &FlashDims) -> Result<Plan, FlashError> {
        Self::check_dims(dims)?;
        Plan::with_packing(cu_seqlens_host, dims, PACK_SHORT)
    }

    /// Device scratch bytes the caller passes as `workspace` to `forward` and `backward`: tile
    /// lists, lse2 and D `[H, Tpad]` fp32 (Tpad = tokens with each sequence rounded up to 64),
    /// plus the atomic backward's dQ accumulator `[H, Tpad, Dh]` fp32 only if
    /// `set_nondeterministic_dq(DqMode::Atomic)` was chosen.
    pub fn workspace_bytes(&self, plan: &Plan, dims: &FlashDims) -> usize {
        Self::workspace_bytes_for(plan, dims, self.nondeterministic_dq)
    }

    /// Workspace bytes for a backward with dQ strategy `dq` (`Atomic` needs the accumulator).
    pub fn workspace_bytes_for(plan: &Plan, dims: &FlashDims, dq: DqMode) -> usize {
        let lay = plan.layout(dims.n_heads, dims.head_dim);
        match dq {
            DqMode::Atomic => lay.total,
            DqMode::Recompute => lay.dqacc.max(256),
        }
    }

    unsafe fn upload_tiles(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        workspace: u64,
    ) -> Result<(), FlashError> {
        plan.upload(&self.staging, stream, workspace)
    }

    /// Forward: `out: [N, H*Dh]` bf16 and `lse: [H, N]` fp32 from `qkv: [N, (H+2Hkv)*Dh]` bf16.
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
        self.forward_with_tiles(
            self.forward_tiles,
            stream,
            plan,
            dims,
            qkv,
            _cu_seqlens,
            out,
            lse,
            workspace,
        )
    }

    /// [`FlashAttention::forward`] with an explicit tile height (benchmarks compare them).
    ///
    /// # Safety
    /// As [`FlashAttention::forward`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_with_tiles(
        &self,
        forward_tiles: ForwardTiles,
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
        let q_tiles = plan.q_tiles.len();
        if q_tiles == 0 {
            return Ok(());
        }
        self.upload_tiles(stream, plan, workspace)?;
        let f = self.per_dim(dims);
        let (h, hkv, n) = (dims.n_heads as i32, dims.n_kv_heads as i32, dims.n as i32);
        let lay = plan.layout(dims.n_heads, dims.head_dim);
        let segs = workspace + lay.segs as u64;
        let tiles = workspace + lay.tiles as u64;
        let simple_tiles = workspace + lay.simple_tiles as u64;
        let wide_tiles = workspace + lay.wide_tiles as u64;
        let dh = dims.head_dim;
        // (kernel, name, tile list, tiles, threads, smem): one launch, or two for `Auto` when
        // the batch has both long and short sequences (they write disjoint rows).
        let mut launches: Vec<(&CudaFunction, &str, u64, usize, u32, usize)> = Vec::new();
        match self.kernels {
            KernelSet::Mma => {
                let narrow = |list: u64, count: usize| {
                    (&f.fwd, "flash_fwd", list, count, 128, smem_fwd(dh, false))
                };
                let wide = |list: u64, count: usize| {
                    (
                        &f.fwd_wide,
                        "flash_fwd_br128",
                        list,
                        count,
                        128,
                        smem_fwd(dh, true),
                    )
                };
                // Where the device has warpgroup MMAs (sm_90a), `Auto` tiles go to
                // `fwd_wg.cu` as `forward_wgmma` says.
                let wg = f
                    .fwd_wg
                    .as_ref()
                    .filter(|_| self.forward_wgmma != ForwardWgmma::Off)
                    .map(|func| {
                        move |list: u64, count: usize| {
                            (func, "flash_fwd_wg", list, count, 128, smem_fwd_wg(dh))
                        }
                    });
                let auto_wide = workspace + lay.auto_wide as u64;
                let auto_narrow = workspace + lay.auto_narrow as u64;
                match (forward_tiles, wg) {
                    (ForwardTiles::Auto, Some(wg)) => {
                        if self.forward_wgmma == ForwardWgmma::All {
                            launches.push(wg(tiles, q_tiles));
                        } else {
                            launches.push(wide(auto_wide, plan.auto_wide.len()));
                            launches.push(wg(auto_narrow, plan.auto_narrow.len()));
                        }
                    }
                    (ForwardTiles::Narrow, _) => launches.push(narrow(tiles, q_tiles)),
                    (ForwardTiles::Wide, _) => {
                        launches.push(wide(wide_tiles, plan.wide_tiles.len()))
                    }
                    // At Dh 64 the 64-row kernel measured faster on every shape (run 4a: c
                    // 125.5 vs 116.0 TFLOP/s with Auto), so Auto uses it alone there.
                    (ForwardTiles::Auto, None) if dh == 64 => launches.push(narrow(tiles, q_tiles)),
                    (ForwardTiles::Auto, None) => {
                        launches.push(wide(auto_wide, plan.auto_wide.len()));
                        launches.push(narrow(auto_narrow, plan.auto_narrow.len()));
                    }
                }
            }
            KernelSet::Simple => launches.push((
                &f.s_fwd,
                "flash_simple_fwd",
                simple_tiles,
                plan.simple_tiles.len(),
                64,
                0,
            )),
        }
        launches.retain(|l| l.3 > 0);
        for (func, name, list, count, block, smem) in launches {
            let mut b = stream.launch_builder(func);
            b.arg(&qkv).arg(&out).arg(&lse).arg(&list);
            if self.kernels == KernelSet::Mma {
                b.arg(&segs);
            }
            b.arg(&h).arg(&hkv).arg(&n).arg(&dims.scale);
            let cfg = LaunchConfig {
                grid_dim: ((count * dims.n_heads) as u32, 1, 1),
                block_dim: (block, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: argument order and types match `flash_fwd[_br128]_<dh>` (with segs) and
            // `flash_simple_fwd_<dh>` (without).
            b.launch(cfg)
                .map_err(driver(format!("launching {name}_{dh}")))?;
        }
        Ok(())
    }

    /// Backward: writes all of `d_qkv: [N, (H+2Hkv)*Dh]` bf16 from `d_out: [N, H*Dh]`, the
    /// forward's `out` and `lse`. `deterministic = false`: one pass over key tiles computes dK,
    /// dV and dQ, dQ through fp32 `red.global.add` (fast; dQ may differ in the last bits from run
    /// to run). `deterministic = true`: dQ comes from a second kernel over query tiles that
    /// recomputes P and dP (no atomics, bitwise reproducible, about 40% more matmul work).
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
        cu_seqlens: u64,
        out: u64,
        lse: u64,
        d_out: u64,
        d_qkv: u64,
        workspace: u64,
        deterministic: bool,
    ) -> Result<(), FlashError> {
        let dq = if deterministic {
            DqMode::Recompute
        } else {
            self.nondeterministic_dq
        };
        self.backward_with_dq(
            dq, stream, plan, dims, qkv, cu_seqlens, out, lse, d_out, d_qkv, workspace,
        )
    }

    /// [`FlashAttention::backward`] with an explicit dQ strategy (checks and benchmarks).
    ///
    /// # Safety
    /// As [`FlashAttention::backward`], with `workspace` of `workspace_bytes_for(.., dq_mode)`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward_with_dq(
        &self,
        dq_mode: DqMode,
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
    ) -> Result<(), FlashError> {
        Self::check_dims(dims)?;
        let q_tiles = plan.q_tiles.len();
        if q_tiles == 0 {
            return Ok(());
        }
        self.upload_tiles(stream, plan, workspace)?;
        let lay: WorkspaceLayout = plan.layout(dims.n_heads, dims.head_dim);
        let f = self.per_dim(dims);
        let dh = dims.head_dim;
        let (h, hkv, n) = (dims.n_heads as i32, dims.n_kv_heads as i32, dims.n as i32);
        let tpad = plan.t_pad as i32;
        let tiles = workspace + lay.tiles as u64;
        let kv_tiles = workspace + lay.kv_tiles as u64;
        let simple_tiles = workspace + lay.simple_tiles as u64;
        let segs = workspace + lay.segs as u64;
        let grid_simple = (plan.simple_tiles.len() * dims.n_heads) as u32;
        let lse2 = workspace + lay.lse2 as u64;
        let dbuf = workspace + lay.d as u64;
        let deterministic = dq_mode == DqMode::Recompute;
        let dqacc = if deterministic {
            0u64
        } else {
            workspace + lay.dqacc as u64
        };
        let cfg = |grid: u32, block: u32, smem: usize| LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let scale = dims.scale;
        match self.kernels {
            KernelSet::Mma => {
                let conf = self.backward_config;
                let list = |off: usize| workspace + off as u64;
                // Launch helpers; each names its kernel in errors. `count` = tiles in the list.
                let prep = |tl: u64, count: usize, zero_dq: bool| -> Result<(), FlashError> {
                    let acc = if zero_dq { dqacc } else { 0u64 };
                    let mut b = stream.launch_builder(&f.prep);
                    b.arg(&out)
                        .arg(&d_out)
                        .arg(&lse)
                        .arg(&dbuf)
                        .arg(&lse2)
                        .arg(&acc)
                        .arg(&tl);
                    b.arg(&h).arg(&n).arg(&tpad);
                    // SAFETY: matches `flash_bwd_prep_<dh>` (10 parameters).
                    b.launch(cfg((count * dims.n_heads) as u32, 256, 0))
                        .map(|_| ())
                        .map_err(driver(format!("launching flash_bwd_prep_{dh}")))
                };
                // `fused`: the kernel computes D and lse2 of its rows (no preprocess pass).
                // The deterministic kernels on warpgroup MMAs where available (`bwd_wgs.cu`).
                let wgs = f.wgs.as_ref().filter(|_| conf.short_wgmma);
                let (dq_fn, dq_name, dq_smem) = match wgs {
                    Some((wgs_dq, _)) => (wgs_dq, "flash_bwd_wgs_dq", smem_wgs_dq(dh)),
                    None => (&f.dq, "flash_bwd_dq", smem_dq(dh)),
                };
                let dq = |tl: u64, count: usize, fused: bool| -> Result<(), FlashError> {
                    let (o, l) = if fused { (out, lse) } else { (0u64, 0u64) };
                    let mut b = stream.launch_builder(dq_fn);
                    b.arg(&qkv)
                        .arg(&d_out)
                        .arg(&lse2)
                        .arg(&dbuf)
                        .arg(&d_qkv)
                        .arg(&tl)
                        .arg(&segs)
                        .arg(&o)
                        .arg(&l);
                    b.arg(&h).arg(&hkv).arg(&n).arg(&tpad).arg(&scale);
                    // SAFETY: matches `flash_bwd_dq_<dh>` and `flash_bwd_wgs_dq_<dh>` (14
                    // parameters, 128 threads each).
                    b.launch(cfg((count * dims.n_heads) as u32, 128, dq_smem))
                        .map(|_| ())
                        .map_err(driver(format!("launching {dq_name}_{dh}")))
                };
                // bwd_dkdv.cu kernels: (function, name, threads, smem).
                let dkdv = |k: (&CudaFunction, &str, u32, usize),
                            tl: u64,
                            count: usize|
                 -> Result<(), FlashError> {
                    let mut b = stream.launch_builder(k.0);
                    b.arg(&qkv)
                        .arg(&d_out)
                        .arg(&lse2)
                        .arg(&dbuf)
                        .arg(&d_qkv)
                        .arg(&tl)
                        .arg(&segs)
                        .arg(&dqacc);
                    b.arg(&h).arg(&hkv).arg(&tpad).arg(&scale);
                    // SAFETY: matches `flash_bwd_dkdv[_dq[_w]]_<dh>` (12 parameters); dqacc
                    // is null only when the kernel does not use it.
                    b.launch(cfg((count * dims.n_kv_heads) as u32, k.2, k.3))
                        .map(|_| ())
                        .map_err(driver(format!("launching {}_{dh}", k.1)))
                };
                // `flash_bwd_wgs_kv_<dh>` takes `flash_bwd_dkdv_<dh>`'s 12 parameters.
                let k_det = match wgs {
                    Some((_, wgs_kv)) => (wgs_kv, "flash_bwd_wgs_kv", 128, smem_wgs_kv(dh)),
                    None => (&f.dkdv, "flash_bwd_dkdv", 128, smem_dkdv(dh, false)),
                };
                let k_atomic = (&f.dkdv_dq, "flash_bwd_dkdv_dq", 128, smem_dkdv(dh, true));
                let k_rows = (&f.dkdv_dq_w, "flash_bwd_dkdv_dq_w", 256, smem_dkdv_wide(dh));
                // `keys` = Split or Wgmma (the latter where the device and Dh allow it).
                let long = |keys: LongKeys,
                            atomic: bool,
                            tl: u64,
                            count: usize|
                 -> Result<(), FlashError> {
                    let (func, name, smem) = match (&f.wg, keys == LongKeys::Wgmma, atomic) {
                        (Some((_, wg_dq)), true, true) => (wg_dq, "flash_bwd_wg_dq", SMEM_WG),
                        (Some((wg, _)), true, false) => (wg, "flash_bwd_wg", SMEM_WG),
                        (_, _, true) => (&f.long_dq, "flash_bwd_long_dq", smem_long(dh)),
                        (_, _, false) => (&f.long, "flash_bwd_long", smem_long(dh)),
                    };
                    let mut b = stream.launch_builder(func);
                    b.arg(&qkv)
                        .arg(&d_out)
                        .arg(&lse2)
                        .arg(&dbuf)
                        .arg(&d_qkv)
                        .arg(&tl)
                        .arg(&dqacc);
                    b.arg(&h).arg(&hkv).arg(&tpad).arg(&scale);
                    // SAFETY: matches `flash_bwd_long[_dq]_<dh>` and `flash_bwd_wg[_dq]_128`
                    // (11 parameters, 256 threads each).
                    b.launch(cfg((count * dims.n_kv_heads) as u32, 256, smem))
                        .map(|_| ())
                        .map_err(driver(format!("launching {name}_{dh}")))
                };
                let convert = |tl: u64, count: usize| -> Result<(), FlashError> {
                    let mut b = stream.launch_builder(&f.convert);
                    b.arg(&dqacc)
                        .arg(&d_qkv)
                        .arg(&tl)
                        .arg(&h)
                        .arg(&hkv)
                        .arg(&tpad)
                        .arg(&scale);
                    // SAFETY: matches `flash_bwd_convert_<dh>`.
                    b.launch(cfg((count * dims.n_heads) as u32, 128, 0))
                        .map(|_| ())
                        .map_err(driver(format!("launching flash_bwd_convert_{dh}")))
                };
                // Lists: all query / key tiles, and split by length (`plan::AUTO_WIDE_MIN`).
                let (nq_all, nkv_all) = (q_tiles, plan.kv_tiles.len());
                let (q_short, nq_short) = (list(lay.auto_narrow), plan.auto_narrow.len());
                let (q_long, nq_long) = (list(lay.q_long), plan.q_long.len());
                let (kv_long, nkv_long) = (list(lay.kv_wide), plan.kv_wide.len());
                let (kv_short, nkv_short) = (list(lay.kv_rest), plan.kv_rest.len());
                // Zero-tile lists are skipped.
                let run = |count: usize, go: &dyn Fn() -> Result<(), FlashError>| {
                    if count > 0 {
                        go()
                    } else {
                        Ok(())
                    }
                };
                if deterministic {
                    if conf.fused_prep {
                        dq(tiles, nq_all, true)?;
                    } else {
                        prep(tiles, nq_all, false)?;
                    }
                    // `Wgmma` without the long wgmma kernel (Dh 64, or no sm_90a) means `Narrow`:
                    // every key tile through `k_det` (run 18: at Dh 64 the 128-key mma.sync
                    // kernel left the 1B model's backward where it was, with few long sequences
                    // per batch filling few SMs).
                    let long_keys = match conf.long_deterministic {
                        LongKeys::Wgmma if f.wg.is_none() => LongKeys::Narrow,
                        keys => keys,
                    };
                    if matches!(long_keys, LongKeys::Split | LongKeys::Wgmma) {
                        let keys = long_keys;
                        run(nkv_long, &|| long(keys, false, kv_long, nkv_long))?;
                        run(nkv_short, &|| dkdv(k_det, kv_short, nkv_short))?;
                    } else {
                        dkdv(k_det, kv_tiles, nkv_all)?;
                    }
                    if !conf.fused_prep {
                        dq(tiles, nq_all, false)?;
                    }
                } else if conf.long_atomic == LongKeys::Narrow {
                    // Every sequence through the 64-key atomic kernel.
                    prep(tiles, nq_all, true)?;
                    dkdv(k_atomic, kv_tiles, nkv_all)?;
                    convert(tiles, nq_all)?;
                } else {
                    // Long sequences: 128-key atomic kernel; short ones: the deterministic
                    // kernels (dQ by recompute).
                    run(nq_long, &|| prep(q_long, nq_long, true))?;
                    if conf.fused_prep {
                        run(nq_short, &|| dq(q_short, nq_short, true))?;
                    } else {
                        run(nq_short, &|| prep(q_short, nq_short, false))?;
                    }
                    if matches!(conf.long_atomic, LongKeys::Split | LongKeys::Wgmma) {
                        let keys = conf.long_atomic;
                        run(nkv_long, &|| long(keys, true, kv_long, nkv_long))?;
                    } else {
                        run(nkv_long, &|| dkdv(k_rows, kv_long, nkv_long))?;
                    }
                    run(nkv_short, &|| dkdv(k_det, kv_short, nkv_short))?;
                    if !conf.fused_prep {
                        run(nq_short, &|| dq(q_short, nq_short, false))?;
                    }
                    run(nq_long, &|| convert(q_long, nq_long))?;
                }
            }
            KernelSet::Simple => {
                // D: [H, N] unpadded, inside the workspace's D section (N <= Tpad).
                let mut b = stream.launch_builder(&f.s_prep);
                b.arg(&out)
                    .arg(&d_out)
                    .arg(&dbuf)
                    .arg(&simple_tiles)
                    .arg(&h)
                    .arg(&n);
                // SAFETY: matches `flash_simple_bwd_prep_<dh>`.
                b.launch(cfg(grid_simple, 64, 0))
                    .map_err(driver(format!("launching flash_simple_bwd_prep_{dh}")))?;
                let mut b = stream.launch_builder(&f.s_dq);
                b.arg(&qkv)
                    .arg(&d_out)
                    .arg(&lse)
                    .arg(&dbuf)
                    .arg(&d_qkv)
                    .arg(&simple_tiles);
                b.arg(&h).arg(&hkv).arg(&n).arg(&scale);
                // SAFETY: matches `flash_simple_bwd_dq_<dh>`.
                b.launch(cfg(grid_simple, 64, 0))
                    .map_err(driver(format!("launching flash_simple_bwd_dq_{dh}")))?;
                let mut b = stream.launch_builder(&f.s_dkdv);
                b.arg(&qkv)
                    .arg(&d_out)
                    .arg(&lse)
                    .arg(&dbuf)
                    .arg(&d_qkv)
                    .arg(&simple_tiles);
                b.arg(&h).arg(&hkv).arg(&n).arg(&scale);
                // SAFETY: matches `flash_simple_bwd_dkdv_<dh>`; its grid is q tiles x Hkv.
                b.launch(cfg(
                    (plan.simple_tiles.len() * dims.n_kv_heads) as u32,
                    64,
                    0,
                ))
                .map_err(driver(format!("launching flash_simple_bwd_dkdv_{dh}")))?;
            }
        }
        Ok(())
    }
}
