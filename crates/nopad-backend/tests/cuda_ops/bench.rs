//! Times every op of the CUDA backend (bf16) on Llama-3.2-1B shapes with CUDA events (and the
//! decode attention over caches of 512 to 8192 tokens, as bandwidth): D = 2048,
//! H = 32, Hkv = 8, Dh = 64, F = 8192, V = 128256, N = 4096 tokens (one sequence, and 16 × 256).
//! Ignored by default: run with `--ignored bench_llama_1b_shapes`. Prints a table of median and
//! min milliseconds over 10 runs after 2 warm-up runs, with TFLOP/s or GB/s.

use super::{cuda_present, say};
use nopad_backend::cuda::{Cuda, CudaBuf, CudaOptions};
use nopad_backend::prelude::*;
use nopad_backend::{AdamW, AttnDims, GradWrite, Kind, LinearDims, RopeDims};

/// `linear_forward` without bias over the first `dims.n` rows of `y` and `x`.
fn linear_fwd(
    g: &Cuda,
    y: &mut CudaBuf,
    (x, w): (&CudaBuf, &CudaBuf),
    dims: LinearDims,
) -> nopad_backend::Result<()> {
    let LinearDims { n, d_in, d_out } = dims;
    g.linear_forward(LinearFwd {
        y: g.view_mut(y, 0..n * d_out),
        x: g.view(x, 0..n * d_in),
        w: g.view(w, 0..d_in * d_out),
        b: None,
        dims,
    })
}

/// Uniform values in [-s, s) from a fixed xorshift stream (fast enough for 10^8 elements).
fn fill(n: usize, s: f32, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * s
        })
        .collect()
}

fn up(g: &Cuda, n: usize, s: f32, kind: Kind) -> CudaBuf {
    let mut b = g.alloc(n, kind).expect("alloc");
    g.write(&mut b, 0, &fill(n, s, n as u64)).expect("write");
    b
}

fn time(
    g: &Cuda,
    name: &str,
    work: f64,
    bytes: bool,
    mut f: impl FnMut() -> nopad_backend::Result<()>,
) {
    for _ in 0..2 {
        f().expect(name);
    }
    let mut ts: Vec<f32> = (0..10).map(|_| g.time_ms(&mut f).expect(name)).collect();
    ts.sort_by(|a, b| a.total_cmp(b));
    let med = ts[ts.len() / 2] as f64;
    let rate = if bytes {
        format!("{:8.0} GB/s", work / med / 1e6)
    } else {
        format!("{:8.1} TFLOP/s", work / med / 1e9)
    };
    say(&format!(
        "bench {name:<44} median {med:9.3} ms  min {:9.3} ms  {rate}",
        ts[0]
    ));
}

