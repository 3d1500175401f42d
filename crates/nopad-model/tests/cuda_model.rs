//! The whole model on the CUDA backend against the CPU backend: same weights, same packed batch,
//! loss and every parameter's gradient. F32 mode must agree to 1e-4 (norm-relative, per tensor);
//! bf16 mode within a tolerance derived from bf16's unit roundoff. Without a GPU each test prints a
//! visible skip line and returns.

use std::io::Write;

use nopad_backend::cpu::Cpu;
use nopad_backend::cuda::{probe, Cuda, CudaDtype, CudaOptions};
use nopad_backend::prelude::*;
use nopad_model::config::LayerType;
use nopad_model::{weights, Config, Inputs, Model, Recompute};
use nopad_rng::Rng;

fn gpu(dtype: CudaDtype, bf16_grads: bool, test: &str) -> Option<Cuda> {
    if let Err(why) = probe() {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: no CUDA device ({why}) [{test}]"
        );
        return None;
    }
    Some(
        Cuda::new(CudaOptions {
            dtype,
            bf16_grads,
            ..Default::default()
        })
        .expect("a probed GPU opens"),
    )
}

/// Head dim 64 so the bf16 run goes through nopad-flash; GQA 4/2; biases on (Qwen2-like) and an
/// untied head (or tied, as in Llama-3.2-1B), so every parameter kind is compared.
fn config(tied: bool) -> Config {
    Config::from_json_str(
        &format!(
            r#"{{"architectures":["Qwen2ForCausalLM"],"vocab_size":1000,"hidden_size":256,"intermediate_size":512,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-6,
            "rope_theta":10000.0,"tie_word_embeddings":{tied}}}"#
        ),
        "test config",
    )
    .unwrap()
}

/// Qwen3: q/k norms, heads of 64 (nopad-flash in bf16) over a residual stream of 192, so q_proj
/// widens (192 → 256) and o_proj narrows; biases on q/k/v/o as `attention_bias` says.
fn qwen3_config(tied: bool, bias: bool) -> Config {
    Config::from_json_str(
        &format!(
            r#"{{"architectures":["Qwen3ForCausalLM"],"vocab_size":1000,"hidden_size":192,"intermediate_size":512,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":64,"rms_norm_eps":1e-6,
            "rope_theta":1000000.0,"attention_bias":{bias},"tie_word_embeddings":{tied}}}"#
        ),
        "test config",
    )
    .unwrap()
}

#[path = "support/packed.rs"]
mod packed;
use packed::Packed;

fn flatten(rng: &mut Rng, lens: &[usize], vocab: usize) -> Packed {
    let mut p = Packed::empty(0);
    for &l in lens {
        let toks: Vec<i32> = (0..l).map(|_| rng.below(vocab as u64) as i32).collect();
        for i in 0..l {
            p.tokens.push(toks[i]);
            // A masked prompt of a quarter, then targets; the last token has none.
            p.targets.push(if i + 1 < l && i >= l / 4 {
                toks[i + 1]
            } else {
                -100
            });
            p.pos.push(i as i32);
        }
        p.cu.push(p.tokens.len() as i32);
        p.max = p.max.max(l);
    }
    p
}

fn run<B: Backend>(
    b: &B,
    cfg: &Config,
    seed: u64,
    p: &Packed,
    recompute: Recompute,
    alias: bool,
) -> (f64, Vec<f32>) {
    let mut m = Model::new(b, cfg.clone()).unwrap();
    m.set_recompute(recompute);
    m.set_grad_aliasing(b, alias).unwrap();
    let layout = m.layout.clone();
    weights::init_random(cfg, &layout, seed, |off, v| m.write_params(b, off, v)).unwrap();
    let inputs = p.inputs();
    let targets = p.targets.iter().filter(|&&t| t >= 0).count();
    // Two steps on the same batch without an update: the second finds the first's gradients
    // (and, aliased, activations written over them) and must overwrite all of it.
    for _ in 0..2 {
        m.zero_grads(b).unwrap();
        m.forward_train(b, &inputs, 1.0 / targets as f32).unwrap();
        m.backward(b).unwrap();
    }
    let loss = m.take_loss_sum(b).unwrap() / (2 * targets) as f64;
    (loss, b.read(m.grads(b).unwrap(), 0..layout.total).unwrap())
}

