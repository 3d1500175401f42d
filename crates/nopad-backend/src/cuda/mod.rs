//! The CUDA backend: [`Cuda`] implements [`crate::Backend`] with bf16 activations and fp32 master
//! weights (or fp32 throughout with [`CudaDtype::F32`], for exact comparison with the CPU),
//! cuBLASLt GEMMs with cached plans, and NVRTC-compiled kernels from the `.cu` files beside each
//! launcher (cached on disk).
//!
//! Nothing here panics when the driver or a library is missing: [`probe`] and [`Cuda::new`] check
//! each library before cudarc touches it and report which one is absent.
//!
//! Module map: `memory` (caching allocator, buffers, views), `compile` (NVRTC, disk cache,
//! launch), `blas` (cuBLASLt plans), `backend` (the `Device`, `Ops` and `OptimizerOps` impls),
//! and one launcher file per op family beside its `.cu` file (`elementwise`, `embedding`,
//! `linear`, `rmsnorm`, `head_norm`, `rope`, `swiglu`, `lm_head`, `adamw`, `decode` (generation:
//! the KV cache's row copy and the one-query attention over it); `attention` has a forward and a
//! backward `.cu`; `adamw_states` launches the low-precision-state kernels of `adamw.cu`).
//! `reduce.cu` has no launcher of its own: its reductions are launched from
//! `elementwise.rs` (sum of squares), `linear.rs` (bias gradient, partial sums, also used by
//! `rmsnorm.rs` and `head_norm.rs`) and `lm_head.rs` (loss sum).
//!
//! One environment variable is read, a diagnostic that never changes results:
//! `NOPAD_CUDA_SYNC=1` synchronises the stream after every kernel launch and checks it, so an
//! asynchronous fault is reported at the kernel that caused it (slow; for debugging). Unset or
//! `0` is off; any other value is an error when the backend opens.

mod adamw;
mod adamw_states;
mod adapter;
mod attention;
mod backend;
mod blas;
mod compile;
mod decode;
mod elementwise;
mod embedding;
mod head_norm;
mod linear;
mod lm_head;
mod memory;
mod nccl;
mod rmsnorm;
mod rope;
mod staging;
mod swiglu;

use memory::ViewInfo;
pub use memory::{CudaBuf, CudaInts, CudaMut, CudaRef, Dtype};
pub use nccl::{nccl_version, shard, NcclComm, NcclId, NcclOptions, HOST_SLOTS, NCCL_ID_BYTES};
pub use staging::CudaHost;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUstream;
use cudarc::driver::{result as cu, CudaContext, CudaStream};

use blas::Blas;
use compile::{KernelFile, Kernels, Launch};
use memory::Pool;

use crate::{BackendError, Result};

/// Element type of Compute buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CudaDtype {
    /// Mixed precision: bf16 weights and activations, fp32 master weights, gradients and moments.
    #[default]
    Bf16,
    /// fp32 everywhere (TF32 off): for exact comparison with the CPU backend.
    F32,
}

/// How to open the CUDA backend.
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Element type of Compute buffers.
    pub dtype: CudaDtype,
    /// Where compiled kernels are cached; `None` means `$XDG_CACHE_HOME/nopad/kernels` or
    /// `~/.cache/nopad/kernels` (no disk cache when neither is known).
    pub cache_dir: Option<PathBuf>,
    /// Parameter gradients in bf16 instead of fp32 (bf16 mode only): 2 bytes per parameter less
    /// memory and traffic; every GEMM still accumulates in fp32 and rounds once when it adds its
    /// product to the gradient, i.e. once per micro-batch (and per logits chunk for the output
    /// head), with round-to-nearest.
    pub bf16_grads: bool,
}

/// Checks that the driver, NVRTC and cuBLASLt libraries can be loaded; the error names the first
/// missing one.
fn check_libraries() -> std::result::Result<(), String> {
    // SAFETY: each check only tries to dlopen the library and reports whether it worked.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(
            "CUDA driver library libcuda.so not found (no NVIDIA driver on this machine?)".into(),
        );
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(
            "NVRTC library libnvrtc.so (CUDA toolkit) not found: install the CUDA \
                    toolkit or add its lib directory to LD_LIBRARY_PATH"
                .into(),
        );
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err(
            "cuBLASLt library libcublasLt.so (CUDA toolkit) not found: install the CUDA \
                    toolkit or add its lib directory to LD_LIBRARY_PATH"
                .into(),
        );
    }
    Ok(())
}

