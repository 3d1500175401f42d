//! GEMMs through cuBLASLt with cached plans: the matmul descriptor, the four layouts and the
//! heuristic's algorithm are built once per (shape, leading dimensions, transposes, dtypes, beta)
//! and reused, so a training step issues only `cublasLtMatmul` calls.
//!
//! Packed batches change the token count every step, so exact shapes rarely repeat, and the
//! heuristic's first choice for an irregular token count (say 4,346) is often slower than its
//! choice for a round one. The algorithm is therefore taken per *size class* (each dimension
//! rounded up to a multiple of an eighth of its next power of two): a class's algorithm is the
//! heuristic's choice for the class's own rounded shape, and a new exact shape builds its
//! descriptors (cheap) and takes its class's algorithm once `cublasLtMatmulAlgoCheck` accepts it,
//! else asks the heuristic for itself. On the H200 (docs/BENCHMARKS.md, runs 3-5) this took the
//! 1B shape's o_proj forward from 2.8 to 1.2 ms and the qkv forward from 2.8 to 1.7 ms per step;
//! the host cost of a new shape is a few microseconds either way. The algorithm depends on the
//! shape alone, never on which shapes came first, so results do not depend on history (exact
//! resume). The exact-plan cache is cleared when it passes 4096 entries.
//!
//! Everything is column-major as cuBLASLt sees it: `C[m, n] = alpha · op(A)[m, k] · op(B)[k, n] +
//! beta · C`. The row-major callers in `linear.rs` and `lm_head.rs` map their products onto this.
//! Accumulation is fp32 (`CUBLAS_COMPUTE_32F`); with f32 inputs this is true fp32, TF32 stays off.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::memory::Dtype;
use crate::{BackendError, Result};

/// One GEMM's shape and types, the cache key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GemmSpec {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
    /// Type of A and B.
    pub ab: Dtype,
    /// Type of C (= D).
    pub c: Dtype,
    /// Whether C is accumulated into (beta = 1) or overwritten (beta = 0).
    pub accumulate: bool,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created once by `Blas::plan` and is destroyed once here.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// The cuBLASLt handle, the workspace and the plan cache.
pub(crate) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CUdeviceptr,
    workspace_bytes: usize,
    plans: Mutex<HashMap<PlanKey, Plan>>,
    /// The heuristic's algorithm per size class (see the module comment).
    algos: Mutex<HashMap<PlanKey, sys::cublasLtMatmulAlgo_t>>,
}

/// A GEMM and the alignments of its three pointers.
type PlanKey = (GemmSpec, [u32; 3]);

/// `x` rounded up to a multiple of an eighth of the next power of two (at least 64): at most
/// a quarter more than `x`, four classes per octave.
fn size_class(x: u64) -> u64 {
    let p = x.max(64).next_power_of_two();
    let step = p / 8;
    x.max(64).div_ceil(step) * step
}

impl GemmSpec {
    /// The size class: dimensions rounded up (see [`size_class`]), leading dimensions widened
    /// where the rounded matrices need it.
    fn class(&self) -> GemmSpec {
        let (m, n, k) = (size_class(self.m), size_class(self.n), size_class(self.k));
        let a_rows = if self.trans_a { k } else { m };
        let b_rows = if self.trans_b { n } else { k };
        GemmSpec {
            m,
            n,
            k,
            lda: self.lda.max(a_rows as i64),
            ldb: self.ldb.max(b_rows as i64),
            ldc: self.ldc.max(m as i64),
            ..*self
        }
    }
}

// SAFETY: the handle and plans are used under the plan mutex or by one stream at a time; cuBLASLt
// handles may be used from any thread as long as calls are not concurrent on the same stream.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

fn err(op: &str, e: lt::CublasError) -> BackendError {
    BackendError::Device {
        op: format!("cuBLASLt {op}"),
        msg: format!("{e:?}"),
    }
}

fn data_type(d: Dtype) -> sys::cudaDataType {
    match d {
        Dtype::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        Dtype::F32 => sys::cudaDataType::CUDA_R_32F,
        Dtype::I32 => sys::cudaDataType::CUDA_R_32I,
        Dtype::U16 => sys::cudaDataType::CUDA_R_16U,
        Dtype::U8 => sys::cudaDataType::CUDA_R_8U,
    }
}

/// Largest power of two (up to 256) dividing a device address.
fn alignment(ptr: CUdeviceptr) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

