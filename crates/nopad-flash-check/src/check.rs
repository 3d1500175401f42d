//! Correctness: run a kernel set on fresh random data and compare with the f64 reference by
//! FlashAttention's rule — `max|gpu - ref| <= k * max|bf16_ref - ref| + 1e-5` with k = 2 for the
//! output and 3 for dQ, dK, dV; LSE within 1e-3 — after NaN-poisoning every output and workspace
//! and surrounding the outputs with NaN guard bands. Backward runs twice and must be bitwise
//! stable (every route is deterministic).

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr};

use super::{
    bf16_to_f32, drv, lognormal_lens, random_bf16, uniform_lens, Gpu, Guarded, HarnessError, Shape,
};
use nopad_flash::reference::{self, Precision};
use nopad_flash::FlashAttention;

const NAN_BF16: u16 = 0x7FC0;
/// Absolute slack added to the bounds: covers outputs the bf16 reference gets exactly right
/// (e.g. a length-1 sequence's dQ, which is 0 up to fp32 rounding in any implementation).
const SLACK: f64 = 1e-5;

/// Which route of the kernels a check runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The device's own route (`choice::route` of its capability): what training runs.
    Device,
    /// The mma.sync route of every device without wgmma, run on a Hopper device.
    MmaSync,
}

impl Variant {
    /// The routes this GPU can check: its own, plus mma.sync where its own is wgmma.
    pub fn all(gpu: &Gpu) -> Vec<Variant> {
        match gpu.fa_mma_sync {
            Some(_) => vec![Variant::Device, Variant::MmaSync],
            None => vec![Variant::Device],
        }
    }

    fn kernels(self, gpu: &Gpu) -> Result<&FlashAttention, HarnessError> {
        match (self, &gpu.fa_mma_sync) {
            (Variant::Device, _) => Ok(&gpu.fa),
            (Variant::MmaSync, Some(fa)) => Ok(fa),
            (Variant::MmaSync, None) => Err(HarnessError::Config(
                "the mma.sync route is the device's own here: check Variant::Device".into(),
            )),
        }
    }
}

/// One (shape, variant) verdict.
#[derive(Clone, Debug)]
pub struct CheckRow {
    /// Shape name.
    pub shape: String,
    /// What was tested.
    pub variant: Variant,
    /// max |gpu - ref| for out, lse, dq, dk, dv.
    pub err: [f64; 5],
    /// The bounds they must stay under.
    pub bound: [f64; 5],
    /// Every output element finite (so every element was written).
    pub written: bool,
    /// Guard bands untouched.
    pub guards: bool,
    /// Two backward runs bitwise equal.
    pub deterministic: bool,
}

impl CheckRow {
    /// All criteria met.
    pub fn pass(&self) -> bool {
        self.written
            && self.guards
            && self.deterministic
            && self.err.iter().zip(&self.bound).all(|(e, b)| e <= b)
    }
}

/// The test shapes of `docs/FLASH.md` section 11, per (Dh, G) configuration; heads kept small so the f64
/// reference stays affordable (the kernels do not care about the head count).
pub fn check_shapes(seed: u64) -> Vec<Shape> {
    let mut rng = nopad_rng::Rng::derived(seed, "check-shapes");
    let mut out = Vec::new();
    for &(dh, h, hkv) in &[(64, 2, 2), (64, 4, 1), (128, 2, 2), (128, 4, 1)] {
        let tag = format!("d{dh}_h{h}/{hkv}");
        let lens = [0, 1, 2, 3, 0, 17, 31, 127, 129, 257, 1021, 4099, 0];
        out.push(Shape::from_lens(&format!("lens_{tag}"), &lens, h, hkv, dh));
        out.push(Shape::from_lens(
            &format!("500xU8-256_{tag}"),
            &uniform_lens(&mut rng, 500, 8, 256),
            h,
            hkv,
            dh,
        ));
        out.push(Shape::from_lens(
            &format!("2000xU1-32_{tag}"),
            &uniform_lens(&mut rng, 2000, 1, 32),
            h,
            hkv,
            dh,
        ));
        let mut mix = Vec::new();
        while mix.iter().sum::<usize>() < 8000 {
            mix.extend(lognormal_lens(&mut rng, 1, 300.0, 1.0, 4096));
        }
        out.push(Shape::from_lens(
            &format!("lognormal8k_{tag}"),
            &mix,
            h,
            hkv,
            dh,
        ));
    }
    out.push(Shape::from_lens("1x8192_d128_h4/1", &[8192], 4, 1, 128));
    // Small shapes for compute-sanitizer runs (select with --only tiny).
    let tiny = [0, 1, 5, 0, 17, 64, 65, 3, 130, 2];
    out.push(Shape::from_lens("tiny_d128_h4/1", &tiny, 4, 1, 128));
    out.push(Shape::from_lens("tiny_d64_h2/2", &tiny, 2, 2, 64));
    out.extend(window_shapes(&mut rng));
    out
}

