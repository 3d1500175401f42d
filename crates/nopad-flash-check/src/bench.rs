//! Speed: time forward and backward of the device's route on the benchmark shapes with CUDA events
//! (warm-up, then the median of `reps` timed calls, with min and max as the spread), report
//! causal TFLOP/s (`attention_flops`: the window's pairs on windowed shapes), and optionally
//! dump inputs and outputs for `bench/flash_vs_torch.py`, which checks PyTorch against the same
//! data and times it (plain causal shapes only: its manifest has no window column).

use std::io::Write;
use std::path::Path;

use cudarc::driver::{sys, DevicePtr};

use super::{drv, lognormal_lens, random_bf16, uniform_lens, write_raw, Gpu, HarnessError, Shape};
use nopad_flash::attention_flops;

/// Timings of one shape.
#[derive(Clone, Debug)]
pub struct BenchRow {
    /// Shape name.
    pub shape: String,
    /// Tokens.
    pub n: usize,
    /// Sequences.
    pub n_seqs: usize,
    /// Forward ms: median, min, max.
    pub fwd_ms: [f64; 3],
    /// Backward ms: median, min, max.
    pub bwd_ms: [f64; 3],
    /// Forward TFLOP/s at the median.
    pub fwd_tflops: f64,
    /// Backward TFLOP/s at the median.
    pub bwd_tflops: f64,
}

/// The benchmark shapes (a)-(d), plus 1 x 8192 for the published comparison, and (f)
/// the same 8192 tokens under Mistral v0.1's window of 4096 (the windowed route).
pub fn bench_shapes(seed: u64) -> Vec<Shape> {
    let mut rng = nopad_rng::Rng::derived(seed, "bench-shapes");
    let mut v = vec![Shape::from_lens(
        "a_4x4096_d128_32/32",
        &[4096; 4],
        32,
        32,
        128,
    )];
    v.push(Shape::from_lens(
        "b_16xlogn550_d128_32/8",
        &lognormal_lens(&mut rng, 16, 550.0, 1.0, 8192),
        32,
        8,
        128,
    ));
    v.push(Shape::from_lens(
        "c_64xflan180_d64_32/8",
        &lognormal_lens(&mut rng, 64, 180.0, 0.9, 8192),
        32,
        8,
        64,
    ));
    for dh in [64, 128] {
        v.push(Shape::from_lens(
            &format!("d_500xU8-256_d{dh}_32/8"),
            &uniform_lens(&mut rng, 500, 8, 256),
            32,
            8,
            dh,
        ));
        v.push(Shape::from_lens(
            &format!("d_2000xU1-32_d{dh}_32/8"),
            &uniform_lens(&mut rng, 2000, 1, 32),
            32,
            8,
            dh,
        ));
    }
    v.push(Shape::from_lens("e_1x8192_d128_32/8", &[8192], 32, 8, 128));
    v.push(Shape::from_lens("f_1x8192_d128_32/8", &[8192], 32, 8, 128).with_window(4096));
    v
}

fn stats(mut t: Vec<f64>) -> [f64; 3] {
    t.sort_by(|a, b| a.total_cmp(b));
    [t[t.len() / 2], t[0], t[t.len() - 1]]
}

