//! `flash-check`: check every kernel set against the f64 reference on the flash-notes shapes,
//! then time the mma kernels on the shapes (and dump data for bench/flash_vs_torch.py).
//!
//! Usage: `flash-check [--seed N] [--skip-check] [--skip-bench] [--reps N] [--dump DIR]
//! [--only SUBSTR[,SUBSTR..]] [--skip SUBSTR] [--bench-only SUBSTR[,SUBSTR..]] [--ref-only]`.
//! Exit status 1 if any check fails. `FLASH_SUBST="from=>to;;.."` edits the kernel sources before
//! compiling and `FLASH_BWD="key=value,.."` overrides the backward kernel choices (experiments;
//! see `harness::Gpu::new`).

use std::io::Write;
use std::time::Instant;

use nopad_flash::harness::check::Variant;
use nopad_flash::harness::{bench, check, Gpu};
use nopad_flash::reference::{self, Precision};

fn arg<T: std::str::FromStr>(args: &[String], flag: &str) -> Option<T> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seed: u64 = arg(&args, "--seed").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let has = |f: &str| args.iter().any(|a| a == f);
    let only: Option<String> = arg(&args, "--only");
    let skip: Option<String> = arg(&args, "--skip");
    println!("flash-check seed {seed}");
    let shapes: Vec<_> = check::check_shapes(seed)
        .into_iter()
        .filter(|s| {
            only.as_ref()
                .is_none_or(|o| o.split(',').any(|o| s.name.contains(o)))
        })
        .filter(|s| skip.as_ref().is_none_or(|o| !s.name.contains(o.as_str())))
        .collect();
    if has("--ref-only") {
        for s in &shapes {
            let t = Instant::now();
            let dims = s.dims();
            let qkv = vec![0.01f32; dims.n * s.row()];
            let dout = vec![0.01f32; dims.n * dims.n_heads * dims.head_dim];
            let _ = reference::attention(&qkv, &dout, &s.cu, &dims, Precision::F64);
            println!(
                "reference {:<28} {:.2} s",
                s.name,
                t.elapsed().as_secs_f64()
            );
        }
        return;
    }
    let mut gpu = match Gpu::new() {
        Ok(g) => g,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "skipped: no CUDA device ({e})");
            std::process::exit(2);
        }
    };
    println!("device arch {}", gpu.arch);
    let mut failed = 0;
    if !has("--skip-check") {
        for s in &shapes {
            let t = Instant::now();
            match check::check_shape(
                &mut gpu,
                s,
                seed,
                &[
                    Variant::Simple,
                    Variant::Mma,
                    Variant::MmaAtomic,
                    Variant::MmaAuto,
                ],
            ) {
                Ok(rows) => {
                    for r in rows {
                        failed += usize::from(!r.pass());
                        println!(
                            "{}  ({:.1} s)",
                            check::format_row(&r),
                            t.elapsed().as_secs_f64()
                        );
                    }
                }
                Err(e) => {
                    failed += 1;
                    println!("FAIL {}: {e}", s.name);
                }
            }
            let _ = std::io::stdout().flush();
        }
        println!("check: {} failures (seed {seed})", failed);
    }
    if !has("--skip-bench") {
        let reps = arg(&args, "--reps").unwrap_or(20);
        let dump: Option<String> = arg(&args, "--dump");
        if let Some(d) = &dump {
            let _ = std::fs::create_dir_all(d);
        }
        let bench_only: Option<String> = arg(&args, "--bench-only");
        let bshapes: Vec<_> = bench::bench_shapes(seed)
            .into_iter()
            .filter(|s| {
                bench_only
                    .as_ref()
                    .is_none_or(|o| o.split(',').any(|o| s.name.contains(o)))
            })
            .collect();
        match bench::bench_table(
            &mut gpu,
            &bshapes,
            seed,
            reps,
            dump.as_deref().map(std::path::Path::new),
        ) {
            Ok(rows) => print!("{}", bench::format_table(&rows)),
            Err(e) => {
                failed += 1;
                println!("bench failed: {e}");
            }
        }
    }
    std::process::exit(i32::from(failed > 0));
}
