//! Times `decode_attention` (bf16) at Llama-3.1-8B's attention shape (H = 32, Hkv = 8,
//! Dh = 128) for batches of 1 to 64 sequences of 512 to 8192 cached tokens, and reports the
//! bandwidth of its one pass over the cache: bytes = the keys and values of every sequence
//! (`Σ len · 2·Hkv·Dh · 2`) plus the queries and outputs (`B · 2·H·Dh · 2`). Ignored by default:
//! run with `--ignored bench_decode_attention`; compare with the device's copy bandwidth.

use super::bench::{time, up};
use super::{cuda_present, say};
use nopad_backend::cuda::{Cuda, CudaOptions};
use nopad_backend::prelude::*;

#[test]
#[ignore]
fn bench_decode_attention() {
    if !cuda_present("bench_decode_attention") {
        return;
    }
    let g = Cuda::new(CudaOptions::default()).expect("device present");
    say(&format!("bench device: {}", g.describe()));
    let (h, hkv, dh) = (32usize, 8usize, 128usize);
    for (seqs, len) in [(1, 512), (1, 8192), (8, 2048), (32, 1024), (64, 4096)] {
        let dims = DecodeDims {
            n_seqs: seqs,
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: dh,
            scale: 1.0 / (dh as f32).sqrt(),
        };
        let rows = seqs * len;
        let qkv = up(&g, seqs * dims.qkv_width(), 1.0, Kind::Compute);
        let cache = up(&g, rows * dims.cache_width(), 1.0, Kind::Compute);
        let mut out = up(&g, seqs * dims.out_width(), 0.0, Kind::Compute);
        let spans: Vec<i32> = (0..seqs)
            .flat_map(|b| [(b * len) as i32, len as i32])
            .collect();
        let spans = g.ints(&spans).expect("spans");
        let bytes = 2.0 * (rows * dims.cache_width() + seqs * 2 * dims.out_width()) as f64;
        time(
            &g,
            &format!("decode_attention B={seqs} len={len}"),
            bytes,
            true,
            || {
                g.decode_attention(DecodeAttn {
                    out: g.view_mut(&mut out, 0..seqs * dims.out_width()),
                    qkv: g.view(&qkv, 0..seqs * dims.qkv_width()),
                    cache: g.view(&cache, 0..rows * dims.cache_width()),
                    spans: &spans,
                    dims,
                })
            },
        );
    }
}