#[test]
#[ignore]
fn bench_llama_1b_shapes() {
    if !cuda_present("bench") {
        return;
    }
    let g = Cuda::new(CudaOptions::default()).expect("device present");
    say(&format!("bench device: {}", g.describe()));
    let (n, d, h, hkv, dh, f, v) = (
        4096usize,
        2048usize,
        32usize,
        8usize,
        64usize,
        8192usize,
        128256usize,
    );
    let qkv_w = (h + 2 * hkv) * dh;
    let x = up(&g, n * 2 * f, 1.0, Kind::Compute);
    let mut y = up(&g, n * 2 * f, 1.0, Kind::Compute);
    let mut dx = up(&g, n * f, 1.0, Kind::Compute);
    let w = up(&g, 2 * f * d, 0.02, Kind::Compute);
    let mut dw = up(&g, 2 * f * d, 0.0, Kind::Grad);

    for (name, d_in, d_out) in [
        ("qkv", d, qkv_w),
        ("o_proj", d, d),
        ("gate_up", d, 2 * f),
        ("down", f, d),
    ] {
        let dims = LinearDims { n, d_in, d_out };
        let fl = 2.0 * (n * d_in * d_out) as f64;
        time(
            &g,
            &format!("linear_fwd {name} {n}x{d_in}->{d_out}"),
            fl,
            false,
            || linear_fwd(&g, &mut y, (&x, &w), dims),
        );
        time(
            &g,
            &format!("linear_bwd {name} (dx + dW)"),
            2.0 * fl,
            false,
            || {
                g.linear_backward(LinearBwd {
                    dx: Some(g.view_mut(&mut dx, 0..n * d_in)),
                    dx_write: GradWrite::Overwrite,
                    d_w: Some(g.view_mut(&mut dw, 0..d_in * d_out)),
                    d_b: None,
                    dy: g.view(&y, 0..n * d_out),
                    x: g.view(&x, 0..n * d_in),
                    w: g.view(&w, 0..d_in * d_out),
                    dims,
                    write: GradWrite::Accumulate,
                })
            },
        );
    }

    // Host cost of a GEMM whose token count is new (cuBLASLt heuristic + plan) against a cached
    // one: packed batches change N every step. Wall clock, synchronised, median of 5.
    for (name, d_in, d_out) in [("qkv", d, qkv_w), ("o_proj", d, d), ("gate_up", d, 2 * f)] {
        let mut wall = |rows: usize| {
            let dims = LinearDims {
                n: rows,
                d_in,
                d_out,
            };
            g.synchronize().expect("sync");
            let t = std::time::Instant::now();
            linear_fwd(&g, &mut y, (&x, &w), dims).expect("linear_forward");
            g.synchronize().expect("sync");
            t.elapsed().as_secs_f64() * 1e3
        };
        let med = |f: &mut dyn FnMut(usize) -> f64| {
            let mut ts: Vec<f64> = (1..=5).map(f).collect();
            ts.sort_by(|a, b| a.total_cmp(b));
            ts[2]
        };
        let cached = med(&mut |_| wall(n - 1000));
        let fresh = med(&mut |i| wall(n - 1000 - 8 * i));
        say(&format!(
            "bench gemm plan {name:<8} N~3096: cached {cached:.3} ms, new N {fresh:.3} ms (wall, synchronised)"
        ));
    }

    let mut rstd = up(&g, n, 1.0, Kind::Master);
    let mut dwt = up(&g, d, 0.0, Kind::Grad);
    let nd = (n * d) as f64;
    time(&g, "rmsnorm_fwd 4096x2048", nd * 4.0, true, || {
        g.rmsnorm_forward(RmsNormFwd {
            y: g.view_mut(&mut y, 0..n * d),
            rstd: g.view_mut(&mut rstd, 0..n),
            x: g.view(&x, 0..n * d),
            weight: g.view(&w, 0..d),
            n,
            d,
            eps: 1e-5,
        })
    });
    time(&g, "rmsnorm_bwd", nd * 10.0, true, || {
        g.rmsnorm_backward(RmsNormBwd {
            dx: g.view_mut(&mut dx, 0..n * d),
            d_weight: Some(g.view_mut(&mut dwt, 0..d)),
            dy: g.view(&y, 0..n * d),
            x: g.view(&x, 0..n * d),
            weight: g.view(&w, 0..d),
            rstd: g.view(&rstd, 0..n),
            n,
            d,
            write: GradWrite::Accumulate,
        })
    });
    let inv = up(&g, dh / 2, 0.5, Kind::Master);
    let pos: Vec<i32> = (0..n as i32).collect();
    let gpos = g.ints(&pos).expect("ints");
    let rd = RopeDims {
        n,
        row_stride: qkv_w,
        n_rot_heads: h + hkv,
        head_dim: dh,
    };
    time(
        &g,
        "rope_fwd (q and k heads)",
        (n * (h + hkv) * dh * 4) as f64,
        true,
        || {
            g.rope_forward(Rope {
                x: g.view_mut(&mut y, 0..n * qkv_w),
                inv_freq: g.view(&inv, 0..dh / 2),
                positions: &gpos,
                dims: rd,
            })
        },
    );
    let nf = (n * f) as f64;
    time(&g, "swiglu_fwd 4096x8192", nf * 6.0, true, || {
        g.swiglu_forward(SwigluFwd {
            a: g.view_mut(&mut dx, 0..n * f),
            gu: g.view(&y, 0..2 * n * f),
            n,
            f,
        })
    });
    time(&g, "swiglu_bwd", nf * 10.0, true, || {
        g.swiglu_backward(SwigluBwd {
            gu: g.view_mut(&mut y, 0..2 * n * f),
            d_a: g.view(&dx, 0..n * f),
            n,
            f,
        })
    });

    for lens in [vec![n], vec![256; 16]] {
        let mut cu = vec![0i32];
        for &l in &lens {
            cu.push(cu[cu.len() - 1] + l as i32);
        }
        let gcu = g.ints(&cu).expect("ints");
        let dims = AttnDims {
            n,
            n_seqs: lens.len(),
            max_seqlen: lens[0],
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: dh,
            scale: 0.125,
            window: None,
        };
        let sl2: f64 = lens.iter().map(|&l| (l * l) as f64 / 2.0).sum();
        let fl = 4.0 * (dh * h) as f64 * sl2;
        let mut lse = up(&g, h * n, 0.0, Kind::Master);
        let tag = format!("{}x{}", lens.len(), lens[0]);
        time(&g, &format!("attention_fwd {tag}"), fl, false, || {
            g.attention_forward(AttnFwd {
                out: g.view_mut(&mut dx, 0..n * h * dh),
                lse: g.view_mut(&mut lse, 0..h * n),
                qkv: g.view(&x, 0..n * qkv_w),
                cu_seqlens: &gcu,
                dims,
            })
        });
        time(&g, &format!("attention_bwd {tag}"), 2.5 * fl, false, || {
            g.attention_backward(AttnBwd {
                d_qkv: g.view_mut(&mut y, 0..n * qkv_w),
                d_out: g.view(&x, 0..n * h * dh),
                qkv: g.view(&x, 0..n * qkv_w),
                out: g.view(&dx, 0..n * h * dh),
                lse: g.view(&lse, 0..h * n),
                cu_seqlens: &gcu,
                dims,
            })
        });
    }

    let head = up(&g, v * d, 0.02, Kind::Compute);
    let mut dhead = up(&g, v * d, 0.0, Kind::Grad);
    let mut loss = up(&g, 1, 0.0, Kind::Master);
    for masked in [0usize, 2] {
        let targets: Vec<i32> = (0..n)
            .map(|t| {
                if masked > 0 && t % masked == 0 {
                    -100
                } else {
                    (t * 7919 % v) as i32
                }
            })
            .collect();
        let rows = targets.iter().filter(|&&t| t != -100).count();
        let gt = g.ints(&targets).expect("ints");
        let dims = LinearDims {
            n,
            d_in: d,
            d_out: v,
        };
        time(
            &g,
            &format!("lm_head_loss fwd+bwd {rows} target rows, V={v}"),
            6.0 * (rows * d * v) as f64,
            false,
            || {
                g.lm_head_loss(LmHeadLoss {
                    loss_sum: g.view_mut(&mut loss, 0..1),
                    dx: Some(g.view_mut(&mut dx, 0..n * d)),
                    d_w: Some(g.view_mut(&mut dhead, 0..v * d)),
                    x: g.view(&x, 0..n * d),
                    w: g.view(&head, 0..v * d),
                    targets: &gt,
                    dims,
                    grad_scale: 1e-4,
                    write: GradWrite::Accumulate,
                })
            },
        );
    }
    let tok: Vec<i32> = (0..n).map(|t| (t * 31 % v) as i32).collect();
    let gtok = g.ints(&tok).expect("ints");
    time(&g, "embedding_fwd", nd * 4.0, true, || {
        g.embedding_forward(EmbeddingFwd {
            x: g.view_mut(&mut y, 0..n * d),
            table: g.view(&head, 0..v * d),
            tokens: &gtok,
            n,
            d,
        })
    });
    time(
        &g,
        "embedding_bwd (sorted, deterministic)",
        nd * 10.0,
        true,
        || {
            g.embedding_backward(EmbeddingBwd {
                d_table: g.view_mut(&mut dhead, 0..v * d),
                dx: g.view(&x, 0..n * d),
                tokens: &gtok,
                n,
                d,
            })
        },
    );
    time(&g, "add 4096x2048", nd * 6.0, true, || {
        g.add(
            g.view_mut(&mut y, 0..n * d),
            g.view(&x, 0..n * d),
            g.view(&dx, 0..n * d),
            n * d,
        )
    });
    let np = 256usize << 20;
    let mut p = up(&g, np, 1.0, Kind::Compute);
    let mut master = g.master_new(&p, np).expect("master");
    let grad = up(&g, np, 1.0, Kind::Grad);
    let mut m = up(&g, np, 0.0, Kind::Master);
    let mut vv = up(&g, np, 0.0, Kind::Master);
    let hp = AdamW {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 1.0,
    };
    time(
        &g,
        "adamw 256M params (bf16 + split fp32 master)",
        np as f64 * 28.0,
        true,
        || {
            g.adamw(AdamWStep {
                param: g.view_mut(&mut p, 0..np),
                master: Some(g.view_mut(&mut master, 0..np)),
                grad: g.view(&grad, 0..np),
                m: g.view_mut(&mut m, 0..np),
                v: g.view_mut(&mut vv, 0..np),
                n: np,
                hp,
            })
        },
    );
    time(&g, "sum_squares 256M fp32", np as f64 * 4.0, true, || {
        g.sum_squares(g.view(&grad, 0..np), np).map(|_| ())
    });
    decode_attention(&g, (h, hkv, dh));
    say(&format!(
        "bench peak device memory: {:.2} GiB",
        g.peak_memory() as f64 / (1u64 << 30) as f64
    ));
}

