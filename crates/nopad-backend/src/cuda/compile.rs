//! Kernel compilation and launch: NVRTC compiles each `.cu` file (prefixed with `prelude.cuh`)
//! once per element type for the device's architecture; compiled images are cached on disk,
//! keyed by a hash of source, options, compute capability and NVRTC version; loaded functions
//! are cached in memory. Launches take one `repr(C)` params struct mirrored in the `.cu` file.
//!
//! Compile errors carry the file name, the options and NVRTC's full log.

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUfunction, CUfunction_attribute, CUstream};
use cudarc::driver::{result as cu, CudaContext, CudaModule};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use super::memory::Dtype;
use crate::{BackendError, Result};

const PRELUDE: &str = include_str!("prelude.cuh");

/// One `.cu` source file: its name (for logs and cache files) and its text.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KernelFile {
    pub name: &'static str,
    pub src: &'static str,
}

macro_rules! kernel_file {
    ($name:literal) => {
        KernelFile {
            name: $name,
            src: include_str!($name),
        }
    };
    // A file that starts with a header shared with other files; the `#line` directives keep
    // NVRTC's messages pointing at the right file and line.
    ($header:literal, $name:literal) => {
        KernelFile {
            name: $name,
            src: concat!(
                "#line 1 \"",
                $header,
                "\"\n",
                include_str!($header),
                "#line 1 \"",
                $name,
                "\"\n",
                include_str!($name)
            ),
        }
    };
}

pub(crate) const ELEMENTWISE: KernelFile = kernel_file!("elementwise.cu");
pub(crate) const REDUCE: KernelFile = kernel_file!("reduce.cu");
pub(crate) const EMBEDDING: KernelFile = kernel_file!("embedding.cu");
pub(crate) const LINEAR: KernelFile = kernel_file!("linear.cu");
pub(crate) const RMSNORM: KernelFile = kernel_file!("rmsnorm.cu");
pub(crate) const ROPE: KernelFile = kernel_file!("rope.cu");
pub(crate) const HEAD_NORM: KernelFile = kernel_file!("head_norm.cu");
pub(crate) const SWIGLU: KernelFile = kernel_file!("swiglu.cu");
pub(crate) const LM_HEAD: KernelFile = kernel_file!("lm_head.cu");
pub(crate) const ADAMW: KernelFile = kernel_file!("adamw.cu");
pub(crate) const ADAPTER: KernelFile = kernel_file!("adapter.cu");
pub(crate) const ATTENTION_FWD: KernelFile = kernel_file!("attention.cuh", "attention_fwd.cu");
pub(crate) const ATTENTION_BWD: KernelFile = kernel_file!("attention.cuh", "attention_bwd.cu");
pub(crate) const DECODE: KernelFile = kernel_file!("decode.cu");

/// Every kernel file, for the compile-everything test and warm-up.
pub(crate) const ALL_FILES: [KernelFile; 14] = [
    ELEMENTWISE,
    REDUCE,
    EMBEDDING,
    LINEAR,
    RMSNORM,
    ROPE,
    HEAD_NORM,
    SWIGLU,
    LM_HEAD,
    ADAMW,
    ADAPTER,
    ATTENTION_FWD,
    ATTENTION_BWD,
    DECODE,
];

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Launch {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: u32,
}

impl Launch {
    /// A 1-D launch of `n` threads in blocks of `block` (at least one block).
    pub fn flat(n: usize, block: u32) -> Self {
        let blocks = n.div_ceil(block as usize).clamp(1, 1 << 30) as u32;
        Launch {
            grid: (blocks, 1, 1),
            block,
            smem: 0,
        }
    }

    /// An `x` by `y` grid of 256-thread blocks with no dynamic shared memory (the shape of
    /// most of this crate's launches).
    pub fn blocks(x: usize, y: usize) -> Self {
        Launch {
            grid: (x as u32, y as u32, 1),
            block: 256,
            smem: 0,
        }
    }

    /// One 256-thread block per row of `rows`.
    pub fn per_row(rows: usize) -> Self {
        Self::blocks(rows, 1)
    }
}

/// Include directory of the CUDA toolkit (`$CUDA_HOME/include` or `/usr/local/cuda/include`).
fn cuda_include() -> String {
    let home = std::env::var("CUDA_HOME")
        .or_else(|_| std::env::var("CUDA_PATH"))
        .unwrap_or_else(|_| "/usr/local/cuda".to_string());
    format!("{home}/include")
}

/// `sm_XY`, with the `a` suffix from compute capability 9.0 on: nopad-flash's table, the one
/// the workspace uses, so the backend's kernels and the flash kernels compile for one target.
pub(crate) fn arch_for(cc: (i32, i32)) -> String {
    nopad_flash::arch_for(cc)
}

