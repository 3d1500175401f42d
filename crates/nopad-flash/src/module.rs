//! Kernel loading: the CUDA sources, the caller's loader type, the table of loaded entry points
//! per head dimension (each with its block size and dynamic shared memory), and the
//! shared-memory sizes every launch and every `MAX_DYNAMIC_SHARED_SIZE_BYTES` attribute use.
//!
//! Two modules are compiled: `flash_fwd.cu` (`fwd.cu` + `fwd_wgmma.cu`) and `flash_bwd.cu`
//! (`bwd_dkdv.cu`, `bwd_dq.cu`, `bwd_wgmma_long.cu`, `bwd_wgmma_short.cu`), each prefixed by
//! `common.cuh` and `wgmma.cuh`. The sm_90a entry points exist in every build (they trap
//! elsewhere) but are looked up only where the device runs them.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use crate::choice::{arch_for, has_wgmma, Capability, Kernel};
use crate::error::driver;
use crate::plan::TILE;
use crate::FlashError;

pub(crate) const COMMON: &str = include_str!("kernels/common.cuh");
pub(crate) const WGMMA: &str = include_str!("kernels/wgmma.cuh");
pub(crate) const FWD: &str = include_str!("kernels/fwd.cu");
pub(crate) const FWD_WGMMA: &str = include_str!("kernels/fwd_wgmma.cu");
pub(crate) const BWD_DKDV: &str = include_str!("kernels/bwd_dkdv.cu");
pub(crate) const BWD_DQ: &str = include_str!("kernels/bwd_dq.cu");
pub(crate) const BWD_WGMMA_LONG: &str = include_str!("kernels/bwd_wgmma_long.cu");
pub(crate) const BWD_WGMMA_SHORT: &str = include_str!("kernels/bwd_wgmma_short.cu");

/// Every kernel source, for tools that inspect or compile them (the check harness).
pub const SOURCES: [(&str, &str); 8] = [
    ("common.cuh", COMMON),
    ("wgmma.cuh", WGMMA),
    ("fwd.cu", FWD),
    ("fwd_wgmma.cu", FWD_WGMMA),
    ("bwd_dkdv.cu", BWD_DKDV),
    ("bwd_dq.cu", BWD_DQ),
    ("bwd_wgmma_long.cu", BWD_WGMMA_LONG),
    ("bwd_wgmma_short.cu", BWD_WGMMA_SHORT),
];

/// The caller's loader: `load(name, cuda_source) -> module` (NVRTC plus its disk cache). It
/// must compile for [`crate::arch_for`] of the device: on compute capability 9.0 that is
/// `sm_90a`, which the wgmma kernels, selected there, need (they trap otherwise).
pub type ModuleLoader = dyn Fn(&str, &str) -> Result<Arc<CudaModule>, String>;