fn rel(a: &[f32], r: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(r)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = r.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// The GPU side runs with gradient aliasing in bf16 (how `nopad train` runs steps of one
/// micro-batch) and without in f32 (how it runs gradient accumulation).
fn compare(dtype: CudaDtype, recompute: Recompute, loss_tol: f64, grad_tol: f64, test: &str) {
    compare_with(dtype, false, recompute, loss_tol, grad_tol, test);
}

fn compare_with(
    dtype: CudaDtype,
    bf16_grads: bool,
    recompute: Recompute,
    loss_tol: f64,
    grad_tol: f64,
    test: &str,
) {
    // The bf16-gradient run (the 1B benchmark's configuration) ties the head.
    let cfg = config(bf16_grads);
    compare_cfg(
        &cfg,
        (dtype, bf16_grads),
        recompute,
        (loss_tol, grad_tol),
        test,
    );
}

/// `cfg` on the GPU (in `dtype`, with bf16 gradients or not) against the CPU: the loss and
/// every tensor's gradient within `(loss_tol, grad_tol)`.
fn compare_cfg(
    cfg: &Config,
    (dtype, bf16_grads): (CudaDtype, bool),
    recompute: Recompute,
    (loss_tol, grad_tol): (f64, f64),
    test: &str,
) {
    let Some(gpu) = gpu(dtype, bf16_grads, test) else {
        return;
    };
    let seed = Rng::new(0x5eed).next_u64() ^ std::process::id() as u64;
    let mut rng = Rng::new(seed);
    // Lengths with a length-1 sequence, primes, tile-crossing sizes and one long sequence.
    let p = flatten(&mut rng, &[1, 17, 64, 65, 129, 300, 2, 31], cfg.vocab_size);
    let (l_cpu, g_cpu) = run(&Cpu::<f32>::new(), cfg, seed, &p, Recompute::None, false);
    let alias = dtype == CudaDtype::Bf16;
    let (l_gpu, g_gpu) = run(&gpu, cfg, seed, &p, recompute, alias);
    let dl = ((l_gpu - l_cpu) / l_cpu).abs();
    eprintln!("[{test}] seed {seed}: loss cpu {l_cpu:.6} gpu {l_gpu:.6} (rel {dl:.2e})");
    assert!(
        dl <= loss_tol,
        "[{test}] seed {seed}: loss differs by {dl:e}"
    );
    assert!(
        g_gpu.iter().all(|g| g.is_finite()),
        "[{test}] non-finite gradient"
    );
    let layout = nopad_model::Layout::new(cfg);
    let mut worst = (0.0, String::new());
    for t in &layout.tensors {
        let r = rel(&g_gpu[t.range()], &g_cpu[t.range()]);
        if r > worst.0 {
            worst = (r, t.name.clone());
        }
        assert!(
            r <= grad_tol,
            "[{test}] seed {seed}: {}: gradient relative error {r:e} > {grad_tol:e}",
            t.name
        );
    }
    eprintln!("[{test}] worst gradient: {} at {:.2e}", worst.1, worst.0);
}

/// Offloaded activations on the GPU: the projections travel to the host on their own streams
/// while later layers compute and come back during the backward, so a missing fence would read
/// a buffer mid-copy or overwritten. The same model with and without offloading (three of six
/// layers, two of which make the round trip, beside one recomputed layer) must give the same
/// bits: loss and every gradient, over two steps (`run`).
#[test]
fn bf16_offloaded_activations_are_bit_identical() {
    let test = "bf16_offloaded_activations_are_bit_identical";
    let Some(gpu) = gpu(CudaDtype::Bf16, false, test) else {
        return;
    };
    let mut cfg = config(false);
    cfg.num_hidden_layers = 6;
    let seed = Rng::new(0x0ff1).next_u64() ^ std::process::id() as u64;
    let mut rng = Rng::new(seed);
    let p = flatten(&mut rng, &[1, 17, 64, 65, 129, 300, 2, 31], cfg.vocab_size);
    let (l0, g0) = run(&gpu, &cfg, seed, &p, Recompute::None, true);
    let (l1, g1) = {
        let mut m = Model::new(&gpu, cfg.clone()).unwrap();
        m.set_recompute(Recompute::Mlp(Some(1)));
        m.set_offload_activations(3).unwrap();
        m.set_grad_aliasing(&gpu, true).unwrap();
        let layout = m.layout.clone();
        weights::init_random(&cfg, &layout, seed, |off, v| m.write_params(&gpu, off, v)).unwrap();
        let (inputs, targets) = (p.inputs(), p.targets.iter().filter(|&&t| t >= 0).count());
        for _ in 0..2 {
            m.zero_grads(&gpu).unwrap();
            m.forward_train(&gpu, &inputs, 1.0 / targets as f32)
                .unwrap();
            m.backward(&gpu).unwrap();
        }
        let loss = m.take_loss_sum(&gpu).unwrap() / (2 * targets) as f64;
        (
            loss,
            gpu.read(m.grads(&gpu).unwrap(), 0..layout.total).unwrap(),
        )
    };
    eprintln!("[{test}] seed {seed}: loss {l0:.6} kept, {l1:.6} offloaded");
    assert_eq!(l0.to_bits(), l1.to_bits(), "[{test}] seed {seed}: loss");
    let same = g0.iter().zip(&g1).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "[{test}] seed {seed}: gradients differ");
}