/// The sliding-window shapes (names end in `_w<W>`; select with `--only _w`): windows of 1, 3,
/// 16, 64 and 100 keys over sequences of 1 to 300 tokens (packed short tiles whose sequences
/// outgrow the window, window edges inside a tile, on a tile border and across tiles) at both
/// head dims; long sequences whose window leaves most key tiles out; a window no sequence
/// exceeds (W = the longest: the plain causal route); and two tiny ones (`tiny` prefix: in the GPU tests and the
/// sanitizer set).
fn window_shapes(rng: &mut nopad_rng::Rng) -> Vec<Shape> {
    let mut out = Vec::new();
    let fixed = [
        0, 1, 2, 3, 0, 5, 17, 31, 64, 65, 100, 101, 127, 129, 200, 257, 300, 0,
    ];
    for &(dh, h, hkv) in &[(64, 4, 1), (128, 2, 2)] {
        for w in [1, 3, 16, 64, 100] {
            let mut lens = fixed.to_vec();
            lens.extend(uniform_lens(rng, 40, 1, 300));
            let name = format!("win_d{dh}_h{h}/{hkv}");
            out.push(Shape::from_lens(&name, &lens, h, hkv, dh).with_window(w));
        }
    }
    let long = [4099, 1021, 3, 700];
    out.push(Shape::from_lens("winlong_d128_h4/1", &long, 4, 1, 128).with_window(1000));
    out.push(Shape::from_lens("winlong_d64_h2/2", &long, 2, 2, 64).with_window(257));
    // W equal to the longest sequence: nothing is hidden, the plain route runs.
    let short = uniform_lens(rng, 500, 8, 256);
    let w = short.iter().copied().max().unwrap_or(1);
    out.push(Shape::from_lens("winfits_d128_h4/1", &short, 4, 1, 128).with_window(w));
    let tiny = [0, 1, 5, 0, 17, 64, 65, 3, 130, 2];
    out.push(Shape::from_lens("tiny_d64_h2/2", &tiny, 2, 2, 64).with_window(3));
    out.push(Shape::from_lens("tiny_d128_h4/1", &tiny, 4, 1, 128).with_window(16));
    out
}

fn max_err(a: &[f32], b: &[f32], cols: std::ops::Range<usize>, row: usize) -> f64 {
    let mut m = 0f64;
    for (ra, rb) in a.chunks(row).zip(b.chunks(row)) {
        for c in cols.clone() {
            let d = (ra[c] as f64 - rb[c] as f64).abs();
            m = if d.is_nan() { f64::INFINITY } else { m.max(d) };
        }
    }
    m
}

struct GpuOut {
    out: Vec<f32>,
    lse: Vec<f32>,
    dqkv: Vec<f32>,
    written: bool,
    guards: bool,
    deterministic: bool,
}

fn run_gpu(
    gpu: &Gpu,
    shape: &Shape,
    qkv: &[u16],
    dout: &[u16],
    variant: Variant,
) -> Result<GpuOut, HarnessError> {
    let dims = shape.dims();
    let s: Arc<CudaStream> = gpu.stream.clone();
    let fa = variant.kernels(gpu)?;
    let plan = fa.plan(&shape.cu, &dims)?;
    let d_qkv_in = s.clone_htod(qkv).map_err(drv("upload qkv"))?;
    let d_dout = s.clone_htod(dout).map_err(drv("upload d_out"))?;
    let d_cu = s.clone_htod(&shape.cu).map_err(drv("upload cu_seqlens"))?;
    let out = Guarded::new(&s, dims.n * dims.n_heads * dims.head_dim, NAN_BF16)?;
    let lse = Guarded::new(&s, dims.n * dims.n_heads, f32::NAN)?;
    let dq1 = Guarded::new(&s, qkv.len(), NAN_BF16)?;
    let dq2 = Guarded::new(&s, qkv.len(), NAN_BF16)?;
    let ws_len = fa.workspace_bytes(&plan, &dims);
    let ws = s
        .clone_htod(&vec![0xFFu8; ws_len])
        .map_err(drv("alloc workspace"))?;
    let (p_qkv, _a) = d_qkv_in.device_ptr(&s);
    let (p_dout, _b) = d_dout.device_ptr(&s);
    let (p_cu, _c) = d_cu.device_ptr(&s);
    let (p_ws, _d) = ws.device_ptr(&s);
    let (p_out, p_lse) = (out.ptr(&s), lse.ptr(&s));
    // SAFETY: every pointer is a live allocation of the size `dims` implies, on this stream.
    unsafe {
        fa.forward(&s, &plan, &dims, p_qkv, p_cu, p_out, p_lse, p_ws)?;
        for d in [&dq1, &dq2] {
            let p_d = d.ptr(&s);
            fa.backward(
                &s, &plan, &dims, p_qkv, p_cu, p_out, p_lse, p_dout, p_d, p_ws, true,
            )?;
        }
    }
    s.synchronize()
        .map_err(drv(format!("running {:?} on {}", variant, shape.name)))?;
    let (g_out, b_out) = out.read(&s)?;
    let (g_lse, b_lse) = lse.read(&s)?;
    let (g_d1, b_d1) = dq1.read(&s)?;
    let (g_d2, b_d2) = dq2.read(&s)?;
    let guards = g_out
        .iter()
        .chain(&g_d1)
        .chain(&g_d2)
        .all(|&x| x == NAN_BF16)
        && g_lse.iter().all(|x| x.to_bits() == f32::NAN.to_bits());
    let out_f = bf16_to_f32(&b_out);
    let dqkv_f = bf16_to_f32(&b_d1);
    let written = out_f
        .iter()
        .chain(&dqkv_f)
        .chain(&b_lse)
        .all(|x| x.is_finite());
    Ok(GpuOut {
        out: out_f,
        lse: b_lse,
        dqkv: dqkv_f,
        written,
        guards,
        deterministic: b_d1 == b_d2,
    })
}

