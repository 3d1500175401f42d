//! GPU tests: every default route (the device's own and, on Hopper, the mma.sync route of every
//! other device) against the f64 reference on the tiny check shapes (GQA, packed short
//! sequences, L = 0 and 1, non-multiples of 64) and on long sequences (the 128-key backward and
//! the 128-row forward take sequences of at least 512 tokens), each also under sliding windows
//! (the windowed mma.sync route; the tiny set has windowed shapes too). Prints a visible skip line and
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

/// Sliding windows over the long sequences above (edges inside tiles, on a tile border, whole
/// key tiles left out) and over packed short sequences longer than the window; a window as
/// long as the longest sequence must run the plain route and agree too.
#[test]
fn windowed_attention_matches_the_reference_on_the_gpu() {
    let Some(gpu) = gpu_or_skip() else {
        return;
    };
    let seed = 37;
    let long = [600, 3, 1100, 0, 513, 64, 700];
    let short = [1, 2, 3, 5, 17, 31, 40, 64, 9, 63, 2, 1];
    for (dh, h, hkv) in [(128, 4, 1), (64, 2, 2)] {
        for w in [1, 3, 64, 100, 257, 1100] {
            let name = format!("long_d{dh}_h{h}/{hkv}");
            let shape = Shape::from_lens(&name, &long, h, hkv, dh).with_window(w);
            assert_all_pass(&gpu, &shape, seed);
        }
        for w in [1, 3, 16] {
            let name = format!("short_d{dh}_h{h}/{hkv}");
            let shape = Shape::from_lens(&name, &short, h, hkv, dh).with_window(w);
            assert_all_pass(&gpu, &shape, seed);
        }
    }
}