/// FNV-1a, 64 bits: stable across Rust releases, unlike `DefaultHasher`.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Version of the loaded NVRTC library.
pub(crate) fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes two ints.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| BackendError::Device {
            op: "nvrtcVersion".into(),
            msg: format!("{e:?}"),
        })?;
    Ok((major, minor))
}

/// The NVRTC options of one file and element type.
fn options(arch: &str, dtype: Dtype) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        format!("-I{}", cuda_include()),
        format!("-DNOPAD_BF16={}", (dtype == Dtype::Bf16) as i32),
        "--std=c++17".into(),
        "-lineinfo".into(),
    ]
}

/// Compiles one kernel file to a cubin for `arch`, returning the image.
pub(crate) fn compile_cubin(file: KernelFile, dtype: Dtype, arch: &str) -> Result<Vec<u8>> {
    let opts = options(arch, dtype);
    let src = format!("{PRELUDE}\n#line 1 \"{}\"\n{}", file.name, file.src);
    compile_source(file.name, &format!("{dtype:?}"), src, &opts)
}

/// Compiles a complete translation unit with NVRTC; `label` tells errors which variant it was.
fn compile_source(name: &str, label: &str, src: String, opts: &[String]) -> Result<Vec<u8>> {
    let fail = |what: &str, e: nvrtc::NvrtcError| BackendError::Device {
        op: format!("NVRTC {name} ({label})"),
        msg: format!("{what}: {e:?}"),
    };
    let c_src = CString::new(src).map_err(|_| BackendError::Device {
        op: format!("NVRTC {name}"),
        msg: "source contains a NUL byte".into(),
    })?;
    let c_name = CString::new(name).map_err(|_| BackendError::Device {
        op: format!("NVRTC {name}"),
        msg: "file name contains a NUL byte".into(),
    })?;
    let prog = nvrtc::create_program(&c_src, Some(&c_name)).map_err(|e| fail("create", e))?;
    // SAFETY: `prog` is live until the destroy below; the options are plain strings.
    let compiled = unsafe { nvrtc::compile_program(prog, opts) };
    let out = match compiled {
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; the buffer has the reported size.
            unsafe {
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| fail("cubin size", e))?;
                let mut image = vec![0u8; size];
                nvrtc_sys::nvrtcGetCUBIN(prog, image.as_mut_ptr().cast())
                    .result()
                    .map_err(|e| fail("cubin", e))?;
                Ok(image)
            }
        }
        Err(e) => {
            // SAFETY: `prog` is live; the log is NUL-terminated.
            let log = unsafe { nvrtc::get_program_log(prog) }
                .map(|l| {
                    // SAFETY: NVRTC terminates its log with NUL.
                    unsafe { CStr::from_ptr(l.as_ptr()) }
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            Err(BackendError::Device {
                op: format!("NVRTC {name} ({label})"),
                msg: format!(
                    "compilation failed ({e:?}) with options {}:\n{log}",
                    opts.join(" ")
                ),
            })
        }
    };
    // SAFETY: destroyed once.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    out
}

/// Compiled modules and loaded functions of one device.
pub(crate) struct Kernels {
    ctx: Arc<CudaContext>,
    arch: String,
    cc: (i32, i32),
    nvrtc: (i32, i32),
    cache_dir: Option<PathBuf>,
    modules: Mutex<HashMap<(&'static str, Dtype), Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CUfunction>>,
    /// Synchronise and check after every launch (`NOPAD_CUDA_SYNC=1`).
    sync_each: bool,
}

// SAFETY: CUfunction handles are plain driver handles, valid from any thread once the context is
// bound; the maps are behind mutexes.
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

impl Kernels {
    pub(crate) fn new(
        ctx: Arc<CudaContext>,
        cc: (i32, i32),
        cache_dir: Option<PathBuf>,
    ) -> Result<Self> {
        Ok(Kernels {
            ctx,
            arch: arch_for(cc),
            cc,
            nvrtc: nvrtc_version()?,
            cache_dir,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            sync_each: sync_each_from_env()?,
        })
    }

    fn cache_path(&self, file: KernelFile, dtype: Dtype) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let opts = options(&self.arch, dtype).join(" ");
        let key = fnv1a(&[
            PRELUDE.as_bytes(),
            file.src.as_bytes(),
            opts.as_bytes(),
            format!(
                "cc{}.{} nvrtc{}.{}",
                self.cc.0, self.cc.1, self.nvrtc.0, self.nvrtc.1
            )
            .as_bytes(),
        ]);
        let stem = file.name.trim_end_matches(".cu");
        Some(dir.join(format!("{stem}-{}-{key:016x}.cubin", dtype.suffix())))
    }

