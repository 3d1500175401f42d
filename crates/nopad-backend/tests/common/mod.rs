//! What the backend's two integration test crates (`conformance` and `cuda_ops`) share: the
//! seed, the visible CUDA skip, the tolerance model and the norm-wise comparison.
// Each test crate includes this module and uses only part of it.
#![allow(dead_code)]

use std::io::Write;

/// Tolerance of an fp32 path (results that differ only in summation order land near 1e-6).
pub const TOL_F32: f64 = 1e-4;
/// The unit roundoff of bf16.
pub const BF16_U: f64 = 1.0 / 256.0;

/// Tolerance of a bf16 result with `k` roundings to bf16 on its path: 3·k·u + 1e-4.
pub fn bf16_tol(k: u32) -> f64 {
    3.0 * k as f64 * BF16_U + TOL_F32
}

/// One line on stderr (shown by `cargo test -- --nocapture`, and on failure).
pub fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// `NOPAD_TEST_SEED` when set, else the clock.
pub fn seed() -> u64 {
    std::env::var("NOPAD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Whether a CUDA device is present; without one, prints the visible skip line of `test`.
pub fn cuda_present(test: &str) -> bool {
    match nopad_backend::cuda::probe() {
        Ok(_) => true,
        Err(reason) => {
            say(&format!("skipped: no CUDA device ({reason}) [{test}]"));
            false
        }
    }
}

/// How far `got` is from `want`.
pub struct Error {
    /// ‖got − want‖ / ‖want‖.
    pub rel: f64,
    /// The largest |got − want|.
    pub max_abs: f64,
    /// NaNs in `got`.
    pub nan: usize,
}

/// Norm-wise comparison of equally long slices (of f32 or f64).
pub fn error<T: Copy + Into<f64>>(what: &str, got: &[T], want: &[T]) -> Error {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let (mut num, mut den, mut max_abs, mut nan) = (0f64, 0f64, 0f64, 0usize);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w): (f64, f64) = (g.into(), w.into());
        nan += g.is_nan() as usize;
        let d = (g - w).abs();
        num += d * d;
        den += w * w;
        max_abs = max_abs.max(d);
    }
    Error {
        rel: num.sqrt() / den.sqrt().max(1e-30),
        max_abs,
        nan,
    }
}

/// One output-head case on the host: the inputs every `lm_head_loss` check draws.
pub struct LmHeadCase<T> {
    /// `x: [N, D]`.
    pub x: Vec<T>,
    /// `w: [V, D]`.
    pub w: Vec<T>,
    /// `targets: [N]`, −100 for a row without one.
    pub targets: Vec<i32>,
    /// N, D and V as a GEMM's `(n, d_in, d_out)`.
    pub dims: nopad_backend::LinearDims,
    /// The factor on every gradient: 1 / (N + 1), as if one more target were elsewhere.
    pub scale: f32,
}

impl<T: nopad_backend::cpu::Scalar> LmHeadCase<T> {
    /// The case of `x: [N, D]` and `w: [V, D]` as drawn by the caller, with targets drawn from
    /// `rng` after them: a row has none (−100) with probability `masked`.
    pub fn new(
        (n, d, v): (usize, usize, usize),
        x: Vec<T>,
        w: Vec<T>,
        rng: &mut nopad_rng::Rng,
        masked: f64,
    ) -> Self {
        let targets = (0..n)
            .map(|_| {
                if rng.uniform() < masked {
                    -100
                } else {
                    rng.below(v as u64) as i32
                }
            })
            .collect();
        let dims = nopad_backend::LinearDims {
            n,
            d_in: d,
            d_out: v,
        };
        let scale = 1.0 / (n as f32 + 1.0);
        LmHeadCase {
            x,
            w,
            targets,
            dims,
            scale,
        }
    }

    /// The reference side of a check: `lm_head_loss` on the CPU with the loss starting from `l0`
    /// and `d_w` from `dw0` (written by `write`); returns the loss, `dx` and `d_w`.
    pub fn reference(
        &self,
        cpu: &nopad_backend::cpu::Cpu<T>,
        l0: &[T],
        dw0: &[T],
        write: nopad_backend::GradWrite,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        use nopad_backend::Ops as _;
        let (mut l, mut dx, mut dw) = (l0.to_vec(), vec![T::default(); self.x.len()], dw0.to_vec());
        cpu.lm_head_loss(nopad_backend::args::LmHeadLoss {
            loss_sum: &mut l,
            dx: Some(&mut dx),
            d_w: Some(&mut dw),
            x: &self.x,
            w: &self.w,
            targets: &self.targets,
            dims: self.dims,
            grad_scale: self.scale,
            write,
        })
        .expect("the CPU reference runs on valid inputs");
        (l, dx, dw)
    }
}