/// Sliding windows: a Qwen2 config whose layer 0 slides (W = 40, below most of the sequences
/// of `compare_cfg`'s batch) and layer 1 attends fully, so one micro-batch runs nopad-flash's
/// windowed kernels and its plain ones; the tolerances of the unwindowed bf16 test.
#[test]
fn bf16_windowed_model_matches_cpu() {
    let mut cfg = config(false);
    cfg.sliding_window = Some(40);
    cfg.layer_types = Some(vec![LayerType::Sliding, LayerType::Full]);
    let test = "bf16_windowed_model_matches_cpu";
    compare_cfg(
        &cfg,
        (CudaDtype::Bf16, false),
        Recompute::None,
        (4e-3, 7.4e-2),
        test,
    );
}

#[test]
fn f32_model_matches_cpu() {
    compare(
        CudaDtype::F32,
        Recompute::None,
        1e-4,
        1e-4,
        "f32_model_matches_cpu",
    );
}

/// bf16 stores every activation with unit roundoff u = 2^-8 ≈ 3.9e-3. The loss is a mean over
/// many tokens, so its error averages down to about u. A parameter gradient passes through about
/// k = 2·10·L independently rounded stages (norm, projection, rope, attention, projection,
/// residual... in both passes); independent roundings add like a random walk, √k·u, and we allow
/// three standard deviations: 3·√40·u ≈ 0.074 for L = 2.
#[test]
fn bf16_model_matches_cpu_within_bf16_rounding() {
    compare(
        CudaDtype::Bf16,
        Recompute::None,
        4e-3,
        7.4e-2,
        "bf16_model_matches_cpu_within_bf16_rounding",
    );
}

/// Recomputing activations in the backward runs the same ops on the same inputs: the same
/// tolerance as without it, for both modes.
#[test]
fn bf16_model_with_recompute_matches_cpu() {
    for mode in [
        Recompute::Mlp(Some(1)),
        Recompute::Mlp(None),
        Recompute::Full,
    ] {
        compare(
            CudaDtype::Bf16,
            mode,
            4e-3,
            7.4e-2,
            &format!("bf16_model_with_recompute_{mode}_matches_cpu"),
        );
    }
}

/// bf16 gradients add one rounding (relative 2^-9) to each gradient once per micro-batch, well
/// inside the bf16 bound above, which therefore still applies.
#[test]
fn bf16_model_with_bf16_gradients_matches_cpu() {
    compare_with(
        CudaDtype::Bf16,
        true,
        Recompute::None,
        4e-3,
        7.4e-2,
        "bf16_model_with_bf16_gradients_matches_cpu",
    );
}

/// Qwen3 (the per-head q/k norm kernels in both passes, heads wider than the residual stream):
/// f32 to 1e-4; bf16 within the bound above with two more rounded stages per layer and pass
/// (the norm of q and k), k = 2·12·L = 48: 3·√48·u ≈ 0.081; under full recomputation, with bf16
/// gradients, with biases.
#[test]
fn qwen3_model_matches_cpu() {
    use CudaDtype::{Bf16, F32};
    let cases = [
        (
            qwen3_config(false, false),
            F32,
            false,
            Recompute::None,
            (1e-4, 1e-4),
        ),
        (
            qwen3_config(true, false),
            Bf16,
            false,
            Recompute::None,
            (4e-3, 8.1e-2),
        ),
        (
            qwen3_config(false, true),
            Bf16,
            false,
            Recompute::Full,
            (4e-3, 8.1e-2),
        ),
        (
            qwen3_config(true, true),
            Bf16,
            true,
            Recompute::Mlp(None),
            (4e-3, 8.1e-2),
        ),
    ];
    for (cfg, dtype, g16, rc, tols) in cases {
        let test = format!("qwen3_model_matches_cpu {dtype:?} bf16 grads {g16} {rc}");
        compare_cfg(&cfg, (dtype, g16), rc, tols, &test);
    }
}