impl Blas {
    /// A handle using `workspace` (device memory the caller keeps alive) as scratch.
    pub(crate) fn new(workspace: CUdeviceptr, workspace_bytes: usize) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| err("create", e))?;
        Ok(Blas {
            handle,
            workspace,
            workspace_bytes,
            plans: Mutex::new(HashMap::new()),
            algos: Mutex::new(HashMap::new()),
        })
    }

    /// The descriptors of `s`, with no algorithm yet.
    fn descriptors(&self, s: &GemmSpec) -> Result<Plan> {
        let what = |op: &str| format!("{op} for {s:?}");
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| err(&what("matmul desc"), e))?;
        let set_op = |attr, t: bool| {
            // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 (the enum lives in cuBLAS, not
            // cuBLASLt's bindings).
            let op: i32 = t as i32;
            // SAFETY: `desc` is live; the attribute takes a cublasOperation_t (i32-sized).
            unsafe {
                lt::set_matmul_desc_attribute(
                    desc,
                    attr,
                    &op as *const _ as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }
        };
        set_op(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            s.trans_a,
        )
        .map_err(|e| err(&what("transa"), e))?;
        set_op(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            s.trans_b,
        )
        .map_err(|e| err(&what("transb"), e))?;
        // Stored (pre-op) shapes: op(A) is m x k, op(B) is k x n.
        let (ar, ac) = if s.trans_a { (s.k, s.m) } else { (s.m, s.k) };
        let (br, bc) = if s.trans_b { (s.n, s.k) } else { (s.k, s.n) };
        let layout = |t, r, c, ld| lt::create_matrix_layout(data_type(t), r, c, ld);
        let a = layout(s.ab, ar, ac, s.lda).map_err(|e| err(&what("layout A"), e))?;
        let b = layout(s.ab, br, bc, s.ldb).map_err(|e| err(&what("layout B"), e))?;
        let c = layout(s.c, s.m, s.n, s.ldc).map_err(|e| err(&what("layout C"), e))?;
        Ok(Plan {
            desc,
            a,
            b,
            c,
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        })
    }

    /// The heuristic's first algorithm for the GEMM `p` describes.
    fn heuristic(
        &self,
        p: &Plan,
        s: &GemmSpec,
        align: [u32; 3],
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let what = |op: &str| format!("{op} for {s:?}");
        let (desc, a, b, c) = (p.desc, p.a, p.b, p.c);
        let pref = lt::create_matmul_pref().map_err(|e| err("preference", e))?;
        let ws = self.workspace_bytes;
        // SAFETY: `pref` is live; the attribute takes a u64/size_t byte count.
        let heur = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .and_then(|_| {
                use sys::cublasLtMatmulPreferenceAttributes_t as P;
                let attrs = [
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align[0]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align[1]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align[2]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align[2]),
                ];
                for (attr, bytes) in attrs {
                    lt::set_matmul_pref_attribute(
                        pref,
                        attr,
                        &bytes as *const u32 as *const c_void,
                        std::mem::size_of::<u32>(),
                    )?;
                }
                lt::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref)
            })
        };
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        Ok(heur
            .map_err(|e| err(&what("heuristic (no algorithm)"), e))?
            .algo)
    }

    /// Whether `algo` runs the GEMM `p` describes within the workspace.
    fn accepts(&self, p: &Plan, algo: &sys::cublasLtMatmulAlgo_t) -> bool {
        // SAFETY: the handles are live; `result` is plain data filled by the call.
        unsafe {
            let mut result: sys::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
            let st = sys::cublasLtMatmulAlgoCheck(
                self.handle,
                p.desc,
                p.a,
                p.b,
                p.c,
                p.c,
                algo,
                &mut result,
            );
            st == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && result.workspaceSize <= self.workspace_bytes
        }
    }

    /// The plan of `s`: its descriptors and an algorithm that depends on `s` alone (never on
    /// which shapes came first, so a resumed run computes what an uninterrupted one does).
    fn plan(&self, s: &GemmSpec, align: [u32; 3]) -> Result<Plan> {
        let mut plan = self.descriptors(s)?;
        // The class's algorithm is the heuristic's choice for the class's own shape (the
        // dimensions rounded up, leading dimensions widened to fit).
        let class = s.class();
        let key = (class, align);
        let known = self
            .algos
            .lock()
            .expect("GEMM algo cache poisoned")
            .get(&key)
            .copied();
        let algo = match known {
            Some(a) => a,
            None => {
                let cp = self.descriptors(&class)?;
                let a = self.heuristic(&cp, &class, align)?;
                self.algos
                    .lock()
                    .expect("GEMM algo cache poisoned")
                    .insert(key, a);
                a
            }
        };
        if self.accepts(&plan, &algo) {
            plan.algo = algo;
            return Ok(plan);
        }
        plan.algo = self.heuristic(&plan, s, align)?;
        Ok(plan)
    }

    /// `C = alpha · op(A) · op(B) + (accumulate ? C : 0)` on `stream`.
    ///
    /// # Safety
    /// `a`, `b`, `c` must point to device memory holding the matrices `spec` describes.
    pub(crate) unsafe fn gemm(
        &self,
        spec: GemmSpec,
        alpha: f32,
        a: CUdeviceptr,
        b: CUdeviceptr,
        c: CUdeviceptr,
        stream: CUstream,
    ) -> Result<()> {
        // Views into flat buffers can start anywhere; cuBLASLt's heuristic assumes 256-byte
        // alignment unless told otherwise, so the pointers' alignment is part of the plan key.
        let align = [alignment(a), alignment(b), alignment(c)];
        let mut plans = self.plans.lock().expect("GEMM plan cache mutex poisoned");
        if plans.len() >= 4096 && !plans.contains_key(&(spec, align)) {
            // Every launch so far was enqueued with its own plan's handles, which cuBLASLt has
            // consumed at enqueue time, so dropping them here is safe.
            plans.clear();
        }
        let p = match plans.entry((spec, align)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(&spec, align)?),
        };
        let beta: f32 = if spec.accumulate { 1.0 } else { 0.0 };
        lt::matmul(
            self.handle,
            p.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            a as *const c_void,
            p.a,
            b as *const c_void,
            p.b,
            c as *const c_void,
            p.c,
            c as *mut c_void,
            p.c,
            &p.algo,
            self.workspace as *mut c_void,
            self.workspace_bytes,
            stream as sys::cudaStream_t,
        )
        .map_err(|e| err(&format!("matmul {spec:?}"), e))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        if let Ok(mut plans) = self.plans.lock() {
            plans.clear();
        }
        // SAFETY: created once in `new`.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up_by_an_eighth_of_the_next_power_of_two() {
        assert_eq!(size_class(1), 64);
        assert_eq!(size_class(64), 64);
        assert_eq!(size_class(65), 80);
        assert_eq!(size_class(2048), 2048);
        assert_eq!(size_class(4346), 5120);
        assert_eq!(size_class(5121), 6144);
        for x in 1..100_000u64 {
            let c = size_class(x);
            assert!(c >= x && c <= x.max(64) + x.max(64) / 4, "{x} -> {c}");
        }
    }
}