/// Time every shape; with `dump`, also write inputs/outputs and `manifest.tsv` there.
pub fn bench_table(
    gpu: &Gpu,
    shapes: &[Shape],
    seed: u64,
    reps: usize,
    dump: Option<&Path>,
) -> Result<Vec<BenchRow>, HarnessError> {
    let s = gpu.stream.clone();
    let mut rows = Vec::new();
    let mut manifest = String::new();
    for shape in shapes {
        let dims = shape.dims();
        let plan = gpu.fa.plan(&shape.cu, &dims)?;
        let qkv = random_bf16(seed, &format!("qkv-{}", shape.name), dims.n * shape.row());
        let dout = random_bf16(
            seed,
            &format!("dout-{}", shape.name),
            dims.n * dims.n_heads * dims.head_dim,
        );
        let d_qkv_in = s.clone_htod(&qkv).map_err(drv("upload qkv"))?;
        let d_dout = s.clone_htod(&dout).map_err(drv("upload d_out"))?;
        let d_cu = s.clone_htod(&shape.cu).map_err(drv("upload cu"))?;
        let out = s
            .alloc_zeros::<u16>(dims.n * dims.n_heads * dims.head_dim)
            .map_err(drv("alloc out"))?;
        let lse = s
            .alloc_zeros::<f32>(dims.n * dims.n_heads)
            .map_err(drv("alloc lse"))?;
        let dqkv = s
            .alloc_zeros::<u16>(qkv.len())
            .map_err(drv("alloc d_qkv"))?;
        let ws = s
            .alloc_zeros::<u8>(gpu.fa.workspace_bytes(&plan, &dims))
            .map_err(drv("alloc workspace"))?;
        let (p_qkv, _a) = d_qkv_in.device_ptr(&s);
        let (p_dout, _b) = d_dout.device_ptr(&s);
        let (p_cu, _c) = d_cu.device_ptr(&s);
        let (p_out, _d) = out.device_ptr(&s);
        let (p_lse, _e) = lse.device_ptr(&s);
        let (p_dqkv, _f) = dqkv.device_ptr(&s);
        let (p_ws, _g) = ws.device_ptr(&s);
        // SAFETY (both closures): every pointer is a live allocation sized from `dims`.
        let fwd = || unsafe {
            gpu.fa
                .forward(&s, &plan, &dims, p_qkv, p_cu, p_out, p_lse, p_ws)
        };
        let bwd = || unsafe {
            gpu.fa.backward(
                &s, &plan, &dims, p_qkv, p_cu, p_out, p_lse, p_dout, p_dqkv, p_ws, true,
            )
        };
        let ev = || {
            gpu.ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv("create event"))
        };
        let (e0, e1) = (ev()?, ev()?);
        let time =
            |f: &dyn Fn() -> Result<(), nopad_flash::FlashError>| -> Result<Vec<f64>, HarnessError> {
                for _ in 0..3 {
                    f()?;
                }
                let mut t = Vec::with_capacity(reps);
                for _ in 0..reps {
                    e0.record(&s).map_err(drv("record"))?;
                    f()?;
                    e1.record(&s).map_err(drv("record"))?;
                    e1.synchronize()
                        .map_err(drv(format!("timing {}", shape.name)))?;
                    t.push(e0.elapsed_ms(&e1).map_err(drv("elapsed"))? as f64);
                }
                Ok(t)
            };
        let tf = stats(time(&fwd)?);
        let tb = stats(time(&bwd)?);
        let (ff, fb) = attention_flops(&shape.cu, dims.n_heads, dims.head_dim, dims.window);
        let row = BenchRow {
            shape: shape.name.clone(),
            n: dims.n,
            n_seqs: dims.n_seqs,
            fwd_ms: tf,
            bwd_ms: tb,
            fwd_tflops: ff / (tf[0] * 1e-3) / 1e12,
            bwd_tflops: fb / (tb[0] * 1e-3) / 1e12,
        };
        if let (Some(dir), None) = (dump, dims.window) {
            let file = shape.name.replace('/', "-");
            write_raw(dir, &format!("{file}.cu.i32"), &shape.cu)?;
            write_raw(dir, &format!("{file}.qkv.bf16"), &qkv)?;
            write_raw(dir, &format!("{file}.dout.bf16"), &dout)?;
            write_raw(
                dir,
                &format!("{file}.out.bf16"),
                &s.clone_dtoh(&out).map_err(drv("read out"))?,
            )?;
            write_raw(
                dir,
                &format!("{file}.lse.f32"),
                &s.clone_dtoh(&lse).map_err(drv("read lse"))?,
            )?;
            write_raw(
                dir,
                &format!("{file}.dqkv.bf16"),
                &s.clone_dtoh(&dqkv).map_err(drv("read d_qkv"))?,
            )?;
            manifest.push_str(&format!(
                "{file}\t{}\t{}\t{}\t{}\t{}\t{}\t{:.5}\t{:.5}\n",
                dims.n_seqs,
                dims.n,
                dims.n_heads,
                dims.n_kv_heads,
                dims.head_dim,
                dims.scale,
                tf[0],
                tb[0]
            ));
        }
        rows.push(row);
    }
    if let Some(dir) = dump {
        let path = dir.join("manifest.tsv");
        let mut f = std::fs::File::create(&path).map_err(|source| HarnessError::Io {
            path: path.display().to_string(),
            source,
        })?;
        f.write_all(manifest.as_bytes())
            .map_err(|source| HarnessError::Io {
                path: path.display().to_string(),
                source,
            })?;
    }
    Ok(rows)
}

/// The table `flash-check bench` prints.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut s = format!(
        "{:<26} {:>7} {:>5} | {:>22} {:>7} | {:>22} {:>7}\n",
        "shape",
        "tokens",
        "seqs",
        "fwd ms med [min,max]",
        "TFLOP/s",
        "bwd ms med [min,max]",
        "TFLOP/s",
    );
    for r in rows {
        s.push_str(&format!(
            "{:<26} {:>7} {:>5} | {:>8.4} [{:.4},{:.4}] {:>7.1} | {:>8.4} [{:.4},{:.4}] {:>7.1}\n",
            r.shape,
            r.n,
            r.n_seqs,
            r.fwd_ms[0],
            r.fwd_ms[1],
            r.fwd_ms[2],
            r.fwd_tflops,
            r.bwd_ms[0],
            r.bwd_ms[1],
            r.bwd_ms[2],
            r.bwd_tflops
        ));
    }
    s
}