/// A LoRA model (every target, rank 8, dropout, B drawn so that A takes gradient too) on the
/// GPU against the CPU: loss and every adapter gradient, with the same tolerances as the whole
/// model, without and with full recomputation; over a bf16 base and over an NF4 one (QLoRA:
/// the `dequant_nf4` kernel ahead of every base GEMM, fresh random weights quantised).
#[test]
fn lora_model_matches_cpu() {
    use nopad_model::lora::{init_adapter, AdapterLayout, LoraConfig, Target};
    use nopad_model::quant::BaseDtype;
    let settings = |seed| LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.1,
        targets: Target::ALL.to_vec(),
        use_rslora: false,
        seed,
    };
    fn run_lora<B: Backend>(
        b: &B,
        cfg: &Config,
        (lora, base): (LoraConfig, nopad_model::quant::BaseDtype),
        p: &Packed,
        rc: Recompute,
    ) -> (f64, Vec<f32>) {
        let seed = lora.seed;
        let mut m = Model::new_lora_over(b, cfg.clone(), lora, base, true).unwrap();
        m.set_recompute(rc);
        let layout = m.layout.clone();
        weights::init_random(cfg, &layout, seed, |off, v| m.write_params(b, off, v)).unwrap();
        let al = m.adapter_layout().unwrap().clone();
        init_adapter(&al, seed, |off, v| m.write_adapter(b, off, v)).unwrap();
        let mut rng = Rng::new(seed ^ 1);
        for md in al.layers.iter().flatten() {
            let v: Vec<f32> = md.b.clone().map(|_| 0.05 * rng.normal() as f32).collect();
            m.write_adapter(b, md.b.start, &v).unwrap();
        }
        m.set_lora_step(3);
        let targets = p.targets.iter().filter(|&&t| t >= 0).count();
        m.zero_grads(b).unwrap();
        m.forward_train(b, &p.inputs(), 1.0 / targets as f32)
            .unwrap();
        m.backward(b).unwrap();
        let loss = m.take_loss_sum(b).unwrap() / targets as f64;
        (loss, b.read(m.grads(b).unwrap(), 0..al.total).unwrap())
    }
    for (dtype, loss_tol, grad_tol) in [
        (CudaDtype::F32, 1e-4, 1e-4),
        (CudaDtype::Bf16, 4e-3, 7.4e-2),
    ] {
        let test = format!("lora_model_matches_cpu {dtype:?}");
        let Some(gpu) = gpu(dtype, false, &test) else {
            return;
        };
        let seed = Rng::new(0x10aa).next_u64() ^ std::process::id() as u64;
        // Both configs have a vocabulary of 1000.
        let p = flatten(&mut Rng::new(seed), &[1, 17, 64, 65, 129, 300, 2, 31], 1000);
        let (bf16, nf4) = (BaseDtype::Bf16, BaseDtype::Nf4);
        let cases = [
            (config(false), bf16, Recompute::None),
            (config(false), bf16, Recompute::Full),
            (config(false), nf4, Recompute::None),
            (config(false), nf4, Recompute::Full),
            // Qwen3's frozen q/k norms between the q/k adapters and RoPE, over both bases.
            (qwen3_config(false, false), bf16, Recompute::Full),
            (qwen3_config(true, true), nf4, Recompute::None),
        ];
        for (cfg, base, rc) in cases {
            let test = format!("{test} {:?} {base:?}", cfg.arch);
            // The q/k norms' two more rounded stages a layer (see qwen3_model_matches_cpu).
            let grad_tol = match dtype {
                CudaDtype::Bf16 if cfg.qk_norm => 8.1e-2,
                _ => grad_tol,
            };
            let s = (settings(seed), base);
            let (l_cpu, g_cpu) = run_lora(&Cpu::<f32>::new(), &cfg, s.clone(), &p, Recompute::None);
            let (l_gpu, g_gpu) = run_lora(&gpu, &cfg, s, &p, rc);
            let dl = ((l_gpu - l_cpu) / l_cpu).abs();
            eprintln!(
                "[{test} {rc}] seed {seed}: loss cpu {l_cpu:.6} gpu {l_gpu:.6} (rel {dl:.2e})"
            );
            assert!(
                dl <= loss_tol,
                "[{test} {rc}] seed {seed}: loss differs by {dl:e}"
            );
            let al = AdapterLayout::new(&cfg, &settings(seed));
            for t in &al.tensors {
                let r = rel(&g_gpu[t.range()], &g_cpu[t.range()]);
                assert!(
                    r <= grad_tol,
                    "[{test} {rc}] seed {seed}: {}: relative error {r:e}",
                    t.name
                );
            }
        }
    }
}

