//! Correctness and speed harness for the kernels (behind the `flash-check` binary, and later
//! `nopad bench attention`): device setup with an NVRTC loader, seeded random data, the test and
//! benchmark shapes, and raw little-endian dumps that `bench/flash_vs_torch.py` reads.
//!
//! `check` compares every kernel set against the f64 CPU reference with FlashAttention's rule;
//! `bench` times the mma kernels with CUDA events. Nothing here is used by training.

pub mod bench;
pub mod check;

use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use rayon::prelude::*;

use crate::{BackwardConfig, FlashAttention, FlashDims, FlashError, ForwardWgmma, LongKeys};

/// Harness failures (setup, driver, files), with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// No usable CUDA driver or device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// From the attention library.
    #[error(transparent)]
    Flash(#[from] FlashError),
    /// A driver call in the harness itself.
    #[error("{what}: {source}")]
    Driver {
        /// What was being done.
        what: String,
        /// The driver error.
        source: cudarc::driver::DriverError,
    },
    /// Writing dumps.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

pub(crate) fn drv(
    what: impl Into<String>,
) -> impl FnOnce(cudarc::driver::DriverError) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Driver { what, source }
}

/// One GPU with a stream and the loaded kernels.
pub struct Gpu {
    /// The context.
    pub ctx: Arc<CudaContext>,
    /// The stream every launch uses.
    pub stream: Arc<CudaStream>,
    /// Loaded kernels.
    pub fa: FlashAttention,
    /// e.g. "sm_90a"
    pub arch: String,
}

fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (9, 0) => "sm_90a",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        _ => "sm_80",
    }
}

impl Gpu {
    /// Open device 0 and compile the kernels with NVRTC for its architecture.
    pub fn new() -> Result<Gpu, HarnessError> {
        // SAFETY: only probes whether libcuda can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(HarnessError::NoDevice("libcuda could not be loaded".into()));
        }
        let ctx = CudaContext::new(0).map_err(|e| HarnessError::NoDevice(e.to_string()))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(drv("compute capability"))?;
        let arch = arch_name(major, minor);
        let cuda_home = std::env::var("CUDA_HOME").unwrap_or_else(|_| "/usr/local/cuda".into());
        let lctx = ctx.clone();
        let subst = source_substitutions()?;
        let load = move |name: &str, src: &str| -> Result<Arc<CudaModule>, String> {
            let mut src = src.to_string();
            for (from, to) in &subst {
                src = src.replace(from.as_str(), to);
            }
            let src = src.as_str();
            let opts = CompileOptions {
                arch: Some(arch),
                include_paths: vec![format!("{cuda_home}/include")],
                name: Some(name.to_string()),
                options: vec!["-std=c++17".into(), "-lineinfo".into()],
                ..Default::default()
            };
            let ptx = compile_ptx_with_opts(src, opts).map_err(|e| format!("{name}: {e:?}"))?;
            lctx.load_module(ptx).map_err(|e| format!("{name}: {e}"))
        };
        let mut fa = FlashAttention::new(&load)?;
        if let Some(conf) = backward_config_from_env()? {
            eprintln!("FLASH_BWD: {conf:?}");
            fa.set_backward_config(conf);
        }
        // `FLASH_FWD=wg=off|short|all`: which `Auto` forward tiles use warpgroup MMAs.
        if let Ok(spec) = std::env::var("FLASH_FWD") {
            let wg = match spec.trim() {
                "wg=off" => ForwardWgmma::Off,
                "wg=short" => ForwardWgmma::Short,
                "wg=all" => ForwardWgmma::All,
                _ => {
                    return Err(HarnessError::NoDevice(format!(
                        "FLASH_FWD: unknown '{spec}'"
                    )))
                }
            };
            eprintln!("FLASH_FWD: {wg:?}");
            fa.set_forward_wgmma(wg);
        }
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            fa,
            arch: arch.to_string(),
        })
    }
}

/// Experiments without rebuilding: `FLASH_SUBST="from=>to;;from2=>to2"` replaces text in the
/// kernel sources before NVRTC compiles them (harness only; every `from` must occur, so a stale
/// experiment fails loudly instead of silently measuring the default kernels).
fn source_substitutions() -> Result<Vec<(String, String)>, HarnessError> {
    let Ok(spec) = std::env::var("FLASH_SUBST") else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for part in spec.split(";;").filter(|p| !p.trim().is_empty()) {
        let Some((from, to)) = part.split_once("=>") else {
            return Err(HarnessError::NoDevice(format!(
                "FLASH_SUBST entry without '=>': {part}"
            )));
        };
        let from = from.to_string();
        let all = [
            crate::attention::COMMON,
            crate::attention::WGMMA,
            crate::attention::FWD,
            crate::attention::FWD_WG,
            crate::attention::BWD_PREP,
            crate::attention::BWD_DKDV,
            crate::attention::BWD_DQ,
            crate::attention::BWD_LONG,
            crate::attention::BWD_WG,
            crate::attention::BWD_WGS,
            crate::attention::BWD_CONVERT,
            crate::attention::SIMPLE,
        ];
        if !all.iter().any(|src| src.contains(from.as_str())) {
            return Err(HarnessError::NoDevice(format!(
                "FLASH_SUBST: '{from}' occurs in no kernel source"
            )));
        }
        eprintln!("FLASH_SUBST: '{from}' => '{to}'");
        out.push((from, to.to_string()));
    }
    Ok(out)
}

