//! Launchers of `embedding.cu`: lookup (`x[N, D] = table[tokens]`) and its gradient, accumulated
//! into `d_table` deterministically: the host groups the positions by token, and each distinct
//! token's rows are summed in a fixed order and added once (no atomics, so runs and resumed runs
//! are bitwise reproducible). Token ids are checked against the table on the host copy of
//! `tokens`, so a bad id is an error instead of an out-of-bounds read.

use super::compile::{Launch, EMBEDDING};
use super::{want, Cuda, CudaInts, Dtype};
use crate::args::{EmbeddingBwd, EmbeddingFwd};
use crate::error::check;
use crate::{Device, Result};

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
    n_uniq: i32,
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
    pub(crate) fn embedding_forward_impl(&self, a: EmbeddingFwd<'_, Self>) -> Result<()> {
        let EmbeddingFwd {
            x,
            table,
            tokens,
            n,
            d,
        } = a;
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
            n_uniq: 0,
        };
        let cfg = Launch::per_row(n);
        // SAFETY: shapes checked above; token ids are in range.
        unsafe { self.launch(EMBEDDING, self.compute, "embedding_fwd", cfg, &p) }
    }

    /// d_table: `[V, d]` of the gradient type (accumulated); dx: `[n, d]` Compute.
    pub(crate) fn embedding_backward_impl(&self, a: EmbeddingBwd<'_, Self>) -> Result<()> {
        let EmbeddingBwd {
            d_table,
            dx,
            tokens,
            n,
            d,
        } = a;
        let op = "embedding_backward";
        want(op, "d_table", &d_table, self.grad, d)?;
        want(op, "dx", &dx, self.compute, n * d)?;
        check_tokens(op, tokens, n, d_table.len / d.max(1))?;
        if n == 0 || d == 0 {
            return Ok(());
        }
        let (groups, n_uniq) = token_groups(&tokens.host[..n]);
        let groups = self.ints(&groups)?;
        let p = EmbeddingParams {
            x: dx.ptr,
            table: 0,
            d_table: d_table.ptr,
            tokens: groups.dev.ptr,
            n: n as i32,
            d: d as i32,
            n_uniq: n_uniq as i32,
        };
        let cfg = Launch::blocks(n_uniq, d.div_ceil(256));
        let name = if self.grad == Dtype::Bf16 {
            "embedding_bwd_sorted_g16"
        } else {
            "embedding_bwd_sorted"
        };
        // SAFETY: shapes checked above; token ids are in range; `groups` holds order [n], uniq
        // [n_uniq] and seg [n_uniq + 1] as the kernel reads them.
        unsafe { self.launch(EMBEDDING, self.compute, name, cfg, &p) }
    }
}

/// The backward's grouping of positions by token: `order` (positions sorted by token, stable),
/// then the distinct tokens `uniq`, then `seg` (U + 1 offsets of each token's run in `order`).
fn token_groups(tokens: &[i32]) -> (Vec<i32>, usize) {
    let n = tokens.len();
    let mut order: Vec<i32> = (0..n as i32).collect();
    order.sort_by_key(|&t| tokens[t as usize]);
    let mut uniq = Vec::new();
    let mut seg = Vec::new();
    for (k, &t) in order.iter().enumerate() {
        let id = tokens[t as usize];
        if uniq.last() != Some(&id) {
            uniq.push(id);
            seg.push(k as i32);
        }
    }
    seg.push(n as i32);
    let u = uniq.len();
    order.extend(uniq);
    order.extend(seg);
    (order, u)
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_groups_sort_stably_and_mark_runs() {
        let (g, u) = super::token_groups(&[5, 2, 5, 9, 2, 5]);
        assert_eq!(u, 3);
        assert_eq!(&g[..6], &[1, 4, 0, 2, 5, 3]); // positions of 2, 2, 5, 5, 5, 9
        assert_eq!(&g[6..9], &[2, 5, 9]);
        assert_eq!(&g[9..], &[0, 2, 5, 6]);
    }
}