/// A loader without a disk cache, for tools and tests: NVRTC to PTX for [`crate::arch_for`] of
/// `ctx`'s device (the options nopad-backend's cached loader uses: `-std=c++17 -lineinfo` and
/// the toolkit's `include_dir`), then `load_module`.
pub fn ptx_loader(
    ctx: Arc<CudaContext>,
    include_dir: String,
) -> Result<impl Fn(&str, &str) -> Result<Arc<CudaModule>, String>, FlashError> {
    let cap = ctx
        .compute_capability()
        .map_err(driver("querying the compute capability"))?;
    let arch = arch_for(cap);
    Ok(move |name: &str, src: &str| {
        let opts = CompileOptions {
            include_paths: vec![include_dir.clone()],
            name: Some(name.to_string()),
            options: vec![
                format!("--gpu-architecture={arch}"),
                "-std=c++17".into(),
                "-lineinfo".into(),
            ],
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(src, opts).map_err(|e| format!("{name}: {e:?}"))?;
        ctx.load_module(ptx).map_err(|e| format!("{name}: {e}"))
    })
}

/// One loaded entry point with its launch geometry.
pub(crate) struct Loaded {
    pub func: CudaFunction,
    /// `<family>_<Dh>`, for error messages.
    pub name: String,
    pub threads: u32,
    pub smem: usize,
    /// Takes the sliding window as its last parameter (`Kernel::windowed`).
    pub windowed: bool,
}

/// Which module a kernel lives in, its entry point prefix and its block size.
fn entry(kernel: Kernel) -> (Module, &'static str, u32) {
    match kernel {
        Kernel::Fwd => (Module::Fwd, "flash_fwd", 128),
        Kernel::FwdWide => (Module::Fwd, "flash_fwd_br128", 128),
        Kernel::FwdWgmma => (Module::Fwd, "flash_fwd_wg", 128),
        Kernel::BwdDq => (Module::Bwd, "flash_bwd_dq", 128),
        Kernel::BwdDkdv => (Module::Bwd, "flash_bwd_dkdv", 128),
        Kernel::BwdDqWgmma => (Module::Bwd, "flash_bwd_wgs_dq", 128),
        Kernel::BwdDkdvWgmma => (Module::Bwd, "flash_bwd_wgs_kv", 128),
        Kernel::BwdDkdvLongWgmma => (Module::Bwd, "flash_bwd_wg", 256),
        Kernel::FwdWindow => (Module::Fwd, "flash_fwd_win", 128),
        Kernel::BwdDqWindow => (Module::Bwd, "flash_bwd_dq_win", 128),
        Kernel::BwdDkdvWindow => (Module::Bwd, "flash_bwd_dkdv_win", 128),
    }
}

#[derive(Clone, Copy)]
enum Module {
    Fwd,
    Bwd,
}

/// Dynamic shared memory of `kernel` at head dim `dh`, in bytes.
pub(crate) fn smem(kernel: Kernel, dh: usize) -> usize {
    match kernel {
        // Q [BR][Dh] + K, V [64][Dh] bf16 (BR = 64 or 128). The windowed kernels are the
        // same templates: the same tiles.
        Kernel::Fwd | Kernel::FwdWindow => (TILE + 2 * 64) * dh * 2,
        Kernel::FwdWide => (128 + 2 * 64) * dh * 2,
        // Q, K, V [64][Dh] bf16, aligned to 1024 bytes.
        Kernel::FwdWgmma => 3 * TILE * dh * 2 + 1024,
        // Q, dO + K, V [2] [64][Dh] bf16.
        Kernel::BwdDq | Kernel::BwdDqWindow => 6 * TILE * dh * 2,
        // K, V + Q, dO [2] [64][Dh] bf16 + lse2, D [2][64] fp32.
        Kernel::BwdDkdv | Kernel::BwdDkdvWindow => 6 * TILE * dh * 2 + 4 * TILE * 4,
        // Q, dO + K, V [2] [64][Dh] bf16 + lse2, D [64] fp32, aligned.
        Kernel::BwdDqWgmma => 6 * TILE * dh * 2 + 2 * TILE * 4 + 1024,
        // K, V + Q, dO [2] [64][Dh] bf16 + lse2, D [2][64] fp32 + segs [64], aligned.
        Kernel::BwdDkdvWgmma => 6 * TILE * dh * 2 + 4 * TILE * 4 + TILE * 4 + 1024,
        // K, V [128][Dh] + Q, dO [2][64][Dh] + P, dS [64][128] bf16 + lse2, D [2][64] fp32,
        // plus 1 KB to align the tiles to 1024 bytes (Dh 128 only).
        Kernel::BwdDkdvLongWgmma => {
            2 * 128 * dh * 2 + 4 * TILE * dh * 2 + 2 * TILE * 128 * 2 + 4 * TILE * 4 + 1024
        }
    }
}

/// `flash_wg_selftest`: x [64][128] + y [128][128] bf16, aligned.
pub(crate) const SMEM_WG_SELFTEST: usize = (64 + 128) * 128 * 2 + 1024;

/// The kernels a device of a given capability can launch, per (kernel, head dim).
pub(crate) struct KernelTable {
    loaded: HashMap<(Kernel, usize), Loaded>,
    /// `flash_wg_selftest` where the device runs wgmma (`wgmma.rs`).
    pub wg_selftest: Option<CudaFunction>,
}

impl KernelTable {
    /// Compile both modules through `load` and look up every entry point `cap` can run, raising
    /// each one's dynamic shared-memory limit to what its launches ask for.
    pub fn load(load: &ModuleLoader, cap: Capability) -> Result<Self, FlashError> {
        let module = |name: &str, src: String| {
            load(name, &format!("{COMMON}\n{WGMMA}\n{src}")).map_err(|msg| FlashError::Load {
                module: name.to_string(),
                msg,
            })
        };
        let fwd = module("flash_fwd.cu", format!("{FWD}\n{FWD_WGMMA}"))?;
        let bwd = module(
            "flash_bwd.cu",
            format!("{BWD_DKDV}\n{BWD_DQ}\n{BWD_WGMMA_LONG}\n{BWD_WGMMA_SHORT}"),
        )?;
        let wgmma = has_wgmma(cap);
        let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let get = |m: &Arc<CudaModule>, name: &str, smem: usize| {
            let func = m
                .load_function(name)
                .map_err(driver(format!("loading kernel {name}")))?;
            if smem > 0 {
                func.set_attribute(attr, smem as i32)
                    .map_err(driver(format!("raising smem of {name}")))?;
            }
            Ok::<_, FlashError>(func)
        };
        let kernels = [
            Kernel::Fwd,
            Kernel::FwdWide,
            Kernel::FwdWgmma,
            Kernel::BwdDq,
            Kernel::BwdDkdv,
            Kernel::BwdDqWgmma,
            Kernel::BwdDkdvWgmma,
            Kernel::BwdDkdvLongWgmma,
            Kernel::FwdWindow,
            Kernel::BwdDqWindow,
            Kernel::BwdDkdvWindow,
        ];
        let mut loaded = HashMap::new();
        for kernel in kernels {
            if kernel.wgmma() && !wgmma {
                continue;
            }
            for dh in [64, 128] {
                if kernel == Kernel::BwdDkdvLongWgmma && dh != 128 {
                    continue;
                }
                let (m, prefix, threads) = entry(kernel);
                let m = match m {
                    Module::Fwd => &fwd,
                    Module::Bwd => &bwd,
                };
                let name = format!("{prefix}_{dh}");
                let smem = smem(kernel, dh);
                let func = get(m, &name, smem)?;
                let l = Loaded {
                    func,
                    name,
                    threads,
                    smem,
                    windowed: kernel.windowed(),
                };
                loaded.insert((kernel, dh), l);
            }
        }
        let wg_selftest = match wgmma {
            true => Some(get(&bwd, "flash_wg_selftest", SMEM_WG_SELFTEST)?),
            false => None,
        };
        Ok(KernelTable {
            loaded,
            wg_selftest,
        })
    }

    /// The entry point of `kernel` at head dim `dh`; an error (a bug in the route) where the
    /// device or the head dim has none.
    pub fn get(&self, kernel: Kernel, dh: usize) -> Result<&Loaded, FlashError> {
        self.loaded.get(&(kernel, dh)).ok_or_else(|| {
            FlashError::Unsupported(format!("kernel {kernel:?} at head dim {dh} is not loaded"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes the launches used before the split (bytes), per kernel and head dim.
    #[test]
    fn shared_memory_sizes() {
        assert_eq!(smem(Kernel::Fwd, 128), 49152);
        assert_eq!(smem(Kernel::FwdWide, 128), 65536);
        assert_eq!(smem(Kernel::FwdWgmma, 64), 25600);
        assert_eq!(smem(Kernel::BwdDq, 128), 98304);
        assert_eq!(smem(Kernel::BwdDkdv, 64), 49152 + 1024);
        assert_eq!(smem(Kernel::BwdDqWgmma, 128), 98304 + 512 + 1024);
        assert_eq!(smem(Kernel::BwdDkdvWgmma, 128), 98304 + 1024 + 256 + 1024);
        assert_eq!(smem(Kernel::BwdDkdvLongWgmma, 128), 164864 + 1024);
        for k in [Kernel::BwdDkdvLongWgmma, Kernel::BwdDq, Kernel::FwdWide] {
            assert!(smem(k, 128) <= 227 * 1024, "{k:?} fits an SM");
        }
        // The windowed kernels are the same templates with the same tiles.
        for (w, plain) in [
            (Kernel::FwdWindow, Kernel::Fwd),
            (Kernel::BwdDqWindow, Kernel::BwdDq),
            (Kernel::BwdDkdvWindow, Kernel::BwdDkdv),
        ] {
            for dh in [64, 128] {
                assert_eq!(smem(w, dh), smem(plain, dh));
                assert_eq!(entry(w).2, entry(plain).2);
                assert_eq!(format!("{}_win", entry(plain).1), entry(w).1);
            }
        }
    }

    #[test]
    fn every_source_is_listed_once() {
        let mut names: Vec<&str> = SOURCES.iter().map(|s| s.0).collect();
        names.dedup();
        assert_eq!(names.len(), SOURCES.len());
        assert!(SOURCES.iter().all(|s| !s.1.is_empty()));
    }
}