/// Experiments without rebuilding:
/// `FLASH_BWD="fused_prep=0,long_det=split,long_atomic=rows,short_wg=0"`
/// overrides fields of the default `BackwardConfig` (harness only; unknown keys are errors).
fn backward_config_from_env() -> Result<Option<BackwardConfig>, HarnessError> {
    let Ok(spec) = std::env::var("FLASH_BWD") else {
        return Ok(None);
    };
    let bad = |what: &str| HarnessError::NoDevice(format!("FLASH_BWD: {what}"));
    let keys = |v: &str| match v {
        "narrow" => Ok(LongKeys::Narrow),
        "rows" => Ok(LongKeys::Rows),
        "split" => Ok(LongKeys::Split),
        "wg" => Ok(LongKeys::Wgmma),
        _ => Err(bad(&format!("unknown kernel choice '{v}'"))),
    };
    let mut conf = BackwardConfig::default();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad(&format!("entry without '=': {part}")))?;
        match k.trim() {
            "fused_prep" => conf.fused_prep = v.trim() == "1",
            "long_det" => conf.long_deterministic = keys(v.trim())?,
            "long_atomic" => conf.long_atomic = keys(v.trim())?,
            "short_wg" => conf.short_wgmma = v.trim() == "1",
            _ => return Err(bad(&format!("unknown key '{k}'"))),
        }
    }
    Ok(Some(conf))
}

/// A batch shape: packed sequences plus head geometry.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Short name for tables and file names (no spaces).
    pub name: String,
    /// `cu_seqlens`, starting at 0.
    pub cu: Vec<i32>,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// 64 or 128.
    pub head_dim: usize,
}

impl Shape {
    /// A shape from sequence lengths.
    pub fn from_lens(
        name: &str,
        lens: &[usize],
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Shape {
        let mut cu = vec![0i32];
        for &l in lens {
            cu.push(cu[cu.len() - 1] + l as i32);
        }
        Shape {
            name: name.to_string(),
            cu,
            n_heads,
            n_kv_heads,
            head_dim,
        }
    }

    /// The dims of this shape with the default scale 1 / sqrt(Dh).
    pub fn dims(&self) -> FlashDims {
        let max = self
            .cu
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);
        FlashDims {
            n: self.cu[self.cu.len() - 1] as usize,
            n_seqs: self.cu.len() - 1,
            max_seqlen: max.max(1),
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        }
    }

    /// Elements of one qkv row.
    pub fn row(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }
}

/// Lengths `count x U[lo, hi]`.
pub fn uniform_lens(rng: &mut nopad_rng::Rng, count: usize, lo: usize, hi: usize) -> Vec<usize> {
    (0..count)
        .map(|_| rng.range(lo as u64, hi as u64 + 1) as usize)
        .collect()
}

/// `count` lognormal lengths (median, sigma), clamped to [1, max].
pub fn lognormal_lens(
    rng: &mut nopad_rng::Rng,
    count: usize,
    median: f64,
    sigma: f64,
    max: usize,
) -> Vec<usize> {
    (0..count)
        .map(|_| (rng.lognormal(median, sigma).round() as usize).clamp(1, max))
        .collect()
}

/// `len` standard-normal values rounded to bf16 (as u16 bits), from `seed` and `purpose`.
pub fn random_bf16(seed: u64, purpose: &str, len: usize) -> Vec<u16> {
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0u16; len];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut rng = nopad_rng::Rng::derived(seed ^ (c as u64).wrapping_mul(0x9E37_79B9), purpose);
        for x in out {
            *x = half::bf16::from_f64(rng.normal()).to_bits();
        }
    });
    v
}

/// bf16 bits to f32.
pub fn bf16_to_f32(v: &[u16]) -> Vec<f32> {
    v.par_iter()
        .map(|&b| half::bf16::from_bits(b).to_f32())
        .collect()
}

/// A device buffer with NaN guard bands of `GUARD` elements on both sides.
pub(crate) struct Guarded<T> {
    pub buf: CudaSlice<T>,
    pub len: usize,
}

pub(crate) const GUARD: usize = 1024;

impl<T: cudarc::driver::DeviceRepr + Copy> Guarded<T> {
    /// Filled entirely (guards and body) with `fill`.
    pub fn new(stream: &Arc<CudaStream>, len: usize, fill: T) -> Result<Self, HarnessError> {
        let host = vec![fill; len + 2 * GUARD];
        let buf = stream
            .clone_htod(&host)
            .map_err(drv("alloc guarded buffer"))?;
        Ok(Guarded { buf, len })
    }
    /// Device pointer of the body.
    pub fn ptr(&self, stream: &Arc<CudaStream>) -> u64 {
        let (p, _sync) = self.buf.device_ptr(stream);
        p + (GUARD * std::mem::size_of::<T>()) as u64
    }
    /// (guards, body) copied back.
    pub fn read(&self, stream: &Arc<CudaStream>) -> Result<(Vec<T>, Vec<T>), HarnessError> {
        let all = stream
            .clone_dtoh(&self.buf)
            .map_err(drv("read guarded buffer"))?;
        let mut guards = all[..GUARD].to_vec();
        guards.extend_from_slice(&all[GUARD + self.len..]);
        Ok((guards, all[GUARD..GUARD + self.len].to_vec()))
    }
}

/// Write a slice as raw little-endian bytes.
pub(crate) fn write_raw<T: Copy>(dir: &Path, name: &str, data: &[T]) -> Result<(), HarnessError> {
    let path = dir.join(name);
    // SAFETY: T is a plain number type (u16/i32/f32); its bytes are its little-endian encoding here.
    let bytes = unsafe {
        std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data))
    };
    std::fs::write(&path, bytes).map_err(|source| HarnessError::Io {
        path: path.display().to_string(),
        source,
    })
}