    /// The cached image of a file, or a fresh compile (written to the cache).
    fn image(&self, file: KernelFile, dtype: Dtype) -> Result<Vec<u8>> {
        let path = self.cache_path(file, dtype);
        if let Some(image) = path.as_deref().and_then(|p| std::fs::read(p).ok()) {
            return Ok(image);
        }
        let image = compile_cubin(file, dtype, &self.arch)?;
        if let Some(p) = &path {
            write_atomically(p, &image);
        }
        Ok(image)
    }

    fn insert_module(
        &self,
        modules: &mut HashMap<(&'static str, Dtype), Arc<CudaModule>>,
        file: KernelFile,
        dtype: Dtype,
        image: Vec<u8>,
    ) -> Result<Arc<CudaModule>> {
        let module =
            self.ctx
                .load_module(Ptx::from_binary(image))
                .map_err(|e| BackendError::Device {
                    op: format!("cuModuleLoadData({})", file.name),
                    msg: e.to_string(),
                })?;
        modules.insert((file.name, dtype), module.clone());
        Ok(module)
    }

    /// A loader for sources that are not the backend's own files (nopad-flash's kernels),
    /// sharing the device, options and disk cache.
    pub(crate) fn external_loader(&self) -> ExternalLoader {
        ExternalLoader {
            ctx: self.ctx.clone(),
            arch: self.arch.clone(),
            cc: self.cc,
            nvrtc: self.nvrtc,
            cache_dir: self.cache_dir.clone(),
        }
    }

    fn module(&self, file: KernelFile, dtype: Dtype) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().expect("kernel cache mutex poisoned");
        if let Some(m) = modules.get(&(file.name, dtype)) {
            return Ok(m.clone());
        }
        let image = self.image(file, dtype)?;
        self.insert_module(&mut modules, file, dtype, image)
    }

    fn function(&self, file: KernelFile, dtype: Dtype, name: &str) -> Result<CUfunction> {
        let key = format!("{}:{name}", file.name);
        if let Some(f) = self
            .functions
            .lock()
            .expect("kernel cache mutex poisoned")
            .get(&key)
        {
            return Ok(*f);
        }
        let module = self.module(file, dtype)?;
        let f = module
            .load_function(name)
            .map_err(|e| BackendError::Device {
                op: format!("cuModuleGetFunction({name} in {})", file.name),
                msg: e.to_string(),
            })?;
        // The module stays loaded in `modules` for the life of `self`, so the raw handle does too.
        let raw = f.cu_function();
        self.functions
            .lock()
            .expect("kernel cache mutex poisoned")
            .insert(key, raw);
        Ok(raw)
    }

    /// Launches `<base>_<dtype>` from `file` with one params struct.
    ///
    /// # Safety
    /// `P` must be the `repr(C)` mirror of the kernel's params struct, and every pointer in it
    /// must be valid for the accesses the kernel makes with the given launch geometry.
    pub(crate) unsafe fn launch<P: Copy>(
        &self,
        file: KernelFile,
        dtype: Dtype,
        base: &str,
        cfg: Launch,
        stream: CUstream,
        params: &P,
    ) -> Result<()> {
        let name = format!("{base}_{}", dtype.suffix());
        let dev = |what: &str, e: cu::DriverError| BackendError::Device {
            op: format!("{name} ({}, {what})", file.name),
            msg: e.to_string(),
        };
        self.ctx.bind_to_thread().map_err(|e| dev("bind", e))?;
        let f = self.function(file, dtype, &name)?;
        if cfg.smem > 48 * 1024 {
            cu::function::set_function_attribute(
                f,
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.smem as i32,
            )
            .map_err(|e| dev("shared memory attribute", e))?;
        }
        let mut p = *params;
        let mut args = [&mut p as *mut P as *mut c_void];
        cu::launch_kernel(f, cfg.grid, (cfg.block, 1, 1), cfg.smem, stream, &mut args)
            .map_err(|e| dev("launch", e))?;
        if self.sync_each {
            cu::stream::synchronize(stream).map_err(|e| dev("NOPAD_CUDA_SYNC check", e))?;
        }
        Ok(())
    }

