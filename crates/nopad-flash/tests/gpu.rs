//! GPU tests: every default route (the device's own and, on Hopper, the mma.sync route of every
//! other device) against the f64 reference on the tiny check shapes (GQA, packed short
//! sequences, L = 0 and 1, non-multiples of 64) and on long sequences (the 128-key backward and
//! the 128-row forward take sequences of at least 512 tokens). Prints a visible skip line and
//! passes where no CUDA device is present (CI); the full suite is `flash-check check`.

use std::io::Write;

use nopad_flash_check::check::{self, Variant};
use nopad_flash_check::{Gpu, Shape};

/// The GPU, or `None` after a visible skip line where there is none (CI).
fn gpu_or_skip() -> Option<Gpu> {
    match Gpu::new(&[]) {
        Ok(g) => Some(g),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "skipped: {e}");
            None
        }
    }
}

fn assert_all_pass(gpu: &Gpu, shape: &Shape, seed: u64) {
    let rows = check::check_shape(gpu, shape, seed, &Variant::all(gpu)).expect("kernels run");
    for r in rows {
        assert!(r.pass(), "seed {seed}: {}", check::format_row(&r));
    }
}

#[test]
fn tiny_shapes_match_the_reference_on_the_gpu() {
    let Some(gpu) = gpu_or_skip() else {
        return;
    };
    let seed = 17;
    for shape in check::check_shapes(seed)
        .iter()
        .filter(|s| s.name.starts_with("tiny"))
    {
        assert_all_pass(&gpu, shape, seed);
    }
}

/// Long sequences (at least 512 tokens, not multiples of 64 or 128) among short ones, GQA and
/// not, at both head dims; on Hopper after the wgmma operand layouts are checked against CPU
/// products.
#[test]
fn long_sequences_match_the_reference_on_the_gpu() {
    let Some(gpu) = gpu_or_skip() else {
        return;
    };
    match gpu
        .fa
        .wgmma_selftest(&gpu.stream, 29)
        .expect("selftest runs")
    {
        Some(errs) => {
            for (name, e) in ["S = Q K^T", "dV = P^T dO", "dQ = dS K"].iter().zip(errs) {
                assert!(e < 1e-5, "wgmma layout of {name}: relative error {e:e}");
            }
        }
        None => {
            let _ = writeln!(
                std::io::stderr(),
                "no wgmma self-test: {} is not sm_90a",
                gpu.arch
            );
        }
    }
    let seed = 31;
    let lens = [600, 3, 1100, 0, 513, 64, 700];
    for (dh, h, hkv) in [(128, 4, 1), (128, 2, 2), (64, 4, 1)] {
        let shape = Shape::from_lens(&format!("long_d{dh}_h{h}/{hkv}"), &lens, h, hkv, dh);
        assert_all_pass(&gpu, &shape, seed);
    }
}
