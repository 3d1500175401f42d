//! Launchers of `embedding.cu`: lookup (`x[N, D] = table[tokens]`) and its gradient, accumulated
//! into the fp32 `d_table` with atomics. Token ids are checked against the table on the host copy
//! of `tokens`, so a bad id is an error instead of an out-of-bounds read.

use super::compile::{Launch, EMBEDDING};
use super::{want, Cuda, CudaInts, CudaMut, CudaRef, Dtype};
use crate::error::check;
use crate::Result;

/// Mirrors `EmbeddingParams` in embedding.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct EmbeddingParams {
    x: u64,
    table: u64,
    d_table: u64,
    tokens: u64,
    n: i32,
    d: i32,
}

fn check_tokens(op: &'static str, tokens: &CudaInts, n: usize, rows: usize) -> Result<()> {
    check(tokens.host.len() >= n, op, || {
        format!("{} token ids for n = {n}", tokens.host.len())
    })?;
    if let Some((t, &id)) = tokens.host[..n]
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= rows)
    {
        return Err(crate::BackendError::Shape {
            op,
            what: format!("token {t} has id {id}, the table has {rows} rows"),
        });
    }
    Ok(())
}

impl Cuda {
    /// x: `[n, d]` Compute; table: `[V, d]` Compute (V = table.len / d).
    pub(crate) fn embedding_forward_impl(
        &self,
        x: CudaMut<'_>,
        table: CudaRef<'_>,
        tokens: &CudaInts,
        n: usize,
        d: usize,
    ) -> Result<()> {
        let op = "embedding_forward";
        want(op, "x", &x, self.compute, n * d)?;
        want(op, "table", &table, self.compute, d)?;
        check_tokens(op, tokens, n, table.len / d.max(1))?;
        if n == 0 || d == 0 {
            return Ok(());
        }
        let p = EmbeddingParams {
            x: x.ptr,
            table: table.ptr,
            d_table: 0,
            tokens: tokens.dev.ptr,
            n: n as i32,
            d: d as i32,
        };
        let cfg = Launch {
            grid: (n as u32, 1, 1),
            block: 256,
            smem: 0,
        };
        // SAFETY: shapes checked above; token ids are in range.
        unsafe { self.launch(EMBEDDING, self.compute, "embedding_fwd", cfg, &p) }
    }

    /// d_table: `[V, d]` Master (accumulated); dx: `[n, d]` Compute.
    pub(crate) fn embedding_backward_impl(
        &self,
        d_table: CudaMut<'_>,
        dx: CudaRef<'_>,
        tokens: &CudaInts,
        n: usize,
        d: usize,
    ) -> Result<()> {
        let op = "embedding_backward";
        want(op, "d_table", &d_table, Dtype::F32, d)?;
        want(op, "dx", &dx, self.compute, n * d)?;
        check_tokens(op, tokens, n, d_table.len / d.max(1))?;
        if n == 0 || d == 0 {
            return Ok(());
        }
        let p = EmbeddingParams {
            x: dx.ptr,
            table: 0,
            d_table: d_table.ptr,
            tokens: tokens.dev.ptr,
            n: n as i32,
            d: d as i32,
        };
        let cfg = Launch {
            grid: (n as u32, 1, 1),
            block: 256,
            smem: 0,
        };
        // SAFETY: shapes checked above; token ids are in range.
        unsafe { self.launch(EMBEDDING, self.compute, "embedding_bwd", cfg, &p) }
    }
}
