//! `flash-check`: `check` runs every route the device has (its own and, on Hopper, mma.sync)
//! against the f64 reference on the test shapes; `bench` times the device's route on the
//! benchmark shapes and can dump data for `bench/flash_vs_torch.py`; `reference` times the CPU
//! reference alone. Exit status 1 if a check fails, 2 without a CUDA device.

use std::io::Write;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use nopad_flash::reference::{self, Precision};
use nopad_flash_check::check::{self, Variant};
use nopad_flash_check::{bench, parse_substitutions, Gpu, HarnessError, Shape};

#[derive(Parser)]
#[command(
    name = "flash-check",
    about = "Check and time nopad-flash's kernels on a GPU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every route against the f64 reference on the test shapes.
    Check(CheckArgs),
    /// Time forward and backward of the device's route on the benchmark shapes.
    Bench(BenchArgs),
    /// Time the f64 CPU reference on the test shapes (no GPU).
    Reference(Common),
}

#[derive(Args)]
struct Common {
    /// Seed of the data and of the random shapes (default: the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Only shapes whose name contains one of these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Skip shapes whose name contains this.
    #[arg(long)]
    skip: Option<String>,
    /// Replace text in the kernel sources before compiling: `from=>to;;from2=>to2` (every
    /// `from` must occur). For trying a kernel change without rebuilding.
    #[arg(long)]
    subst: Option<String>,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    common: Common,
    /// Timed repetitions per shape (median, min, max reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Write inputs, outputs and manifest.tsv here for bench/flash_vs_torch.py.
    #[arg(long)]
    dump: Option<std::path::PathBuf>,
}

impl Common {
    fn seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        })
    }
    fn select(&self, shapes: Vec<Shape>) -> Vec<Shape> {
        shapes
            .into_iter()
            .filter(|s| self.only.is_empty() || self.only.iter().any(|o| s.name.contains(o)))
            .filter(|s| {
                self.skip
                    .as_ref()
                    .is_none_or(|o| !s.name.contains(o.as_str()))
            })
            .collect()
    }
    fn gpu(&self) -> Result<Gpu, HarnessError> {
        let subst = match &self.subst {
            Some(spec) => parse_substitutions(spec)?,
            None => Vec::new(),
        };
        Gpu::new(&subst)
    }
}

/// The GPU, or exit: 2 without a device (so scripts can tell), 1 for a bad flag.
fn gpu_or_exit(c: &Common) -> Gpu {
    match c.gpu() {
        Ok(g) => {
            println!("device arch {}", g.arch);
            g
        }
        Err(e @ HarnessError::NoDevice(_)) => {
            let _ = writeln!(std::io::stderr(), "flash-check: {e}");
            std::process::exit(2);
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "flash-check: {e}");
            std::process::exit(1);
        }
    }
}

fn run_check(a: &CheckArgs) -> usize {
    let seed = a.common.seed();
    println!("flash-check check seed {seed}");
    let shapes = a.common.select(check::check_shapes(seed));
    let gpu = gpu_or_exit(&a.common);
    let variants = Variant::all(&gpu);
    let mut failed = 0;
    for s in &shapes {
        let t = Instant::now();
        match check::check_shape(&gpu, s, seed, &variants) {
            Ok(rows) => {
                for r in rows {
                    failed += usize::from(!r.pass());
                    let secs = t.elapsed().as_secs_f64();
                    println!("{}  ({secs:.1} s)", check::format_row(&r));
                }
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {}: {e}", s.name);
            }
        }
        let _ = std::io::stdout().flush();
    }
    println!("check: {failed} failures (seed {seed})");
    failed
}

fn run_bench(a: &BenchArgs) -> usize {
    let seed = a.common.seed();
    println!("flash-check bench seed {seed}");
    let shapes = a.common.select(bench::bench_shapes(seed));
    let gpu = gpu_or_exit(&a.common);
    if let Some(d) = &a.dump {
        if let Err(e) = std::fs::create_dir_all(d) {
            println!("bench failed: creating {}: {e}", d.display());
            return 1;
        }
    }
    match bench::bench_table(&gpu, &shapes, seed, a.reps, a.dump.as_deref()) {
        Ok(rows) => {
            print!("{}", bench::format_table(&rows));
            0
        }
        Err(e) => {
            println!("bench failed: {e}");
            1
        }
    }
}

fn run_reference(c: &Common) {
    for s in &c.select(check::check_shapes(c.seed())) {
        let t = Instant::now();
        let dims = s.dims();
        let qkv = vec![0.01f32; dims.n * s.row()];
        let dout = vec![0.01f32; dims.n * dims.n_heads * dims.head_dim];
        let _ = reference::attention(&qkv, &dout, &s.cu, &dims, Precision::F64);
        let secs = t.elapsed().as_secs_f64();
        println!("reference {:<28} {secs:.2} s", s.name);
    }
}

fn main() {
    let failed = match Cli::parse().cmd {
        Cmd::Check(a) => run_check(&a),
        Cmd::Bench(a) => run_bench(&a),
        Cmd::Reference(c) => {
            run_reference(&c);
            0
        }
    };
    std::process::exit(i32::from(failed > 0));
}
