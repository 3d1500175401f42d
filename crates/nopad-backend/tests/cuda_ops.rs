//! CUDA-only checks, beyond the per-op conformance suite (`tests/conformance.rs`, which runs
//! every op on every backend): the output head split into several logits chunks
//! (`Cuda::set_lm_head_chunk_elems`), the caching allocator's steady state and the kernel disk
//! cache (`cuda_ops/runtime.rs`), the staging copies of an offloaded optimizer and its update
//! against the device's (`cuda_ops/staging.rs`), and the op timings at Llama 1B shapes
//! (`cuda_ops/bench.rs`).
//!
//! Comparisons are against `Cpu<f32>` on inputs drawn representable in the CUDA Compute type,
//! with the tolerance model of the conformance suite: 1e-4 relative for fp32 paths, 3·k·u + 1e-4
//! for a result with k bf16 roundings (u = 2^-8). Each comparison prints one line to stderr;
//! failures name the seed (`NOPAD_TEST_SEED`). Without a GPU each test prints
//! `skipped: no CUDA device (...)` and returns.

use nopad_backend::cpu::Cpu;
use nopad_backend::cuda::{probe, Cuda, CudaBuf, CudaDtype, CudaOptions};
use nopad_backend::prelude::*;
use nopad_backend::{GradWrite, Kind};
use nopad_rng::Rng;

#[path = "cuda_ops/bench.rs"]
mod bench;
mod common;
#[path = "cuda_ops/runtime.rs"]
mod runtime;
#[path = "cuda_ops/staging.rs"]
mod staging;
use common::{bf16_tol, cuda_present, say, LmHeadCase, TOL_F32};

/// One mode's pair of backends and its random stream.
struct Env {
    cpu: Cpu<f32>,
    gpu: Cuda,
    mode: CudaDtype,
    /// bf16 parameter gradients (`CudaOptions::bf16_grads`): one more rounding on every
    /// accumulated gradient.
    bf16_grads: bool,
    seed: u64,
    rng: Rng,
}

/// Both modes, or None after printing a visible skip line.
fn envs(test: &str) -> Option<Vec<Env>> {
    if !cuda_present(test) {
        return None;
    }
    let seed = common::seed();
    let mk = |mode, bf16_grads| {
        let opts = CudaOptions {
            dtype: mode,
            bf16_grads,
            ..CudaOptions::default()
        };
        Env {
            cpu: Cpu::new(),
            gpu: Cuda::new(opts).expect("probe() found a device, so Cuda::new must succeed"),
            mode,
            bf16_grads,
            seed,
            rng: Rng::derived(seed, test),
        }
    };
    let envs = vec![
        mk(CudaDtype::F32, false),
        mk(CudaDtype::Bf16, false),
        mk(CudaDtype::Bf16, true),
    ];
    for e in &envs {
        // Compiles every kernel in parallel on first use (later runs read the disk cache).
        e.gpu.warm_up().expect("every kernel compiles");
    }
    Some(envs)
}

fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

impl Env {
    /// Tolerance for a result with `k` bf16 roundings on its path (see the module header).
    fn tol(&self, k: u32) -> f64 {
        match self.mode {
            CudaDtype::F32 => TOL_F32,
            CudaDtype::Bf16 => bf16_tol(k),
        }
    }
    /// Random normal values times `s`, representable in the Compute type.
    fn randn(&mut self, n: usize, s: f32) -> Vec<f32> {
        let bf = self.mode == CudaDtype::Bf16;
        (0..n)
            .map(|_| {
                let x = self.rng.normal() as f32 * s;
                if bf {
                    bf16_round(x)
                } else {
                    x
                }
            })
            .collect()
    }
    /// Extra roundings of an accumulated parameter gradient (1 with bf16 gradients).
    fn gk(&self) -> u32 {
        self.bf16_grads as u32
    }
    /// Uploads `data` into a new GPU buffer of `kind`.
    fn up(&self, data: &[f32], kind: Kind) -> CudaBuf {
        let mut b = self.gpu.alloc(data.len(), kind).expect("alloc");
        self.gpu.write(&mut b, 0, data).expect("write");
        b
    }
    /// A GPU buffer of `len` NaNs.
    fn poison(&self, len: usize, kind: Kind) -> CudaBuf {
        self.up(&vec![f32::NAN; len], kind)
    }
    /// Accumulate or Overwrite, drawn from the seed.
    fn grad_write(&mut self) -> GradWrite {
        if self.rng.uniform() < 0.5 {
            GradWrite::Accumulate
        } else {
            GradWrite::Overwrite
        }
    }
    /// Gradient buffers before an op: `w0`, `b0` when it accumulates, NaN when it overwrites
    /// (whatever an overwrite finds must not leak into its result).
    fn grads_before(&self, w0: &[f32], b0: &[f32], acc: GradWrite) -> (CudaBuf, CudaBuf) {
        match acc {
            GradWrite::Accumulate => (self.up(w0, Kind::Grad), self.up(b0, Kind::Grad)),
            GradWrite::Overwrite => (
                self.poison(w0.len(), Kind::Grad),
                self.poison(b0.len(), Kind::Grad),
            ),
        }
    }
    fn down(&self, b: &CudaBuf) -> Vec<f32> {
        self.gpu.read(b, 0..self.gpu.buf_len(b)).expect("read")
    }
    /// Compares and prints; panics with the seed when the error is over `tol(k)` or NaN.
    fn check(&self, what: &str, got: &[f32], want: &[f32], k: u32) {
        self.check_tol(what, got, want, self.tol(k));
    }
    fn check_tol(&self, what: &str, got: &[f32], want: &[f32], tol: f64) {
        let common::Error { rel, max_abs, nan } = common::error(what, got, want);
        say(&format!(
            "cuda_ops {:<5} {what:<40} rel {rel:.2e} max_abs {max_abs:.2e} (tol {tol:.1e}, n {})",
            format!(
                "{:?}{}",
                self.mode,
                if self.bf16_grads { "+g16" } else { "" }
            ),
            got.len()
        ));
        assert!(
            nan == 0 && rel <= tol,
            "{what} ({:?}): relative error {rel:.3e} > {tol:.1e} or {nan} NaN; seed {} \
             (rerun with NOPAD_TEST_SEED={})",
            self.mode,
            self.seed,
            self.seed
        );
    }
}

