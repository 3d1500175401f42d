//! The backend conformance suite: one test body per op, `fn <op><B: Backend>(e: &mut Env<B>)`,
//! run on every backend (CPU f64, CPU f32, and CUDA in its three modes when a device is present;
//! without one each CUDA test prints `skipped: no CUDA device (...)`), in the manner of candle's
//! `test_device!`. A new backend passes when it passes this file.
//!
//! Each body draws fresh seeded random data with awkward sizes (1, primes, not a tile multiple),
//! runs the op on the backend under test and the same op on `Cpu<f64>` (the reference, itself
//! checked against naive formulas and f64 finite differences in `src/cpu/tests.rs`) on the same
//! values, and compares norm-wise: ‖got − ref‖ / ‖ref‖ ≤ tolerance, any NaN fails. Inputs are
//! drawn representable in the backend's storage type (bf16 or f32), so both sides see the same
//! numbers. Overwritten outputs start as NaN (an element left unwritten fails); accumulated ones
//! start random (`+=` is checked); both `GradWrite` rules run.
//!
//! Tolerances: f64 1e-12; f32 (CPU, or CUDA with TF32 off) 1e-4, where results that differ only
//! in summation order land near 1e-6. In bf16 a result whose path has k roundings to bf16 has a
//! norm-wise error of at most about k·u (u = 2^-8); reductions over rounded values do not grow it
//! with their length on random data, so the tolerance is 3·k·u + 1e-4 (the factor 3 covers the
//! spread). Each comparison prints one line to stderr; a failure names the seed
//! (`NOPAD_TEST_SEED` reruns it).

use nopad_backend::cpu::Cpu;
use nopad_backend::cuda::{Cuda, CudaDtype, CudaOptions};
use nopad_backend::prelude::*;
use nopad_rng::Rng;

mod common;
use common::{bf16_tol, cuda_present, say, seed, TOL_F32};

/// How a backend stores each [`Kind`], for drawing representable inputs and for tolerances.
#[derive(Clone, Copy, PartialEq)]
enum Store {
    F64,
    F32,
    Bf16,
}

fn round(s: Store, x: f64) -> f64 {
    match s {
        Store::F64 => x,
        Store::F32 => x as f32 as f64,
        Store::Bf16 => nopad_flash::reference::bf16_round(x),
    }
}

/// A backend under test, the reference and the random stream of one test.
struct Env<B: Backend> {
    b: B,
    r: Cpu<f64>,
    name: String,
    compute: Store,
    grad: Store,
    /// Larger shapes (the GPU's), beyond what the CPU runs in CI time.
    big: bool,
    seed: u64,
    rng: Rng,
}

impl<B: Backend> Env<B> {
    fn new(b: B, name: &str, compute: Store, grad: Store, big: bool, test: &str) -> Self {
        let seed = seed();
        Env {
            b,
            r: Cpu::new(),
            name: name.into(),
            compute,
            grad,
            big,
            seed,
            rng: Rng::derived(seed, test),
        }
    }
    fn store(&self, kind: Kind) -> Store {
        match kind {
            Kind::Compute => self.compute,
            Kind::Grad => self.grad,
            Kind::Master if self.compute == Store::F64 => Store::F64,
            Kind::Master => Store::F32,
            // Optimizer states hold bf16 values and 8-bit codes on every backend.
            Kind::Moment16 => Store::Bf16,
            Kind::Code8 => Store::F32,
        }
    }
    /// Tolerance of a result with `k` bf16 roundings on its path (module header).
    fn tol(&self, k: u32) -> f64 {
        match self.compute {
            Store::F64 => 1e-12,
            Store::F32 => TOL_F32,
            Store::Bf16 => bf16_tol(k),
        }
    }
    /// Extra roundings of an accumulated parameter gradient (1 with bf16 gradients).
    fn gk(&self) -> u32 {
        (self.grad == Store::Bf16) as u32
    }
    /// `n` normal values times `s`, representable as `kind` (and as f32, which `write` takes).
    fn randn(&mut self, n: usize, s: f64, kind: Kind) -> Vec<f64> {
        let st = self.store(kind);
        (0..n)
            .map(|_| round(st, (self.rng.normal() * s) as f32 as f64))
            .collect()
    }
    /// `v` as the backend stores it in `kind` (for values one op hands to the next).
    fn round(&self, kind: Kind, v: &[f64]) -> Vec<f64> {
        let st = self.store(kind);
        v.iter().map(|&x| round(st, x as f32 as f64)).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        self.rng.below(n as u64) as usize
    }
    fn up(&self, data: &[f64], kind: Kind) -> B::Buf {
        let mut buf = self.b.alloc(data.len(), kind).expect("alloc");
        let host: Vec<f32> = data.iter().map(|&x| x as f32).collect();
        self.b.write(&mut buf, 0, &host).expect("write");
        buf
    }
    fn poison(&self, len: usize, kind: Kind) -> B::Buf {
        self.up(&vec![f64::NAN; len], kind)
    }
    /// A gradient before an op: `v` when it accumulates, NaN when it overwrites (whatever an
    /// overwrite finds must not leak into its result).
    fn grad_before(&self, v: &[f64], acc: GradWrite) -> B::Buf {
        match acc {
            GradWrite::Accumulate => self.up(v, Kind::Grad),
            GradWrite::Overwrite => self.poison(v.len(), Kind::Grad),
        }
    }
    fn down(&self, buf: &B::Buf) -> Vec<f64> {
        let n = self.b.buf_len(buf);
        self.b.read_f64(buf, 0..n).expect("read")
    }
    /// Compares and prints; panics with the seed when the error is over `tol(k)` or NaN.
    fn check(&self, what: &str, got: &[f64], want: &[f64], k: u32) {
        self.check_tol(what, got, want, self.tol(k));
    }
    fn check_tol(&self, what: &str, got: &[f64], want: &[f64], tol: f64) {
        let common::Error { rel, nan, .. } = common::error(what, got, want);
        say(&format!(
            "conformance {:<12} {what:<44} rel {rel:.2e} (tol {tol:.1e}, n {})",
            self.name,
            got.len()
        ));
        assert!(
            nan == 0 && rel <= tol,
            "{what} on {}: relative error {rel:.3e} > {tol:.1e} or {nan} NaN; seed {} \
             (rerun with NOPAD_TEST_SEED={})",
            self.name,
            self.seed,
            self.seed
        );
    }
}

