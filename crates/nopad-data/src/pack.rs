//! Packing: lays out a micro-batch of [`Example`]s as one [`Batch`] under a [`Strategy`].
//!
//! This is the only place that computes `targets` (HF's label shift, done *within* each attention
//! segment), `position_ids` and `cu_seqlens`; nothing downstream re-derives them. Layouts:
//! - `pad`: one row per example, padded to the micro-batch's longest example; one segment per row.
//! - `concat`: the examples as one stream cut into rows of `max_len`; one segment per row, so
//!   attention and the label shift cross examples (the broken baseline, kept for comparison).
//! - `flatten`: one row of the examples, no padding, one segment per example.
//! - `offline`: rows of at most `max_len` tokens filled by best-fit decreasing, one segment per
//!   example; the rows are laid out back to back (the attention is varlen, so a row's unused
//!   capacity costs nothing and is not materialised as padding).

use std::collections::BTreeSet;

use crate::{Batch, BatchStats, Example, Strategy, IGNORE_INDEX};

/// The warning every user of `concat` must see.
pub const CONCAT_WARNING: &str = "strategy `concat` lets attention and the label shift cross \
example boundaries (position ids continue, each example's first token is predicted from the \
previous example): training is NOT equivalent to `pad`; use it only for comparison";

/// How micro-batches are laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackOptions {
    /// The layout.
    pub strategy: Strategy,
    /// Examples per micro-batch for `pad` and `flatten`; rows per micro-batch for `concat` and
    /// `offline`.
    pub batch_size: usize,
    /// Longest example (and row length for `concat` and `offline`).
    pub max_len: usize,
    /// Token id written into padding (never a target).
    pub pad_token_id: i32,
    /// Length-grouped sampling for `pad` (and `flatten`, which keeps `pad`'s examples).
    pub group_by_length: bool,
}

impl PackOptions {
    /// Options with pad id 0 and no length grouping.
    pub fn new(strategy: Strategy, batch_size: usize, max_len: usize) -> Self {
        PackOptions {
            strategy,
            batch_size,
            max_len,
            pad_token_id: 0,
            group_by_length: false,
        }
    }
}

/// Lays out exactly these examples (each already at most `max_len` tokens) as one micro-batch.
///
/// `batch_size` is not consulted: the caller chose the examples. For `offline` they are packed
/// into rows of `max_len` by best-fit decreasing; for `concat` they are one stream cut into rows
/// of `max_len`.
pub fn pack_micro_batch(examples: &[&Example], opts: &PackOptions) -> Batch {
    match opts.strategy {
        Strategy::Pad => pack_pad(examples, opts.pad_token_id),
        Strategy::Flatten => pack_rows(&[examples.to_vec()]),
        Strategy::Offline => {
            let lens: Vec<usize> = examples.iter().map(|e| e.len()).collect();
            let rows: Vec<Vec<&Example>> = best_fit_decreasing(&lens, opts.max_len)
                .into_iter()
                .map(|row| row.into_iter().map(|i| examples[i]).collect())
                .collect();
            pack_rows(&rows)
        }
        Strategy::Concat => {
            let pieces: Vec<Piece<&Example>> = examples
                .iter()
                .map(|&e| Piece {
                    example: e,
                    start: 0,
                    end: e.len(),
                })
                .collect();
            pack_concat(&cut_rows(&pieces, opts.max_len))
        }
    }
}

/// `pad`: one row per example, each padded to the longest; positions 0..M per row.
pub(crate) fn pack_pad(examples: &[&Example], pad_token_id: i32) -> Batch {
    let m = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    let n = m * examples.len();
    let mut b = with_capacity(n);
    for e in examples {
        let len = e.len();
        b.tokens.extend_from_slice(&e.input_ids);
        b.tokens.extend(std::iter::repeat_n(pad_token_id, m - len));
        b.targets
            .extend_from_slice(e.labels.get(1..).unwrap_or(&[]));
        b.targets
            .extend(std::iter::repeat_n(IGNORE_INDEX, m - len.saturating_sub(1)));
        b.position_ids.extend(0..m as i32);
        b.cu_seqlens.push(b.tokens.len() as i32);
        b.stats.real_tokens += len;
        b.stats.pad_tokens += m - len;
        b.stats.sum_len_sq += (m * m) as u64;
    }
    b.stats.examples = examples.len();
    b.stats.rows = examples.len();
    b.max_seqlen = if examples.is_empty() { 0 } else { m };
    finish(b)
}