#[test]
fn probe_and_describe() {
    let Some(envs) = envs("probe") else { return };
    say(&format!("probe: {}", probe().expect("checked")));
    for e in &envs {
        say(&format!("describe: {}", e.gpu.describe()));
        assert_eq!(e.gpu.needs_master(), e.mode == CudaDtype::Bf16);
    }
}

#[test]
fn lm_head_loss_forward_backward() {
    let Some(envs) = envs("lm_head") else { return };
    for mut e in envs {
        // (n, d, v, chunk rows cap, fraction of rows without a target)
        for (n, d, v, chunk_rows, masked) in [
            (1, 1, 2, 8192, 0.0),
            (37, 67, 131, 5, 0.5),
            (300, 64, 1000, 64, 0.3),
            (16, 8, 11, 8192, 1.0),
        ] {
            e.gpu.set_lm_head_chunk_elems(chunk_rows * v);
            let tag = format!("n={n} d={d} v={v} chunk={chunk_rows} masked={masked}");
            let (x, w) = (e.randn(n * d, 1.0), e.randn(v * d, 0.3));
            let case = LmHeadCase::new((n, d, v), x, w, &mut e.rng, masked);
            let (l0, dw0) = (e.randn(1, 1.0), e.randn(v * d, 1.0));
            let (x, w, targets, dims, scale) =
                (&case.x, &case.w, &case.targets, case.dims, case.scale);
            let (gx, gw) = (e.up(x, Kind::Compute), e.up(w, Kind::Compute));
            let gt = e.gpu.ints(targets).unwrap();
            let mut gl = e.up(&l0, Kind::Master);
            let mut gdx = e.poison(n * d, Kind::Compute);
            let acc = e.grad_write();
            let (mut gdw, _) = e.grads_before(&dw0, &[], acc);
            let tag = format!("{tag} {acc:?}");
            // The GPU's call; evaluation passes no gradient buffers.
            let run = |gl: &mut CudaBuf, grads: Option<(&mut CudaBuf, &mut CudaBuf)>, write| {
                let (gdx, gdw) = grads.unzip();
                e.gpu
                    .lm_head_loss(LmHeadLoss {
                        loss_sum: gl.as_mut(),
                        dx: gdx.map(|g| g.as_mut()),
                        d_w: gdw.map(|g| g.as_mut()),
                        x: gx.as_ref(),
                        w: gw.as_ref(),
                        targets: &gt,
                        dims,
                        grad_scale: scale,
                        write,
                    })
                    .unwrap()
            };
            run(&mut gl, Some((&mut gdx, &mut gdw)), acc);
            let (l, dx, dw) = case.reference(&e.cpu, &l0, &dw0, acc);
            e.check(&format!("lm_head loss {tag}"), &e.down(&gl), &l, 0);
            // dlogits rounded, then the dx GEMM output rounded.
            e.check(&format!("lm_head dx {tag}"), &e.down(&gdx), &dx, 2);
            // With bf16 gradients every chunk's GEMM rounds d_w once more.
            let m = targets.iter().filter(|&&t| t >= 0).count();
            let chunks = m.div_ceil(chunk_rows.min(m.max(1))) as u32;
            e.check(
                &format!("lm_head dw {tag}"),
                &e.down(&gdw),
                &dw,
                1 + e.gk() * chunks,
            );

            // Loss only (evaluation): no gradients touched.
            let mut gl = e.up(&l0, Kind::Master);
            run(&mut gl, None, GradWrite::Accumulate);
            e.check(&format!("lm_head loss-only {tag}"), &e.down(&gl), &l, 0);
        }
    }
}