/// The one-group gradient scratch of the optimizer in the backward, on the GPU in bf16 with
/// bf16 gradients (how `--optim-in-backward` runs): every group's gradient, read in the hook,
/// against the same GPU's full gradient buffer (the same kernels on other addresses: equal up
/// to a GEMM algorithm chosen for another alignment) and against the CPU (the bf16 bound).
#[test]
fn bf16_one_group_gradient_scratch_matches_the_full_buffer_and_cpu() {
    let test = "bf16_one_group_gradient_scratch_matches_the_full_buffer_and_cpu";
    let Some(gpu) = gpu(CudaDtype::Bf16, true, test) else {
        return;
    };
    for tied in [false, true] {
        let cfg = config(tied);
        let seed = Rng::new(0x5c4a7c).next_u64() ^ std::process::id() as u64;
        let mut rng = Rng::new(seed);
        let p = flatten(&mut rng, &[3, 70, 129, 250, 1, 44], cfg.vocab_size);
        let (l_cpu, g_cpu) = run(&Cpu::<f32>::new(), &cfg, seed, &p, Recompute::None, false);
        let (l_full, g_full) = run(&gpu, &cfg, seed, &p, Recompute::None, false);
        let mut m = Model::new(&gpu, cfg.clone()).unwrap();
        m.set_update_in_backward(&gpu, true).unwrap();
        let layout = m.layout.clone();
        weights::init_random(&cfg, &layout, seed, |off, v| m.write_params(&gpu, off, v)).unwrap();
        let targets = p.targets.iter().filter(|&&t| t >= 0).count();
        let mut g = vec![f32::NAN; layout.total];
        m.forward_train(&gpu, &p.inputs(), 1.0 / targets as f32)
            .unwrap();
        m.backward_with(&gpu, |gg| {
            for (r, _) in gg.group.ranges() {
                let v = gpu.read(gg.grads, gg.grad_range(&r))?;
                g[r].copy_from_slice(&v);
            }
            Ok::<(), nopad_model::ModelError>(())
        })
        .unwrap();
        let l = m.take_loss_sum(&gpu).unwrap() / targets as f64;
        assert!(
            g.iter().all(|v| v.is_finite()),
            "[{test}] every group handed over"
        );
        eprintln!(
            "[{test}] tied={tied} seed {seed}: loss cpu {l_cpu:.6} full {l_full:.6} scratch {l:.6}"
        );
        assert!(
            ((l - l_cpu) / l_cpu).abs() <= 4e-3,
            "[{test}] loss {l} vs cpu {l_cpu}"
        );
        let (mut worst_full, mut worst_cpu) = (0.0f64, 0.0f64);
        for t in &layout.tensors {
            let (rf, rc) = (
                rel(&g[t.range()], &g_full[t.range()]),
                rel(&g[t.range()], &g_cpu[t.range()]),
            );
            worst_full = worst_full.max(rf);
            worst_cpu = worst_cpu.max(rc);
            assert!(
                rf <= 1e-2,
                "[{test}] seed {seed}: {} vs the full buffer: {rf:e}",
                t.name
            );
            assert!(
                rc <= 7.4e-2,
                "[{test}] seed {seed}: {} vs cpu: {rc:e}",
                t.name
            );
        }
        eprintln!(
            "[{test}] tied={tied}: worst vs full buffer {worst_full:.2e}, vs cpu {worst_cpu:.2e}"
        );
    }
}