/// `flatten` (one row) and `offline` (several rows): every example its own segment, positions
/// restarting at 0, the first label of each example dropped by the in-segment shift.
pub(crate) fn pack_rows(rows: &[Vec<&Example>]) -> Batch {
    let n = rows.iter().flatten().map(|e| e.len()).sum();
    let mut b = with_capacity(n);
    for e in rows.iter().flatten() {
        let len = e.len();
        b.tokens.extend_from_slice(&e.input_ids);
        b.targets
            .extend_from_slice(e.labels.get(1..).unwrap_or(&[]));
        if len > 0 {
            b.targets.push(IGNORE_INDEX);
        }
        b.position_ids.extend(0..len as i32);
        b.cu_seqlens.push(b.tokens.len() as i32);
        b.max_seqlen = b.max_seqlen.max(len);
        b.stats.examples += 1;
        b.stats.real_tokens += len;
        b.stats.sum_len_sq += (len * len) as u64;
    }
    // An empty micro-batch (a rank with nothing left at an epoch's end) lays out no row.
    b.stats.rows = rows.iter().filter(|r| !r.is_empty()).count();
    finish(b)
}

/// A contiguous token range `start..end` of one example (whole examples have `0..len`). `E` is
/// how the example is named: `&Example` when packing, its dataset index `u32` when planning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece<E> {
    pub example: E,
    pub start: usize,
    pub end: usize,
}

/// Cuts a stream of pieces into rows of at most `max_len` tokens.
pub(crate) fn cut_rows<E: Copy>(pieces: &[Piece<E>], max_len: usize) -> Vec<Vec<Piece<E>>> {
    let mut rows = vec![];
    let mut row: Vec<Piece<E>> = vec![];
    let mut fill = 0;
    for p in pieces {
        let mut start = p.start;
        while start < p.end {
            let take = (p.end - start).min(max_len - fill);
            row.push(Piece {
                start,
                end: start + take,
                ..*p
            });
            start += take;
            fill += take;
            if fill == max_len {
                rows.push(std::mem::take(&mut row));
                fill = 0;
            }
        }
    }
    if !row.is_empty() {
        rows.push(row);
    }
    rows
}

/// `concat`: each row one segment; the label of an example's first token becomes its token id,
/// so the previous example in the row is trained to predict it (the failure `concat` shows).
pub(crate) fn pack_concat(rows: &[Vec<Piece<&Example>>]) -> Batch {
    let n = rows.iter().flatten().map(|p| p.end - p.start).sum();
    let mut b = with_capacity(n);
    let mut examples = 0;
    for row in rows {
        let row_start = b.tokens.len();
        let mut labels: Vec<i32> = Vec::with_capacity(n);
        for p in row {
            let e = p.example;
            b.tokens.extend_from_slice(&e.input_ids[p.start..p.end]);
            labels.extend_from_slice(&e.labels[p.start..p.end]);
            if p.start == 0 {
                examples += 1;
                let first = labels.len() - (p.end - p.start);
                labels[first] = e.input_ids[0];
            }
        }
        let len = b.tokens.len() - row_start;
        b.targets.extend_from_slice(labels.get(1..).unwrap_or(&[]));
        if len > 0 {
            b.targets.push(IGNORE_INDEX);
        }
        b.position_ids.extend(0..len as i32);
        b.cu_seqlens.push(b.tokens.len() as i32);
        b.max_seqlen = b.max_seqlen.max(len);
        b.stats.real_tokens += len;
        b.stats.sum_len_sq += (len * len) as u64;
    }
    b.stats.examples = examples;
    b.stats.rows = rows.len();
    finish(b)
}

/// Best-fit decreasing: item indices grouped into bins of capacity `cap`, each item going to the
/// fullest bin it fits in. Ties are broken by index, so the result is deterministic. Items longer
/// than `cap` get a bin of their own.
pub(crate) fn best_fit_decreasing(lens: &[usize], cap: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by(|&a, &b| lens[b].cmp(&lens[a]).then(a.cmp(&b)));
    let mut bins: Vec<Vec<usize>> = vec![];
    // (remaining capacity, bin index): the first entry with remaining >= len is the best fit.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let len = lens[i];
        match open.range((len, 0)..).next().copied() {
            Some((rem, bin)) => {
                open.remove(&(rem, bin));
                bins[bin].push(i);
                if rem - len > 0 {
                    open.insert((rem - len, bin));
                }
            }
            None => {
                bins.push(vec![i]);
                if cap > len {
                    open.insert((cap - len, bins.len() - 1));
                }
            }
        }
    }
    bins
}