/// The CUDA backend in its three modes, or none after a visible skip line.
fn cuda_envs(test: &str) -> Vec<Env<Cuda>> {
    if !cuda_present(test) {
        return Vec::new();
    }
    let modes = [
        ("cuda f32", CudaDtype::F32, false, Store::F32, Store::F32),
        ("cuda bf16", CudaDtype::Bf16, false, Store::Bf16, Store::F32),
        (
            "cuda bf16+g16",
            CudaDtype::Bf16,
            true,
            Store::Bf16,
            Store::Bf16,
        ),
    ];
    modes
        .into_iter()
        .map(|(name, dtype, bf16_grads, compute, grad)| {
            let opts = CudaOptions {
                dtype,
                bf16_grads,
                ..CudaOptions::default()
            };
            let gpu = Cuda::new(opts).expect("probe() found a device, so Cuda::new must succeed");
            gpu.warm_up().expect("every kernel compiles");
            Env::new(gpu, name, compute, grad, true, test)
        })
        .collect()
}

/// One `#[test]` per (backend, op): the same body for every backend.
macro_rules! conformance {
    ($($op:ident),* $(,)?) => {
        conformance!(@cpu cpu_f64, f64, F64, "cpu f64"; $($op),*);
        conformance!(@cpu cpu_f32, f32, F32, "cpu f32"; $($op),*);
        mod cuda {
            $(#[test]
            fn $op() {
                for mut e in super::cuda_envs(stringify!($op)) {
                    super::$op(&mut e);
                }
            })*
        }
    };
    // The CPU backend of element type $t, storing compute values and gradients as $store.
    (@cpu $module:ident, $t:ty, $store:ident, $name:literal; $($op:ident),*) => {
        mod $module {
            $(#[test]
            fn $op() {
                let b = nopad_backend::cpu::Cpu::<$t>::new();
                let (c, g) = (super::Store::$store, super::Store::$store);
                super::$op(&mut super::Env::new(b, $name, c, g, false, stringify!($op)));
            })*
        }
    };
}

conformance!(
    elementwise,
    embedding,
    linear,
    linear_frozen_and_adapter,
    rmsnorm,
    head_rmsnorm,
    rope,
    swiglu,
    attention,
    attention_window,
    lm_head,
    adamw,
    adamw_states,
    columns_linear,
    dropout,
    rmsnorm_frozen,
    dequant_nf4,
    copy_rows,
    decode_attention,
);

#[path = "conformance/ops.rs"]
mod ops;
use ops::*;
#[path = "conformance/optim.rs"]
mod optim;
use optim::adamw_states;
#[path = "conformance/adapter.rs"]
mod adapter;
use adapter::{columns_linear, dequant_nf4, dropout, rmsnorm_frozen};
#[path = "conformance/decode.rs"]
mod decode;
use decode::{copy_rows, decode_attention};