/// Check `shape` for every kernel set in `sets` on data drawn from `seed`.
pub fn check_shape(
    gpu: &Gpu,
    shape: &Shape,
    seed: u64,
    variants: &[Variant],
) -> Result<Vec<CheckRow>, HarnessError> {
    let dims = shape.dims();
    let qkv = random_bf16(seed, &format!("qkv-{}", shape.name), dims.n * shape.row());
    let dout = random_bf16(
        seed,
        &format!("dout-{}", shape.name),
        dims.n * dims.n_heads * dims.head_dim,
    );
    let (qkv_f, dout_f) = (bf16_to_f32(&qkv), bf16_to_f32(&dout));
    let exact = reference::attention(&qkv_f, &dout_f, &shape.cu, &dims, Precision::F64);
    let naive = reference::attention(&qkv_f, &dout_f, &shape.cu, &dims, Precision::Bf16);
    let (h, hkv, dh) = (dims.n_heads, dims.n_kv_heads, dims.head_dim);
    let row = shape.row();
    let orow = h * dh;
    let parts = [0..h * dh, h * dh..(h + hkv) * dh, (h + hkv) * dh..row];
    let naive_err = [
        max_err(&naive.out, &exact.out, 0..orow, orow.max(1)),
        max_err(&naive.d_qkv, &exact.d_qkv, parts[0].clone(), row),
        max_err(&naive.d_qkv, &exact.d_qkv, parts[1].clone(), row),
        max_err(&naive.d_qkv, &exact.d_qkv, parts[2].clone(), row),
    ];
    let bound = [
        2.0 * naive_err[0] + SLACK,
        1e-3,
        3.0 * naive_err[1] + SLACK,
        3.0 * naive_err[2] + SLACK,
        3.0 * naive_err[3] + SLACK,
    ];
    let mut rows = Vec::new();
    for &k in variants {
        let g = run_gpu(gpu, shape, &qkv, &dout, k)?;
        let lse_err = g
            .lse
            .iter()
            .zip(&exact.lse)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .fold(
                0f64,
                |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
            );
        let err = [
            max_err(&g.out, &exact.out, 0..orow, orow.max(1)),
            lse_err,
            max_err(&g.dqkv, &exact.d_qkv, parts[0].clone(), row),
            max_err(&g.dqkv, &exact.d_qkv, parts[1].clone(), row),
            max_err(&g.dqkv, &exact.d_qkv, parts[2].clone(), row),
        ];
        rows.push(CheckRow {
            shape: shape.name.clone(),
            variant: k,
            err,
            bound,
            written: g.written,
            guards: g.guards,
            deterministic: g.deterministic,
        });
    }
    Ok(rows)
}

/// One line per row: errors over bounds and the verdict.
pub fn format_row(r: &CheckRow) -> String {
    let names = ["out", "lse", "dq", "dk", "dv"];
    let errs: Vec<String> = names
        .iter()
        .zip(r.err.iter().zip(&r.bound))
        .map(|(n, (e, b))| format!("{n} {e:.2e}/{b:.2e}"))
        .collect();
    format!(
        "{} {:<26} {:<9} {} written={} guards={} bitwise-repeat={}",
        if r.pass() { "PASS" } else { "FAIL" },
        r.shape,
        format!("{:?}", r.variant),
        errs.join(" "),
        r.written,
        r.guards,
        r.deterministic
    )
}
