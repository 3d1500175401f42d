//! nopad-flash-check: the correctness and speed harness of nopad-flash's kernels, behind the
//! `flash-check` binary: device setup with an NVRTC loader, seeded random data, the test and
//! benchmark shapes (`docs/FLASH.md` section 11), and raw little-endian dumps that
//! `bench/flash_vs_torch.py` reads.
//!
//! `check` compares every route the device can run (its own and, on Hopper, the mma.sync one)
//! against the f64 CPU reference with FlashAttention's rule; `bench` times the device's route
//! with CUDA events. Nothing here is used by training, and nothing reads environment variables
//! but `CUDA_HOME`: every knob is a flag of the binary.

pub mod bench;
pub mod check;

use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule, CudaSlice, CudaStream, DevicePtr};
use rayon::prelude::*;

use nopad_flash::{arch_for, has_wgmma, FlashAttention, FlashDims, FlashError};

/// Harness failures (setup, driver, files), with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// No usable CUDA driver or device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A bad flag value (names the flag).
    #[error("{0}")]
    Config(String),
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
    /// The kernels on the device's own route.
    pub fa: FlashAttention,
    /// On a device with wgmma, the same kernels on the mma.sync route (that of every other
    /// device), so one Hopper run checks both; `None` elsewhere.
    pub fa_mma_sync: Option<FlashAttention>,
    /// e.g. "sm_90a"
    pub arch: String,
}

/// Text substitutions applied to the kernel sources before compiling (`--subst`): the
/// harness's way to try a kernel change without rebuilding. Never used by the library.
pub type Substitutions = Vec<(String, String)>;

/// Parse `from=>to;;from2=>to2`; every `from` must occur in some kernel source, so a stale
/// experiment fails loudly instead of silently measuring the shipped kernels.
pub fn parse_substitutions(spec: &str) -> Result<Substitutions, HarnessError> {
    let mut out = Vec::new();
    for part in spec.split(";;").filter(|p| !p.trim().is_empty()) {
        let Some((from, to)) = part.split_once("=>") else {
            return Err(HarnessError::Config(format!(
                "--subst: entry without '=>': {part}"
            )));
        };
        if !nopad_flash::SOURCES
            .iter()
            .any(|(_, src)| src.contains(from))
        {
            return Err(HarnessError::Config(format!(
                "--subst: '{from}' occurs in no kernel source"
            )));
        }
        out.push((from.to_string(), to.to_string()));
    }
    Ok(out)
}

impl Gpu {
    /// Open device 0 and compile the kernels with NVRTC for its architecture (with `subst`
    /// applied to the sources first).
    pub fn new(subst: &[(String, String)]) -> Result<Gpu, HarnessError> {
        // SAFETY: only probes whether libcuda can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(HarnessError::NoDevice("libcuda could not be loaded".into()));
        }
        let ctx = CudaContext::new(0).map_err(|e| HarnessError::NoDevice(e.to_string()))?;
        let cap = ctx
            .compute_capability()
            .map_err(drv("compute capability"))?;
        let cuda_home = std::env::var("CUDA_HOME").unwrap_or_else(|_| "/usr/local/cuda".into());
        let compile = nopad_flash::ptx_loader(ctx.clone(), format!("{cuda_home}/include"))?;
        let subst = subst.to_vec();
        let load = move |name: &str, src: &str| -> Result<Arc<CudaModule>, String> {
            let mut src = src.to_string();
            for (from, to) in &subst {
                src = src.replace(from.as_str(), to);
            }
            compile(name, &src)
        };
        let fa = FlashAttention::new(&load)?;
        let fa_mma_sync = match has_wgmma(cap) {
            true => Some(FlashAttention::with_capability(&load, (8, 0))?),
            false => None,
        };
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            fa,
            fa_mma_sync,
            arch: arch_for(cap),
        })
    }
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
    /// Sliding window (`FlashDims::window`): a query sees itself and the W - 1 keys before it.
    /// `None` for plain causal attention.
    pub window: Option<usize>,
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
            window: None,
        }
    }

    /// The same batch under a sliding window of `window` keys, named `<name>_w<window>`.
    pub fn with_window(mut self, window: usize) -> Shape {
        self.name = format!("{}_w{window}", self.name);
        self.window = Some(window);
        self
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
            window: self.window,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutions_must_match_a_kernel_source() {
        let ok = parse_substitutions("#define FWD_THREADS=>#define FWD_THREADS;;").expect("valid");
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].1, "#define FWD_THREADS");
        assert!(matches!(
            parse_substitutions("no such text anywhere=>x"),
            Err(HarnessError::Config(_))
        ));
        assert!(matches!(
            parse_substitutions("missing arrow"),
            Err(HarnessError::Config(_))
        ));
    }

    #[test]
    fn shapes_give_consistent_dims() {
        let s = Shape::from_lens("x", &[3, 0, 130], 4, 2, 64);
        let d = s.dims();
        assert_eq!((d.n, d.n_seqs, d.max_seqlen), (133, 3, 130));
        assert_eq!(s.row(), (4 + 2 * 2) * 64);
        assert_eq!(s.cu, [0, 3, 3, 133]);
    }

    #[test]
    fn check_and_bench_shapes_are_deterministic_in_the_seed() {
        let names = |v: Vec<Shape>| v.into_iter().map(|s| (s.name, s.cu)).collect::<Vec<_>>();
        assert_eq!(names(check::check_shapes(5)), names(check::check_shapes(5)));
        assert_eq!(names(bench::bench_shapes(5)), names(bench::bench_shapes(5)));
        // 4 per (Dh, G), 1 x 8192, 2 tiny; windowed: 2 x 5 windows, 2 long, 1 fits, 2 tiny.
        let shapes = check::check_shapes(5);
        assert_eq!(shapes.len(), 4 * 4 + 3 + 15);
        let windowed: Vec<&Shape> = shapes.iter().filter(|s| s.window.is_some()).collect();
        assert_eq!(windowed.len(), 15);
        for s in &windowed {
            let w = s.window.unwrap_or(0);
            assert!(s.name.ends_with(&format!("_w{w}")), "{}", s.name);
            assert_eq!(s.dims().window, Some(w));
        }
        // All but the `winfits` shape have a sequence the window hides keys of.
        let hiding = windowed
            .iter()
            .filter(|s| s.dims().window_within(s.dims().max_seqlen).is_some())
            .count();
        assert_eq!(hiding, 14);
    }
}
