//! Launchers of `decode.cu`: rows copied to chosen rows of another buffer (the KV cache's
//! append, a gather of each prompt's last row), and the attention of one query row per
//! sequence over its cached keys and values, split over the keys in blocks of [`KEYS`] and
//! combined by a second kernel.
//!
//! Bytes of one decode attention (bf16): the cache's keys and values of every sequence once,
//! `Σ_b len_b · 2·Hkv·Dh · 2`, plus the queries and outputs (`B·2·H·Dh·2`) and the partial
//! results (`B·H·C·(Dh + 2)·4` written and read, C = chunks of the longest sequence, under
//! `1/KEYS` of the cache's bytes per query head of a group); it is bound by memory bandwidth.

use super::compile::{Launch, DECODE};
use super::elementwise::stride_launch;
use super::{want, Cuda, Dtype};
use crate::args::{CopyRows, DecodeAttn};
use crate::{BackendError, Result};

/// Keys per block of the chunk kernel (`KEYS` in decode.cu).
const KEYS: usize = 64;
/// Threads per block of both attention kernels (`DECODE_NT`).
const THREADS: u32 = 128;
/// Largest head dim: `KREG` key elements per lane (decode.cu).
const MAX_HEAD_DIM: usize = 256;
/// Largest dynamic shared memory of a chunk block (the group's queries and scores).
const MAX_SMEM: usize = 96 << 10;

/// Mirrors `CopyRowsParams` in decode.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct CopyRowsParams {
    y: u64,
    x: u64,
    pairs: u64,
    n: i64,
    x_stride: i64,
    c0: i64,
    w: i64,
}

/// Mirrors `DecodeParams` in decode.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct DecodeParams {
    out: u64,
    qkv: u64,
    cache: u64,
    spans: u64,
    part_o: u64,
    part_ml: u64,
    h: i32,
    hkv: i32,
    dh: i32,
    chunks: i32,
    scale: f32,
}

impl Cuda {
    /// y: `[rows, w]`, x: `[rows, x_stride]`, both Compute (see [`CopyRows`]).
    pub(crate) fn copy_rows_impl(&self, a: CopyRows<'_, Self>) -> Result<()> {
        let op = "copy_rows";
        a.check(&a.pairs.host, a.x.len, a.y.len)?;
        want(op, "y", &a.y, self.compute, 0)?;
        want(op, "x", &a.x, self.compute, 0)?;
        if a.n * a.w == 0 {
            return Ok(());
        }
        let p = CopyRowsParams {
            y: a.y.ptr,
            x: a.x.ptr,
            pairs: a.pairs.dev.ptr,
            n: a.n as i64,
            x_stride: a.x_stride as i64,
            c0: a.c0 as i64,
            w: a.w as i64,
        };
        // SAFETY: every pair names rows inside both views (checked above, on the host copy of
        // the pairs the device holds).
        unsafe { self.launch(DECODE, self.compute, op, stride_launch(a.n * a.w), &p) }
    }

    /// out: `[B, H·Dh]`, qkv: `[B, W]`, cache: `[rows, 2·Hkv·Dh]`, all Compute; spans `[2B]`
    /// (see [`DecodeAttn`]).
    pub(crate) fn decode_attention_impl(&self, a: DecodeAttn<'_, Self>) -> Result<()> {
        let op = "decode_attention";
        let most = a.check(&a.spans.host, [a.out.len, a.qkv.len, a.cache.len])?;
        let d = a.dims;
        want(op, "out", &a.out, self.compute, 0)?;
        want(op, "qkv", &a.qkv, self.compute, 0)?;
        want(op, "cache", &a.cache, self.compute, 0)?;
        let group = d.n_heads / d.n_kv_heads;
        let smem = 4 * group * (d.head_dim + KEYS);
        if d.head_dim > MAX_HEAD_DIM || smem > MAX_SMEM {
            return Err(BackendError::Unsupported(format!(
                "{op}: head_dim {} with {group} query heads per kv head (the kernel takes head \
                 dims up to {MAX_HEAD_DIM} and {MAX_SMEM} bytes of queries and scores)",
                d.head_dim
            )));
        }
        if d.n_seqs * d.n_heads == 0 {
            return Ok(());
        }
        let chunks = most.div_ceil(KEYS).max(1);
        let parts = d.n_seqs * d.n_heads * chunks;
        let part_o = self.scratch(parts * d.head_dim, Dtype::F32)?;
        let part_ml = self.scratch(2 * parts, Dtype::F32)?;
        let p = DecodeParams {
            out: a.out.ptr,
            qkv: a.qkv.ptr,
            cache: a.cache.ptr,
            spans: a.spans.dev.ptr,
            part_o: part_o.ptr,
            part_ml: part_ml.ptr,
            h: d.n_heads as i32,
            hkv: d.n_kv_heads as i32,
            dh: d.head_dim as i32,
            chunks: chunks as i32,
            scale: d.scale,
        };
        let c = self.compute;
        let chunk = Launch {
            grid: (chunks as u32, d.n_kv_heads as u32, d.n_seqs as u32),
            block: THREADS,
            smem: smem as u32,
        };
        let combine = Launch {
            grid: ((d.n_seqs * d.n_heads) as u32, 1, 1),
            block: THREADS,
            smem: 0,
        };
        // SAFETY: the views hold the rows the dims and spans name (checked above); the partial
        // buffers hold B·H·chunks entries, every chunk of every sequence.
        unsafe {
            self.launch(DECODE, c, "decode_attn_chunk", chunk, &p)?;
            self.launch(DECODE, c, "decode_attn_combine", combine, &p)
        }
    }
}
