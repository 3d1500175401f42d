//! Every op of the CUDA backend against the CPU backend (`Cpu<f32>`), forward and backward, on
//! fresh random data with awkward sizes, in both CUDA modes:
//!
//! - `F32`: fp32 everywhere, TF32 off. Tolerance `TOL_F32` = 1e-4 relative: fp32 results that
//!   differ only in summation order land near 1e-6.
//! - `Bf16`: inputs are drawn as bf16-representable values (so both backends see the same
//!   numbers) and the CPU computes in f32. A result whose path has k roundings to bf16 (outputs
//!   and bf16 intermediates) has a norm-wise relative error of at most about k·u, with
//!   u = 2^-8 the unit roundoff of bf16 (8 significant bits; round-to-nearest errs by at most
//!   half its 2^-7 spacing at 1). Reductions over rounded intermediates do not grow it with the reduction length
//!   K on random data (the rounding errors and the sum both grow like √K), so the tolerance is
//!   `3·k·u + TOL_F32`, the factor 3 covering the spread of that ratio; fp32 paths have k = 0.
//!
//! Errors are ‖out − ref‖ / ‖ref‖; any NaN fails. Overwritten outputs are pre-filled with NaN so
//! unwritten elements are caught; accumulated outputs start from random values so `+=` is
//! checked. Each comparison prints one line (op, mode, error, tolerance) to stderr directly,
//! which libtest does not capture; failures name the seed. Without a GPU each test prints
//! `skipped: no CUDA device (...)` and returns.

use std::io::Write;

use nopad_backend::cpu::Cpu;
use nopad_backend::cuda::{probe, Cuda, CudaBuf, CudaDtype, CudaOptions};
use nopad_backend::prelude::*;
use nopad_backend::{AdamW, GradWrite, Kind, LinearDims, RopeDims};
use nopad_rng::Rng;

#[path = "cuda_ops/attention.rs"]
mod attention;
#[path = "cuda_ops/bench.rs"]
mod bench;
#[path = "cuda_ops/runtime.rs"]
mod runtime;

const TOL_F32: f64 = 1e-4;
const BF16_U: f64 = 1.0 / 256.0;

fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

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
    if let Err(reason) = probe() {
        say(&format!("skipped: no CUDA device ({reason}) [{test}]"));
        return None;
    }
    let seed = std::env::var("NOPAD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
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
            CudaDtype::Bf16 => 3.0 * k as f64 * BF16_U + TOL_F32,
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
    fn below(&mut self, n: usize) -> usize {
        self.rng.below(n as u64) as usize
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
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let (mut num, mut den, mut max_abs) = (0f64, 0f64, 0f64);
        let mut nan = 0usize;
        for (&g, &w) in got.iter().zip(want) {
            if g.is_nan() {
                nan += 1;
            }
            let d = (g as f64 - w as f64).abs();
            num += d * d;
            den += (w as f64) * (w as f64);
            max_abs = max_abs.max(d);
        }
        let rel = num.sqrt() / den.sqrt().max(1e-30);
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
fn add_add_assign_sum_squares() {
    let Some(envs) = envs("add") else { return };
    for mut e in envs {
        for n in [1, 7, 1031, 1024, 100_003, 100_000] {
            let (a, b, o) = (e.randn(n, 1.0), e.randn(n, 1.0), e.randn(n, 1.0));
            let (ga, gb) = (e.up(&a, Kind::Compute), e.up(&b, Kind::Compute));
            let mut gout = e.poison(n + 3, Kind::Compute);
            let go = gout.as_mut();
            e.gpu.add(go, ga.as_ref(), gb.as_ref(), n).unwrap();
            let mut want = vec![0f32; n];
            e.cpu.add(&mut want, &a, &b, n).unwrap();
            e.check(&format!("add n={n}"), &e.down(&gout)[..n], &want, 1);
            assert!(
                e.down(&gout)[n..].iter().all(|x| x.is_nan()),
                "add wrote past n"
            );

            let mut gacc = e.up(&o, Kind::Compute);
            e.gpu.add_assign(gacc.as_mut(), ga.as_ref(), n).unwrap();
            let mut want = o.clone();
            e.cpu.add_assign(&mut want, &a, n).unwrap();
            e.check(&format!("add_assign n={n}"), &e.down(&gacc), &want, 1);

            let m = e.up(&a, Kind::Master);
            for (name, buf) in [("compute", &ga), ("master", &m)] {
                let got = e.gpu.sum_squares(buf.as_ref(), n).unwrap();
                let want = e.cpu.sum_squares(&a, n).unwrap();
                e.check(
                    &format!("sum_squares {name} n={n}"),
                    &[got as f32],
                    &[want as f32],
                    0,
                );
            }
        }
    }
}

#[test]
fn embedding_forward_backward() {
    let Some(envs) = envs("embedding") else {
        return;
    };
    for mut e in envs {
        for (n, v, d) in [(1, 1, 1), (37, 11, 13), (300, 97, 67)] {
            let table = e.randn(v * d, 1.0);
            let tokens: Vec<i32> = (0..n).map(|_| e.below(v) as i32).collect();
            let gt = e.gpu.ints(&tokens).unwrap();
            let gtab = e.up(&table, Kind::Compute);
            let mut gx = e.poison(n * d, Kind::Compute);
            e.gpu
                .embedding_forward(EmbeddingFwd {
                    x: gx.as_mut(),
                    table: gtab.as_ref(),
                    tokens: &gt,
                    n,
                    d,
                })
                .unwrap();
            let mut want = vec![0f32; n * d];
            e.cpu
                .embedding_forward(EmbeddingFwd {
                    x: &mut want,
                    table: &table,
                    tokens: &tokens,
                    n,
                    d,
                })
                .unwrap();
            e.check(
                &format!("embedding_fwd n={n} v={v} d={d}"),
                &e.down(&gx),
                &want,
                0,
            );

            let (dx, acc) = (e.randn(n * d, 1.0), e.randn(v * d, 1.0));
            let gdx = e.up(&dx, Kind::Compute);
            let mut gdt = e.up(&acc, Kind::Grad);
            e.gpu
                .embedding_backward(EmbeddingBwd {
                    d_table: gdt.as_mut(),
                    dx: gdx.as_ref(),
                    tokens: &gt,
                    n,
                    d,
                })
                .unwrap();
            let mut want = acc.clone();
            e.cpu
                .embedding_backward(EmbeddingBwd {
                    d_table: &mut want,
                    dx: &dx,
                    tokens: &tokens,
                    n,
                    d,
                })
                .unwrap();
            e.check(
                &format!("embedding_bwd n={n} v={v} d={d}"),
                &e.down(&gdt),
                &want,
                e.gk(),
            );
        }
    }
}

#[test]
fn linear_forward_backward() {
    let Some(envs) = envs("linear") else { return };
    for mut e in envs {
        for (n, d_in, d_out, bias) in [
            (1, 1, 1, false),
            (1, 3, 5, true),
            (37, 67, 131, true),
            (131, 256, 97, false),
            (509, 64, 320, true),
        ] {
            let dims = LinearDims { n, d_in, d_out };
            let tag = format!("n={n} in={d_in} out={d_out} bias={bias}");
            let (x, w, b) = (
                e.randn(n * d_in, 1.0),
                e.randn(d_out * d_in, 0.1),
                e.randn(d_out, 1.0),
            );
            let (gx, gw, gb) = (
                e.up(&x, Kind::Compute),
                e.up(&w, Kind::Compute),
                e.up(&b, Kind::Compute),
            );
            let mut gy = e.poison(n * d_out, Kind::Compute);
            let gbv = bias.then(|| gb.as_ref());
            e.gpu
                .linear_forward(LinearFwd {
                    y: gy.as_mut(),
                    x: gx.as_ref(),
                    w: gw.as_ref(),
                    b: gbv,
                    dims,
                })
                .unwrap();
            let mut want = vec![0f32; n * d_out];
            let bv = bias.then_some(&b[..]);
            e.cpu
                .linear_forward(LinearFwd {
                    y: &mut want,
                    x: &x,
                    w: &w,
                    b: bv,
                    dims,
                })
                .unwrap();
            // GEMM output rounded, then the bias add rounded again.
            e.check(
                &format!("linear_fwd {tag}"),
                &e.down(&gy),
                &want,
                1 + bias as u32,
            );

            let dy = e.randn(n * d_out, 1.0);
            let (dw0, db0) = (e.randn(d_out * d_in, 1.0), e.randn(d_out, 1.0));
            let gdy = e.up(&dy, Kind::Compute);
            let mut gdx = e.poison(n * d_in, Kind::Compute);
            // Accumulating onto random gradients, or overwriting NaN (either, by the seed).
            let acc = e.grad_write();
            let (mut gdw, mut gdb) = e.grads_before(&dw0, &db0, acc);
            let tag = format!("{tag} {acc:?}");
            let gdbv = bias.then(|| gdb.as_mut());
            e.gpu
                .linear_backward(LinearBwd {
                    dx: Some(gdx.as_mut()),
                    dx_write: GradWrite::Overwrite,
                    d_w: Some(gdw.as_mut()),
                    d_b: gdbv,
                    dy: gdy.as_ref(),
                    x: gx.as_ref(),
                    w: gw.as_ref(),
                    dims,
                    write: acc,
                })
                .unwrap();
            let (mut dx, mut dw, mut db) = (vec![0f32; n * d_in], dw0.clone(), db0.clone());
            let dbv = bias.then_some(&mut db[..]);
            e.cpu
                .linear_backward(LinearBwd {
                    dx: Some(&mut dx),
                    dx_write: GradWrite::Overwrite,
                    d_w: Some(&mut dw),
                    d_b: dbv,
                    dy: &dy,
                    x: &x,
                    w: &w,
                    dims,
                    write: acc,
                })
                .unwrap();
            e.check(&format!("linear_bwd dx {tag}"), &e.down(&gdx), &dx, 1);
            e.check(&format!("linear_bwd dw {tag}"), &e.down(&gdw), &dw, e.gk());
            if bias || acc == GradWrite::Accumulate {
                e.check(&format!("linear_bwd db {tag}"), &e.down(&gdb), &db, e.gk());
            }
        }
    }
}

#[test]
fn rmsnorm_forward_backward() {
    let Some(envs) = envs("rmsnorm") else { return };
    for mut e in envs {
        for (n, d) in [
            (1, 1),
            (7, 13),
            (131, 2048),
            (1000, 67),
            (3000, 256),
            (517, 4096),
            (9, 2056),
        ] {
            let tag = format!("n={n} d={d}");
            let (x, w) = (e.randn(n * d, 1.0), e.randn(d, 1.0));
            let (gx, gw) = (e.up(&x, Kind::Compute), e.up(&w, Kind::Compute));
            let mut gy = e.poison(n * d, Kind::Compute);
            let mut grstd = e.poison(n, Kind::Master);
            e.gpu
                .rmsnorm_forward(RmsNormFwd {
                    y: gy.as_mut(),
                    rstd: grstd.as_mut(),
                    x: gx.as_ref(),
                    weight: gw.as_ref(),
                    n,
                    d,
                    eps: 1e-5,
                })
                .unwrap();
            let (mut y, mut rstd) = (vec![0f32; n * d], vec![0f32; n]);
            e.cpu
                .rmsnorm_forward(RmsNormFwd {
                    y: &mut y,
                    rstd: &mut rstd,
                    x: &x,
                    weight: &w,
                    n,
                    d,
                    eps: 1e-5,
                })
                .unwrap();
            e.check(&format!("rmsnorm_fwd y {tag}"), &e.down(&gy), &y, 1);
            e.check(
                &format!("rmsnorm_fwd rstd {tag}"),
                &e.down(&grstd),
                &rstd,
                0,
            );

            // The residual add fused with the norm: x += r, then the norm of the sum (rounded
            // to the Compute type first, one more rounding on every output).
            let r = e.randn(n * d, 1.0);
            let (mut gxs, gr) = (e.up(&x, Kind::Compute), e.up(&r, Kind::Compute));
            let mut gy2 = e.poison(n * d, Kind::Compute);
            let mut grstd2 = e.poison(n, Kind::Master);
            e.gpu
                .add_rmsnorm_forward(AddRmsNormFwd {
                    y: gy2.as_mut(),
                    rstd: grstd2.as_mut(),
                    x: gxs.as_mut(),
                    r: gr.as_ref(),
                    weight: gw.as_ref(),
                    n,
                    d,
                    eps: 1e-5,
                })
                .unwrap();
            let (mut xs, mut y2, mut rstd2) = (x.clone(), vec![0f32; n * d], vec![0f32; n]);
            e.cpu
                .add_rmsnorm_forward(AddRmsNormFwd {
                    y: &mut y2,
                    rstd: &mut rstd2,
                    x: &mut xs,
                    r: &r,
                    weight: &w,
                    n,
                    d,
                    eps: 1e-5,
                })
                .unwrap();
            e.check(&format!("add_rmsnorm x+r {tag}"), &e.down(&gxs), &xs, 1);
            e.check(&format!("add_rmsnorm y {tag}"), &e.down(&gy2), &y2, 2);
            e.check(
                &format!("add_rmsnorm rstd {tag}"),
                &e.down(&grstd2),
                &rstd2,
                1,
            );

            // The backward reads the CPU's rstd on both sides, so only the backward is compared.
            let (dy, dx0, dw0) = (e.randn(n * d, 1.0), e.randn(n * d, 1.0), e.randn(d, 1.0));
            let (gdy, grs) = (e.up(&dy, Kind::Compute), e.up(&rstd, Kind::Master));
            let mut gdx = e.up(&dx0, Kind::Compute);
            let acc = e.grad_write();
            let (mut gdw, _) = e.grads_before(&dw0, &[], acc);
            let tag = format!("{tag} {acc:?}");
            e.gpu
                .rmsnorm_backward(RmsNormBwd {
                    dx: gdx.as_mut(),
                    d_weight: gdw.as_mut(),
                    dy: gdy.as_ref(),
                    x: gx.as_ref(),
                    weight: gw.as_ref(),
                    rstd: grs.as_ref(),
                    n,
                    d,
                    write: acc,
                })
                .unwrap();
            let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
            e.cpu
                .rmsnorm_backward(RmsNormBwd {
                    dx: &mut dx,
                    d_weight: &mut dw,
                    dy: &dy,
                    x: &x,
                    weight: &w,
                    rstd: &rstd,
                    n,
                    d,
                    write: acc,
                })
                .unwrap();
            e.check(&format!("rmsnorm_bwd dx(+=) {tag}"), &e.down(&gdx), &dx, 1);
            e.check(
                &format!("rmsnorm_bwd dweight {tag}"),
                &e.down(&gdw),
                &dw,
                e.gk(),
            );
        }
    }
}

#[test]
fn rope_forward_backward() {
    let Some(envs) = envs("rope") else { return };
    for mut e in envs {
        for (n, heads, rot, dh) in [(1, 1, 1, 2), (37, 5, 3, 16), (300, 48, 40, 64)] {
            let dims = RopeDims {
                n,
                row_stride: heads * dh,
                n_rot_heads: rot,
                head_dim: dh,
            };
            let tag = format!("n={n} rot={rot} dh={dh}");
            let x = e.randn(n * heads * dh, 1.0);
            let inv: Vec<f32> = (0..dh / 2)
                .map(|i| 500_000f32.powf(-2.0 * i as f32 / dh as f32))
                .collect();
            let pos: Vec<i32> = (0..n).map(|_| e.below(5000) as i32).collect();
            let (gpos, ginv) = (e.gpu.ints(&pos).unwrap(), e.up(&inv, Kind::Master));
            for backward in [false, true] {
                let mut gx = e.up(&x, Kind::Compute);
                let mut want = x.clone();
                if backward {
                    e.gpu
                        .rope_backward(Rope {
                            x: gx.as_mut(),
                            inv_freq: ginv.as_ref(),
                            positions: &gpos,
                            dims,
                        })
                        .unwrap();
                    e.cpu
                        .rope_backward(Rope {
                            x: &mut want,
                            inv_freq: &inv,
                            positions: &pos,
                            dims,
                        })
                        .unwrap();
                } else {
                    e.gpu
                        .rope_forward(Rope {
                            x: gx.as_mut(),
                            inv_freq: ginv.as_ref(),
                            positions: &gpos,
                            dims,
                        })
                        .unwrap();
                    e.cpu
                        .rope_forward(Rope {
                            x: &mut want,
                            inv_freq: &inv,
                            positions: &pos,
                            dims,
                        })
                        .unwrap();
                }
                let what = if backward { "rope_bwd" } else { "rope_fwd" };
                e.check(&format!("{what} {tag}"), &e.down(&gx), &want, 1);
            }
        }
    }
}

#[test]
fn swiglu_forward_backward() {
    let Some(envs) = envs("swiglu") else { return };
    for mut e in envs {
        for (n, f) in [(1, 1), (13, 37), (257, 1000)] {
            let tag = format!("n={n} f={f}");
            let (gu, da) = (e.randn(2 * n * f, 2.0), e.randn(n * f, 1.0));
            let (ggu, gda) = (e.up(&gu, Kind::Compute), e.up(&da, Kind::Compute));
            let mut ga = e.poison(n * f, Kind::Compute);
            e.gpu
                .swiglu_forward(SwigluFwd {
                    a: ga.as_mut(),
                    gu: ggu.as_ref(),
                    n,
                    f,
                })
                .unwrap();
            let mut a = vec![0f32; n * f];
            e.cpu
                .swiglu_forward(SwigluFwd {
                    a: &mut a,
                    gu: &gu,
                    n,
                    f,
                })
                .unwrap();
            e.check(&format!("swiglu_fwd {tag}"), &e.down(&ga), &a, 1);
            let mut gdgu = ggu;
            e.gpu
                .swiglu_backward(SwigluBwd {
                    gu: gdgu.as_mut(),
                    d_a: gda.as_ref(),
                    n,
                    f,
                })
                .unwrap();
            let mut dgu = gu.clone();
            e.cpu
                .swiglu_backward(SwigluBwd {
                    gu: &mut dgu,
                    d_a: &da,
                    n,
                    f,
                })
                .unwrap();
            e.check(&format!("swiglu_bwd {tag}"), &e.down(&gdgu), &dgu, 1);
        }
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
            let dims = LinearDims {
                n,
                d_in: d,
                d_out: v,
            };
            let tag = format!("n={n} d={d} v={v} chunk={chunk_rows} masked={masked}");
            let (x, w) = (e.randn(n * d, 1.0), e.randn(v * d, 0.3));
            let targets: Vec<i32> = (0..n)
                .map(|_| {
                    if e.rng.uniform() < masked {
                        -100
                    } else {
                        e.below(v) as i32
                    }
                })
                .collect();
            let scale = 1.0 / (n as f32 + 1.0);
            let (l0, dw0) = (e.randn(1, 1.0), e.randn(v * d, 1.0));
            let (gx, gw) = (e.up(&x, Kind::Compute), e.up(&w, Kind::Compute));
            let gt = e.gpu.ints(&targets).unwrap();
            let mut gl = e.up(&l0, Kind::Master);
            let mut gdx = e.poison(n * d, Kind::Compute);
            let acc = e.grad_write();
            let (mut gdw, _) = e.grads_before(&dw0, &[], acc);
            let tag = format!("{tag} {acc:?}");
            e.gpu
                .lm_head_loss(LmHeadLoss {
                    loss_sum: gl.as_mut(),
                    dx: Some(gdx.as_mut()),
                    d_w: Some(gdw.as_mut()),
                    x: gx.as_ref(),
                    w: gw.as_ref(),
                    targets: &gt,
                    dims,
                    grad_scale: scale,
                    write: acc,
                })
                .unwrap();
            let (mut l, mut dx, mut dw) = (l0.clone(), vec![0f32; n * d], dw0.clone());
            e.cpu
                .lm_head_loss(LmHeadLoss {
                    loss_sum: &mut l,
                    dx: Some(&mut dx),
                    d_w: Some(&mut dw),
                    x: &x,
                    w: &w,
                    targets: &targets,
                    dims,
                    grad_scale: scale,
                    write: acc,
                })
                .unwrap();
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
            e.gpu
                .lm_head_loss(LmHeadLoss {
                    loss_sum: gl.as_mut(),
                    dx: None,
                    d_w: None,
                    x: gx.as_ref(),
                    w: gw.as_ref(),
                    targets: &gt,
                    dims,
                    grad_scale: scale,
                    write: GradWrite::Accumulate,
                })
                .unwrap();
            e.check(&format!("lm_head loss-only {tag}"), &e.down(&gl), &l, 0);
        }
    }
}

#[test]
fn adamw_step() {
    let Some(envs) = envs("adamw") else { return };
    for mut e in envs {
        // off = 1 shifts every view by one element, which takes the unaligned kernel.
        for (n, off) in [(1, 0), (1000, 0), (65_537, 0), (1003, 1)] {
            let hp = AdamW {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step: 1 + e.below(100) as u64,
                grad_scale: 0.5,
            };
            // fp32 weights that bf16 cannot hold, so a split master must keep both halves.
            let p = e.randn(n, 1.0);
            // bf16-representable when the gradients are bf16, so both sides see the same values.
            let g: Vec<f32> = (0..n)
                .map(|_| e.rng.normal() as f32)
                .map(|x| if e.bf16_grads { bf16_round(x) } else { x })
                .collect();
            let m: Vec<f32> = (0..n).map(|_| e.rng.normal() as f32 * 0.1).collect();
            let v: Vec<f32> = (0..n).map(|_| e.rng.uniform() as f32 * 0.01).collect();
            let pad = |x: &[f32]| [vec![0f32; off], x.to_vec()].concat();
            let mut gp = e.up(&pad(&p), Kind::Compute);
            let mut gmaster = if e.gpu.needs_master() {
                let mut lo = e.gpu.master_new(&gp, n + off).unwrap();
                e.gpu.master_write(&mut gp, &mut lo, off, &p).unwrap();
                let back = e.gpu.master_read(&gp, &lo, off..off + n).unwrap();
                assert!(
                    back.iter().zip(&p).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "master_write then master_read changed fp32 weights"
                );
                Some(lo)
            } else {
                None
            };
            let gg = e.up(&pad(&g), Kind::Grad);
            let (mut gm, mut gv) = (e.up(&pad(&m), Kind::Master), e.up(&pad(&v), Kind::Master));
            let r = off..off + n;
            let master = gmaster.as_mut().map(|b| e.gpu.view_mut(b, r.clone()));
            e.gpu
                .adamw(AdamWStep {
                    param: e.gpu.view_mut(&mut gp, r.clone()),
                    master,
                    grad: e.gpu.view(&gg, r.clone()),
                    m: e.gpu.view_mut(&mut gm, r.clone()),
                    v: e.gpu.view_mut(&mut gv, r.clone()),
                    n,
                    hp,
                })
                .unwrap();
            let (mut cp, mut cm, mut cv) = (p.clone(), m.clone(), v.clone());
            e.cpu
                .adamw(AdamWStep {
                    param: &mut cp,
                    master: None,
                    grad: &g,
                    m: &mut cm,
                    v: &mut cv,
                    n,
                    hp,
                })
                .unwrap();
            // The change of the parameters is compared too (the update is ~1e-3 of them). The
            // f32 updated values carry rounding errors of up to ulp(p)/2 = 2^-24·|p| each, which
            // relative to the change is 2^-24·‖p‖/‖Δ‖; the tolerance of Δ includes twice that.
            let delta = |a: &[f32]| a.iter().zip(&p).map(|(x, y)| x - y).collect::<Vec<_>>();
            let norm = |a: &[f32]| a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let dtol = TOL_F32 + 2.0 * 2f64.powi(-24) * norm(&p) / norm(&delta(&cp)).max(1e-30);
            let updated = match &gmaster {
                Some(lo) => {
                    e.check(&format!("adamw param n={n}"), &e.down(&gp)[off..], &cp, 1);
                    e.gpu.master_read(&gp, lo, r.clone()).unwrap()
                }
                None => e.down(&gp)[off..].to_vec(),
            };
            e.check(&format!("adamw fp32 weights n={n}"), &updated, &cp, 0);
            let what = format!("adamw fp32 weight delta n={n}");
            e.check_tol(&what, &delta(&updated), &delta(&cp), dtol);
            e.check(&format!("adamw m n={n}"), &e.down(&gm)[off..], &cm, 0);
            e.check(&format!("adamw v n={n}"), &e.down(&gv)[off..], &cv, 0);
        }
    }
}
