//! Generation on the CUDA backend against the CPU's, same weights and prompts (a batch of
//! different lengths): in f32 mode every greedy token equal and every row of logits within
//! 1e-4 (norm-relative); in bf16 mode (the prefill through nopad-flash, head dim 64) each
//! prompt's first row within 3e-2 and every later row within it while the two greedy histories
//! agree. Without a GPU the test prints a visible skip line and returns.

use std::io::Write;

use nopad_backend::cpu::Cpu;
use nopad_backend::cuda::{probe, Cuda, CudaDtype, CudaOptions};
use nopad_backend::Backend;
use nopad_model::generate::{GenerateOptions, Sampling};
use nopad_model::{weights, Config, Model};
use nopad_rng::Rng;

/// GQA 4/2, head dim 64, biases, untied head.
fn config() -> Config {
    Config::from_json_str(
        r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":1000,"hidden_size":256,"intermediate_size":512,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-6,
        "rope_theta":10000.0,"tie_word_embeddings":false}"#,
        "test config",
    )
    .unwrap()
}

/// Each prompt's tokens and rows of logits, greedy.
type Run = Vec<(Vec<i32>, Vec<Vec<f64>>)>;

fn generate<B: Backend>(b: &B, prompts: &[Vec<i32>], max_new: usize) -> Run {
    let cfg = config();
    let mut m = Model::new_eval(b, cfg.clone()).unwrap();
    let layout = m.layout.clone();
    weights::init_random(&cfg, &layout, 3, |o, v| m.write_params(b, o, v)).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        sampling: Sampling::GREEDY,
        seed: 0,
        eos: vec![],
    };
    let mut rows = vec![Vec::new(); prompts.len()];
    let out = m
        .generate_with(b, prompts, &opts, |i, l| rows[i].push(l.to_vec()))
        .unwrap();
    out.into_iter().map(|g| g.ids).zip(rows).collect()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

#[test]
fn cuda_generation_matches_the_cpu() {
    if let Err(why) = probe() {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: no CUDA device ({why}) [cuda_generation]"
        );
        return;
    }
    let mut rng = Rng::new(17);
    let prompts: Vec<Vec<i32>> = [1, 9, 70, 130, 33]
        .iter()
        .map(|&l| (0..l).map(|_| rng.below(1000) as i32).collect())
        .collect();
    let cpu = generate(&Cpu::<f32>::new(), &prompts, 12);
    for (dtype, tol) in [(CudaDtype::F32, 1e-4), (CudaDtype::Bf16, 3e-2)] {
        let gpu = Cuda::new(CudaOptions {
            dtype,
            ..Default::default()
        })
        .expect("a probed GPU opens");
        let got = generate(&gpu, &prompts, 12);
        for (i, ((gt, gl), (ct, cl))) in got.iter().zip(&cpu).enumerate() {
            if dtype == CudaDtype::F32 {
                assert_eq!(gt, ct, "{dtype:?} prompt {i}: tokens");
            }
            // Rows compared while the histories agree (the first always: the prefill's).
            let agree = 1 + gt.iter().zip(ct).take_while(|(a, b)| a == b).count();
            for (k, (g, c)) in gl.iter().zip(cl).take(agree).enumerate() {
                let r = rel(g, c);
                let _ = writeln!(
                    std::io::stderr(),
                    "{dtype:?} prompt {i} step {k}: rel {r:.2e}"
                );
                assert!(
                    r < tol,
                    "{dtype:?} prompt {i} step {k}: logits differ by {r:.2e}"
                );
            }
        }
    }
}
