//! GPU test: the tiny check shapes (GQA, packed short sequences, L = 0 and 1, non-multiples of
//! 64) through every kernel variant against the f64 reference. Prints a visible skip line and
//! passes where no CUDA device is present (CI); the full suite is `flash-check` on the GPU host.

use std::io::Write;

use nopad_flash::harness::check::{self, Variant};
use nopad_flash::harness::Gpu;
use nopad_flash::LongKeys;

/// The GPU, or `None` after a visible skip line where there is none (CI).
fn gpu_or_skip() -> Option<Gpu> {
    match Gpu::new() {
        Ok(g) => Some(g),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "skipped: no CUDA device ({e})");
            None
        }
    }
}

#[test]
fn tiny_shapes_match_the_reference_on_the_gpu() {
    let Some(mut gpu) = gpu_or_skip() else {
        return;
    };
    let seed = 17;
    // The deterministic kernels on warpgroup MMAs (the default on sm_90a) and on mma.sync.
    for short_wgmma in [true, false] {
        let mut conf = gpu.fa.backward_config();
        conf.short_wgmma = short_wgmma;
        gpu.fa.set_backward_config(conf);
        for shape in check::check_shapes(seed)
            .iter()
            .filter(|s| s.name.starts_with("tiny"))
        {
            let rows = check::check_shape(
                &mut gpu,
                shape,
                seed,
                &[
                    Variant::Simple,
                    Variant::Mma,
                    Variant::MmaAtomic,
                    Variant::MmaAuto,
                ],
            )
            .expect("kernels run");
            for r in rows {
                assert!(
                    r.pass(),
                    "seed {seed}, short_wgmma {short_wgmma}: {}",
                    check::format_row(&r)
                );
            }
        }
    }
}

/// The long-sequence backward kernels: the warpgroup-MMA ones (`LongKeys::Wgmma` with
/// `short_wgmma`, sm_90a, the default there) after their operand layouts are checked against CPU
/// products, and FA2's layout on mma.sync (`LongKeys::Split`, the default elsewhere). Sequences of at least 512 tokens (not
/// multiples of 64 or 128, GQA and not) through the deterministic and the atomic backward
/// against the f64 reference.
#[test]
fn long_sequence_backwards_match_the_reference_on_the_gpu() {
    let Some(mut gpu) = gpu_or_skip() else {
        return;
    };
    let mut choices = vec![LongKeys::Split];
    match gpu
        .fa
        .wgmma_selftest(&gpu.stream, 29)
        .expect("selftest runs")
    {
        Some(errs) => {
            for (name, e) in ["S = Q K^T", "dV = P^T dO", "dQ = dS K"].iter().zip(errs) {
                assert!(e < 1e-5, "wgmma layout of {name}: relative error {e:e}");
            }
            choices.push(LongKeys::Wgmma);
        }
        None => {
            let _ = writeln!(
                std::io::stderr(),
                "skipped the wgmma kernels: {} has no wgmma (needs compute capability 9.0)",
                gpu.arch
            );
        }
    }
    let seed = 31;
    let lens = [600, 3, 1100, 0, 513, 64, 700];
    for keys in choices {
        let mut conf = gpu.fa.backward_config();
        conf.long_atomic = keys;
        conf.long_deterministic = keys;
        conf.short_wgmma = keys == LongKeys::Wgmma;
        gpu.fa.set_backward_config(conf);
        for (dh, h, hkv) in [(128, 4, 1), (128, 2, 2), (64, 4, 1)] {
            let name = format!("long_d{dh}_h{h}/{hkv}_{keys:?}");
            let shape = nopad_flash::harness::Shape::from_lens(&name, &lens, h, hkv, dh);
            let variants = [Variant::Mma, Variant::MmaAtomic, Variant::MmaAuto];
            let rows = check::check_shape(&mut gpu, &shape, seed, &variants).expect("kernels run");
            for r in rows {
                assert!(r.pass(), "seed {seed}: {}", check::format_row(&r));
            }
        }
    }
}