    /// Compiles (in parallel, one thread per file) or loads from the disk cache every kernel
    /// file for each of `dtypes`, and loads the modules: warm-up, and compile errors at start.
    pub(crate) fn load_all(&self, dtypes: &[Dtype]) -> Result<()> {
        let mut modules = self.modules.lock().expect("kernel cache mutex poisoned");
        let jobs: Vec<(KernelFile, Dtype)> = dtypes
            .iter()
            .flat_map(|&d| ALL_FILES.iter().map(move |&f| (f, d)))
            .filter(|(f, d)| !modules.contains_key(&(f.name, *d)))
            .collect();
        let images: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|&(f, d)| s.spawn(move || self.image(f, d)))
                .collect();
            handles
                .into_iter()
                .zip(&jobs)
                .map(|(h, (f, _))| {
                    h.join().unwrap_or_else(|_| {
                        Err(BackendError::Device {
                            op: format!("NVRTC {}", f.name),
                            msg: "the compiling thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        for ((file, dtype), image) in jobs.into_iter().zip(images) {
            self.insert_module(&mut modules, file, dtype, image?)?;
        }
        Ok(())
    }
}

/// `NOPAD_CUDA_SYNC`: unset or `0` off, `1` on; anything else is a typo, reported rather than
/// silently ignored.
fn sync_each_from_env() -> Result<bool> {
    parse_sync(std::env::var_os("NOPAD_CUDA_SYNC").as_deref())
}

fn parse_sync(v: Option<&std::ffi::OsStr>) -> Result<bool> {
    match v.map(|v| v.to_str()) {
        None => Ok(false),
        Some(Some("0")) => Ok(false),
        Some(Some("1")) => Ok(true),
        Some(other) => Err(BackendError::Unsupported(format!(
            "NOPAD_CUDA_SYNC={}: expected 1 (synchronise after every kernel launch) or 0 (off)",
            other.unwrap_or("<not UTF-8>")
        ))),
    }
}

fn write_atomically(path: &Path, data: &[u8]) {
    // A failed cache write only costs a recompile next time; it never fails the run.
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, data).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Compiles self-contained sources with the backend's NVRTC options and disk cache.
pub(crate) struct ExternalLoader {
    ctx: Arc<CudaContext>,
    arch: String,
    cc: (i32, i32),
    nvrtc: (i32, i32),
    cache_dir: Option<PathBuf>,
}

impl ExternalLoader {
    /// Compiles (or loads from the disk cache) `src` as module `name`.
    pub(crate) fn load(&self, name: &str, src: &str) -> Result<Arc<CudaModule>> {
        let opts = options(&self.arch, Dtype::Bf16);
        let key = fnv1a(&[
            src.as_bytes(),
            opts.join(" ").as_bytes(),
            format!(
                "cc{}.{} nvrtc{}.{}",
                self.cc.0, self.cc.1, self.nvrtc.0, self.nvrtc.1
            )
            .as_bytes(),
        ]);
        let path = self
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{}-{key:016x}.cubin", name.trim_end_matches(".cu"))));
        let image = match path.as_deref().and_then(|p| std::fs::read(p).ok()) {
            Some(image) => image,
            None => {
                let image = compile_source(name, "external", src.to_string(), &opts)?;
                if let Some(p) = &path {
                    write_atomically(p, &image);
                }
                image
            }
        };
        self.ctx
            .load_module(Ptx::from_binary(image))
            .map_err(|e| BackendError::Device {
                op: format!("cuModuleLoadData({name})"),
                msg: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Compiles every kernel file for both element types with NVRTC for sm_90a. Needs only
    /// libnvrtc (no GPU): e.g. `LD_LIBRARY_PATH=/opt/cudalocal/nvidia/cu13/lib`.
    #[test]
    fn every_kernel_file_compiles_with_nvrtc() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { nvrtc_sys::is_culib_present() } {
            let _ = writeln!(
                std::io::stderr(),
                "skipped: libnvrtc not found (set LD_LIBRARY_PATH to a CUDA toolkit's lib)"
            );
            return;
        }
        for file in ALL_FILES {
            for dtype in [Dtype::Bf16, Dtype::F32] {
                match compile_cubin(file, dtype, "sm_90a") {
                    Ok(image) => assert!(!image.is_empty(), "{} gave an empty cubin", file.name),
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }

    #[test]
    fn sync_flag_accepts_0_and_1_and_rejects_typos() {
        use std::ffi::OsStr;
        assert!(!parse_sync(None).unwrap());
        assert!(!parse_sync(Some(OsStr::new("0"))).unwrap());
        assert!(parse_sync(Some(OsStr::new("1"))).unwrap());
        let err = parse_sync(Some(OsStr::new("yes"))).unwrap_err().to_string();
        assert!(err.contains("NOPAD_CUDA_SYNC=yes"), "{err}");
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_for((9, 0)), "sm_90a");
        assert_eq!(arch_for((8, 6)), "sm_86");
    }
}