/// `decode_attention` for batches of 1 to 64 sequences of 512 to 8192 cached tokens, as the
/// bandwidth of its one pass over the cache: the keys and values of every sequence
/// (`Σ len · 2·Hkv·Dh · 2` bytes) plus the queries and outputs (`B · 2·H·Dh · 2`).
fn decode_attention(g: &Cuda, (h, hkv, dh): (usize, usize, usize)) {
    for (seqs, len) in [(1, 512), (1, 8192), (8, 2048), (32, 1024), (64, 4096)] {
        let dims = DecodeDims {
            n_seqs: seqs,
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: dh,
            scale: 1.0 / (dh as f32).sqrt(),
        };
        let (wq, wc, wo) = (
            seqs * dims.qkv_width(),
            seqs * len * dims.cache_width(),
            seqs * dims.out_width(),
        );
        let (q, cache) = (up(g, wq, 1.0, Kind::Compute), up(g, wc, 1.0, Kind::Compute));
        let mut out = up(g, wo, 0.0, Kind::Compute);
        let spans: Vec<i32> = (0..seqs)
            .flat_map(|b| [(b * len) as i32, len as i32])
            .collect();
        let spans = g.ints(&spans).expect("spans");
        let bytes = 2.0 * (wc + 2 * wo) as f64;
        let name = format!("decode_attention B={seqs} len={len}");
        time(g, &name, bytes, true, || {
            g.decode_attention(DecodeAttn {
                out: g.view_mut(&mut out, 0..wo),
                qkv: g.view(&q, 0..wq),
                cache: g.view(&cache, 0..wc),
                spans: &spans,
                dims,
            })
        });
    }
}