fn describe_device(ordinal: usize) -> std::result::Result<String, String> {
    let e = |what: &str, err: cu::DriverError| format!("{what}: {err}");
    cu::init().map_err(|err| e("cuInit", err))?;
    let count = cu::device::get_count().map_err(|err| e("cuDeviceGetCount", err))?;
    if count <= 0 {
        return Err("no CUDA device found (the driver loaded but reports 0 devices)".into());
    }
    if ordinal >= count as usize {
        return Err(format!(
            "CUDA device {ordinal} requested but only {count} present"
        ));
    }
    let dev = cu::device::get(ordinal as i32).map_err(|err| e("cuDeviceGet", err))?;
    let name = cu::device::get_name(dev).map_err(|err| e("cuDeviceGetName", err))?;
    use cudarc::driver::sys::CUdevice_attribute as A;
    // SAFETY: `dev` is a valid device handle.
    let (major, minor, mem) = unsafe {
        (
            cu::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            cu::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            cu::device::total_mem(dev),
        )
    };
    let major = major.map_err(|err| e("compute capability", err))?;
    let minor = minor.map_err(|err| e("compute capability", err))?;
    let mem = mem.map_err(|err| e("cuDeviceTotalMem", err))?;
    Ok(format!(
        "{name} (device {ordinal} of {count}, compute capability {major}.{minor}, {:.1} GiB)",
        mem as f64 / (1u64 << 30) as f64
    ))
}

/// Whether CUDA can be used here: a description of device 0, or which library is missing / that
/// no device is present. Never panics, loads nothing beyond the libraries it checks.
pub fn probe() -> std::result::Result<String, String> {
    check_libraries()?;
    describe_device(0)
}

fn default_cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("nopad/kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nopad/kernels"))
}

/// cuBLASLt scratch (the size NVIDIA recommends for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// The CUDA backend: one device, one stream, the kernel and GEMM-plan caches and the memory pool.
pub struct Cuda {
    // Field order is drop order: plans and modules go before the context they live in.
    flash: std::sync::OnceLock<std::result::Result<nopad_flash::FlashAttention, String>>,
    /// The flash plan of the last batch (its cu_seqlens and head shape): every layer's forward
    /// and backward of a micro-batch share one plan and its pinned tile lists.
    flash_plan: Mutex<Option<attention::CachedPlan>>,
    /// Events recorded by `Backend::timestamp` (profiling).
    timestamps: Mutex<Vec<cudarc::driver::CudaEvent>>,
    blas: Blas,
    kernels: Kernels,
    _workspace: CudaBuf,
    pool: Arc<Mutex<Pool>>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    compute: Dtype,
    /// Element type of parameter gradients (Kind::Grad): F32, or Bf16 with `bf16_grads`.
    grad: Dtype,
    description: String,
    /// Largest fp32 logits chunk of `lm_head_loss`, in elements.
    lm_head_chunk_elems: usize,
}