fn with_capacity(n: usize) -> Batch {
    Batch {
        tokens: Vec::with_capacity(n),
        targets: Vec::with_capacity(n),
        position_ids: Vec::with_capacity(n),
        cu_seqlens: vec![0],
        max_seqlen: 0,
        stats: BatchStats::default(),
    }
}

fn finish(mut b: Batch) -> Batch {
    b.stats.target_tokens = b.targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[i32], labels: &[i32]) -> Example {
        Example {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
        }
    }

    #[test]
    fn flatten_shifts_within_examples_and_restarts_positions() {
        let a = ex(&[10, 11, 12], &[-100, 11, 12]);
        let b = ex(&[20, 21], &[20, 21]);
        let batch = pack_micro_batch(&[&a, &b], &PackOptions::new(Strategy::Flatten, 2, 8));
        batch.validate().unwrap();
        assert_eq!(batch.tokens, [10, 11, 12, 20, 21]);
        assert_eq!(batch.targets, [11, 12, -100, 21, -100]);
        assert_eq!(batch.position_ids, [0, 1, 2, 0, 1]);
        assert_eq!(batch.cu_seqlens, [0, 3, 5]);
        assert_eq!(batch.max_seqlen, 3);
        let s = batch.stats;
        assert_eq!(
            (s.examples, s.rows, s.real_tokens, s.pad_tokens),
            (2, 1, 5, 0)
        );
        assert_eq!((s.target_tokens, s.sum_len_sq), (3, 13));
    }

    #[test]
    fn pad_puts_pads_after_each_example_and_never_trains_them() {
        let a = ex(&[10, 11, 12], &[-100, 11, 12]);
        let b = ex(&[20, 21], &[20, 21]);
        let mut o = PackOptions::new(Strategy::Pad, 2, 8);
        o.pad_token_id = 9;
        let batch = pack_micro_batch(&[&a, &b], &o);
        batch.validate().unwrap();
        assert_eq!(batch.tokens, [10, 11, 12, 20, 21, 9]);
        assert_eq!(batch.targets, [11, 12, -100, 21, -100, -100]);
        assert_eq!(batch.position_ids, [0, 1, 2, 0, 1, 2]);
        assert_eq!(batch.cu_seqlens, [0, 3, 6]);
        let s = batch.stats;
        assert_eq!(
            (s.rows, s.real_tokens, s.pad_tokens, s.target_tokens),
            (2, 5, 1, 3)
        );
        assert_eq!(s.sum_len_sq, 18);
    }

    #[test]
    fn concat_crosses_examples_and_cuts_rows() {
        let a = ex(&[10, 11, 12], &[-100, 11, 12]);
        let b = ex(&[20, 21, 22], &[-100, -100, 22]);
        let batch = pack_micro_batch(&[&a, &b], &PackOptions::new(Strategy::Concat, 1, 4));
        batch.validate().unwrap();
        assert_eq!(batch.tokens, [10, 11, 12, 20, 21, 22]);
        // 12 is trained to predict 20: the broken cross-example shift.
        assert_eq!(batch.targets, [11, 12, 20, -100, 22, -100]);
        assert_eq!(batch.position_ids, [0, 1, 2, 3, 0, 1]);
        assert_eq!(batch.cu_seqlens, [0, 4, 6]);
        assert_eq!((batch.stats.rows, batch.stats.sum_len_sq), (2, 20));
    }

    #[test]
    fn offline_fills_rows_by_best_fit_decreasing() {
        assert_eq!(
            best_fit_decreasing(&[5, 3, 4, 2, 6], 8),
            vec![vec![4, 3], vec![0, 1], vec![2]]
        );
        let es: Vec<Example> = [5usize, 3, 4, 2, 6]
            .iter()
            .map(|&l| ex(&vec![7; l], &vec![7; l]))
            .collect();
        let refs: Vec<&Example> = es.iter().collect();
        let batch = pack_micro_batch(&refs, &PackOptions::new(Strategy::Offline, 1, 8));
        batch.validate().unwrap();
        assert_eq!(batch.stats.rows, 3);
        assert_eq!(batch.n_seqs(), 5);
        assert_eq!(batch.stats.target_tokens, 20 - 5);
    }
}