impl Cuda {
    /// Opens device `opts.device`. Fails with [`BackendError::Unavailable`] naming the missing
    /// library or device.
    pub fn new(opts: CudaOptions) -> Result<Cuda> {
        check_libraries().map_err(BackendError::Unavailable)?;
        let description = describe_device(opts.device).map_err(BackendError::Unavailable)?;
        let dev = |op: &str, e: cu::DriverError| BackendError::Device {
            op: op.into(),
            msg: e.to_string(),
        };
        let ctx = CudaContext::new(opts.device).map_err(|e| dev("cuCtx (primary context)", e))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| dev("compute capability", e))?;
        let stream = ctx.new_stream().map_err(|e| dev("cuStreamCreate", e))?;
        let pool = Arc::new(Mutex::new(Pool::new(ctx.clone())));
        let cache_dir = opts.cache_dir.or_else(default_cache_dir);
        let kernels = Kernels::new(ctx.clone(), cc, cache_dir)?;
        let workspace = CudaBuf::uninit(&pool, WORKSPACE_BYTES / 4, Dtype::F32)?;
        let blas = Blas::new(workspace.ptr, WORKSPACE_BYTES)?;
        let compute = match opts.dtype {
            CudaDtype::Bf16 => Dtype::Bf16,
            CudaDtype::F32 => Dtype::F32,
        };
        if opts.bf16_grads && compute != Dtype::Bf16 {
            return Err(BackendError::Unsupported(
                "bf16 gradients need bf16 mode (--dtype bf16)".into(),
            ));
        }
        let grad = if opts.bf16_grads {
            Dtype::Bf16
        } else {
            Dtype::F32
        };
        Ok(Cuda {
            flash: std::sync::OnceLock::new(),
            flash_plan: Mutex::new(None),
            timestamps: Mutex::new(Vec::new()),
            blas,
            kernels,
            _workspace: workspace,
            pool,
            stream,
            ctx,
            compute,
            grad,
            description: format!("{description}, compute {compute:?}, gradients {grad:?}"),
            lm_head_chunk_elems: lm_head::CHUNK_ELEMS,
        })
    }

    /// The element type of Compute buffers.
    pub fn compute_dtype(&self) -> Dtype {
        self.compute
    }

    /// Caps the fp32 logits chunk of `lm_head_loss` at `elems` elements (at least one row);
    /// the default is 2^27 (512 MiB). Tests use a small cap to exercise several chunks.
    pub fn set_lm_head_chunk_elems(&mut self, elems: usize) {
        self.lm_head_chunk_elems = elems.max(1);
    }

    /// Compiles (or loads from the disk cache) every kernel for the Compute type and fp32, so that
    /// compile errors and compile time show up at start rather than in the first step.
    pub fn warm_up(&self) -> Result<()> {
        if self.compute == Dtype::F32 {
            self.kernels.load_all(&[Dtype::F32])
        } else {
            self.kernels.load_all(&[self.compute, Dtype::F32])
        }
    }

    /// Times `f` with CUDA events on the backend's stream, in milliseconds (for benchmarks).
    pub fn time_ms(&self, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
        let dev = |op: &str, e: cu::DriverError| BackendError::Device {
            op: op.into(),
            msg: e.to_string(),
        };
        // cudarc's default flags (None) disable timing.
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .ctx
            .new_event(timed)
            .map_err(|e| dev("cuEventCreate", e))?;
        let end = self
            .ctx
            .new_event(timed)
            .map_err(|e| dev("cuEventCreate", e))?;
        start
            .record(&self.stream)
            .map_err(|e| dev("cuEventRecord", e))?;
        f()?;
        end.record(&self.stream)
            .map_err(|e| dev("cuEventRecord", e))?;
        end.synchronize()
            .map_err(|e| dev("cuEventSynchronize", e))?;
        start
            .elapsed_ms(&end)
            .map_err(|e| dev("cuEventElapsedTime", e))
    }

    fn raw_stream(&self) -> CUstream {
        self.stream.cu_stream()
    }

    /// A scratch buffer from the pool (contents undefined).
    fn scratch(&self, len: usize, dtype: Dtype) -> Result<CudaBuf> {
        CudaBuf::uninit(&self.pool, len, dtype)
    }

    /// Launches `<base>_<dtype>` from `file`.
    ///
    /// # Safety
    /// As [`Kernels::launch`]: `P` mirrors the kernel's params struct and its pointers are valid
    /// for the accesses the kernel makes.
    unsafe fn launch<P: Copy>(
        &self,
        file: KernelFile,
        dtype: Dtype,
        base: &str,
        cfg: Launch,
        params: &P,
    ) -> Result<()> {
        self.kernels
            .launch(file, dtype, base, cfg, self.raw_stream(), params)
    }

    fn device_err(&self, op: &str) -> impl Fn(cu::DriverError) -> BackendError + '_ {
        let op = op.to_string();
        move |e| BackendError::Device {
            op: op.clone(),
            msg: e.to_string(),
        }
    }
}

/// Checks that a view has element type `want` and at least `need` elements.
fn want(op: &'static str, name: &str, v: &impl ViewInfo, want: Dtype, need: usize) -> Result<()> {
    let (len, dtype) = (v.len_(), v.dtype_());
    if dtype != want {
        return Err(BackendError::Shape {
            op,
            what: format!("{name} is {dtype:?}, expected {want:?}"),
        });
    }
    if len < need {
        return Err(BackendError::Shape {
            op,
            what: format!("{name} has {len} elements, needs {need}"),
        });
    }
    Ok(())
}
