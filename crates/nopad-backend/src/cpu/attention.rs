//! Varlen causal grouped-query attention on the CPU, optionally within a sliding window (query i
//! sees keys i − W < j ≤ i of its own sequence, `AttnDims::window`): the reference every GPU
//! kernel is checked against.
//!
//! One task per (sequence, key/value head) gathers that sequence's K and V (and each query head
//! of the group) into dense matrices and does the products with SIMD GEMMs on a `[L, L]`
//! score matrix; tasks run in parallel and write back in a fixed order, so results are
//! deterministic. The backward recomputes the probabilities from the saved log-sum-exp (no
//! `[L, L]` matrix is kept between passes). A window only changes which entries of a row are
//! nonzero (the products stay dense); with every sequence inside the window the arithmetic is
//! that of plain causal attention, bit for bit.

use rayon::prelude::*;

use super::linear::{gemm, Mat, Threads};
use super::{check_len, Cpu, Scalar};
use crate::args::{AttnBwd, AttnFwd};
use crate::error::check;
use crate::{AttnDims, Result};

fn check_dims<T>(op: &'static str, qkv: &[T], cu: &[i32], dims: &AttnDims) -> Result<()> {
    check(
        dims.n_kv_heads > 0 && dims.n_heads.is_multiple_of(dims.n_kv_heads),
        op,
        || {
            format!(
                "{} query heads are not a multiple of {} kv heads",
                dims.n_heads, dims.n_kv_heads
            )
        },
    )?;
    check(cu.len() == dims.n_seqs + 1, op, || {
        format!(
            "cu_seqlens has {} entries for {} sequences",
            cu.len(),
            dims.n_seqs
        )
    })?;
    check(
        cu.first() == Some(&0) && cu.last().map(|&e| e as usize) == Some(dims.n),
        op,
        || {
            format!(
                "cu_seqlens must run from 0 to {} (got {:?}..{:?})",
                dims.n,
                cu.first(),
                cu.last()
            )
        },
    )?;
    for w in cu.windows(2) {
        check(
            w[0] <= w[1] && (w[1] - w[0]) as usize <= dims.max_seqlen,
            op,
            || {
                format!(
                    "segment {}..{} is decreasing or longer than max_seqlen {}",
                    w[0], w[1], dims.max_seqlen
                )
            },
        )?;
    }
    check(dims.window != Some(0), op, || {
        "a sliding window of 0 keys (a query always sees itself: at least 1)".into()
    })?;
    check_len(op, "qkv", qkv.len(), dims.n * dims.qkv_width())
}

/// The first key query `i` of a sequence sees: `i + 1 − W`, or 0 (always 0 without a window).
fn first_key(i: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (i + 1).saturating_sub(w))
}

/// Where the query/key/value vectors of one token and head live in `qkv`.
struct Layout {
    width: usize,
    dh: usize,
    k_off: usize,
    v_off: usize,
}

impl Layout {
    fn new(d: &AttnDims) -> Self {
        Layout {
            width: d.qkv_width(),
            dh: d.head_dim,
            k_off: d.n_heads * d.head_dim,
            v_off: (d.n_heads + d.n_kv_heads) * d.head_dim,
        }
    }
    fn q(&self, t: usize, h: usize) -> usize {
        t * self.width + h * self.dh
    }
    fn k(&self, t: usize, g: usize) -> usize {
        t * self.width + self.k_off + g * self.dh
    }
    fn v(&self, t: usize, g: usize) -> usize {
        t * self.width + self.v_off + g * self.dh
    }
}

fn dot<T: Scalar>(a: &[T], b: &[T]) -> T {
    let mut s = T::ZERO;
    for (&x, &y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// Copies the `[len, dh]` vectors starting at `first(t)` for tokens `s..s+len` into a dense matrix.
fn gather<T: Scalar>(
    src: &[T],
    s: usize,
    len: usize,
    dh: usize,
    at: impl Fn(usize) -> usize,
) -> Vec<T> {
    let mut m = Vec::with_capacity(len * dh);
    for i in 0..len {
        m.extend_from_slice(&src[at(s + i)..][..dh]);
    }
    m
}

/// `p[len, len] = scale · q · kᵀ` (q, k: `[len, dh]`), the raw scores of one head.
fn scores<T: Scalar>(p: &mut [T], q: &[T], k: &[T], len: usize, dh: usize, scale: T) {
    let (qm, kt) = (Mat::rows(q, dh), Mat::transposed(k, dh));
    gemm(len, len, dh, p, len, qm, kt, false, scale, Threads::One);
}

/// Causal probabilities of one (sequence, head) in place: `s: [len, len]` holds scaled scores on
/// entry and `P` (zero above the diagonal and before each row's window) on exit. With `lse`
/// given (backward) P is recomputed from it; otherwise each row's log-sum-exp is written to
/// `lse_out`.
fn probabilities<T: Scalar>(
    s: &mut [T],
    len: usize,
    window: Option<usize>,
    lse: Option<&[T]>,
    lse_out: &mut [T],
) {
    for i in 0..len {
        let row = &mut s[i * len..(i + 1) * len];
        let lo = first_key(i, window);
        let l = match lse {
            Some(l) => l[i],
            None => {
                let m = row[lo..=i].iter().fold(T::neg_infinity(), |a, &b| a.max(b));
                let mut sum = T::ZERO;
                for &x in &row[lo..=i] {
                    sum += (x - m).exp();
                }
                let l = m + sum.ln();
                lse_out[i] = l;
                l
            }
        };
        for x in &mut row[lo..=i] {
            *x = (*x - l).exp();
        }
        row[..lo].fill(T::ZERO);
        row[i + 1..].fill(T::ZERO);
    }
}

fn tasks(cu: &[i32], n_kv_heads: usize) -> Vec<(usize, usize, usize)> {
    let mut v = Vec::new();
    for w in cu.windows(2) {
        if w[1] > w[0] {
            for g in 0..n_kv_heads {
                v.push((w[0] as usize, w[1] as usize, g));
            }
        }
    }
    v
}

pub(crate) fn forward<T: Scalar>(a: AttnFwd<'_, Cpu<T>>) -> Result<()> {
    let AttnFwd {
        out,
        lse,
        qkv,
        cu_seqlens: cu,
        dims,
    } = a;
    const OP: &str = "attention_forward";
    check_dims(OP, qkv, cu, &dims)?;
    let (n, h, dh) = (dims.n, dims.n_heads, dims.head_dim);
    check_len(OP, "out", out.len(), n * h * dh)?;
    check_len(OP, "lse", lse.len(), h * n)?;
    let lay = Layout::new(&dims);
    let group = h / dims.n_kv_heads;
    let scale = T::from_f32(dims.scale);
    let work = tasks(cu, dims.n_kv_heads);
    // Each task returns its heads' outputs `[group][len, dh]` and log-sum-exps `[group][len]`.
    let results: Vec<(Vec<T>, Vec<T>)> = work
        .par_iter()
        .map(|&(s, e, g)| {
            let len = e - s;
            let k = gather(qkv, s, len, dh, |t| lay.k(t, g));
            let v = gather(qkv, s, len, dh, |t| lay.v(t, g));
            let mut o = vec![T::ZERO; group * len * dh];
            let mut l = vec![T::ZERO; group * len];
            let mut p = vec![T::ZERO; len * len];
            for hh in 0..group {
                let q = gather(qkv, s, len, dh, |t| lay.q(t, g * group + hh));
                scores(&mut p, &q, &k, len, dh, scale);
                let lse_h = &mut l[hh * len..(hh + 1) * len];
                probabilities(&mut p, len, dims.window, None, lse_h);
                let oh = &mut o[hh * len * dh..(hh + 1) * len * dh];
                gemm(
                    len,
                    dh,
                    len,
                    oh,
                    dh,
                    Mat::rows(&p, len),
                    Mat::rows(&v, dh),
                    false,
                    T::ONE,
                    Threads::One,
                );
            }
            (o, l)
        })
        .collect();
    for (&(s, e, g), (o, l)) in work.iter().zip(&results) {
        let len = e - s;
        for hh in 0..group {
            let head = g * group + hh;
            for i in 0..len {
                out[(s + i) * h * dh + head * dh..][..dh]
                    .copy_from_slice(&o[(hh * len + i) * dh..][..dh]);
            }
            lse[head * n + s..head * n + e].copy_from_slice(&l[hh * len..(hh + 1) * len]);
        }
    }
    Ok(())
}

pub(crate) fn backward<T: Scalar>(a: AttnBwd<'_, Cpu<T>>) -> Result<()> {
    let AttnBwd {
        d_qkv,
        d_out,
        qkv,
        out,
        lse,
        cu_seqlens: cu,
        dims,
    } = a;
    const OP: &str = "attention_backward";
    check_dims(OP, qkv, cu, &dims)?;
    let (n, h, dh) = (dims.n, dims.n_heads, dims.head_dim);
    check_len(OP, "d_qkv", d_qkv.len(), n * dims.qkv_width())?;
    check_len(OP, "d_out", d_out.len(), n * h * dh)?;
    check_len(OP, "out", out.len(), n * h * dh)?;
    check_len(OP, "lse", lse.len(), h * n)?;
    let lay = Layout::new(&dims);
    let group = h / dims.n_kv_heads;
    let scale = T::from_f32(dims.scale);
    let work = tasks(cu, dims.n_kv_heads);
    // Per task: dq `[group][len, dh]`, dk and dv `[len, dh]` (summed over the group's heads).
    let results: Vec<(Vec<T>, Vec<T>, Vec<T>)> = work
        .par_iter()
        .map(|&(s, e, g)| {
            let len = e - s;
            let k = gather(qkv, s, len, dh, |t| lay.k(t, g));
            let v = gather(qkv, s, len, dh, |t| lay.v(t, g));
            let mut dq = vec![T::ZERO; group * len * dh];
            let mut dk = vec![T::ZERO; len * dh];
            let mut dv = vec![T::ZERO; len * dh];
            let mut p = vec![T::ZERO; len * len];
            let mut dp = vec![T::ZERO; len * len];
            let mut unused = [];
            for hh in 0..group {
                let head = g * group + hh;
                let q = gather(qkv, s, len, dh, |t| lay.q(t, head));
                let dout = gather(d_out, s, len, dh, |t| t * h * dh + head * dh);
                let o = gather(out, s, len, dh, |t| t * h * dh + head * dh);
                scores(&mut p, &q, &k, len, dh, scale);
                probabilities(
                    &mut p,
                    len,
                    dims.window,
                    Some(&lse[head * n + s..head * n + e]),
                    &mut unused,
                );
                // dV += Pᵀ·dO; dP = dO·Vᵀ; dS = P∘(dP − rowsum(dO∘O)).
                gemm(
                    len,
                    dh,
                    len,
                    &mut dv,
                    dh,
                    Mat::transposed(&p, len),
                    Mat::rows(&dout, dh),
                    true,
                    T::ONE,
                    Threads::One,
                );
                gemm(
                    len,
                    len,
                    dh,
                    &mut dp,
                    len,
                    Mat::rows(&dout, dh),
                    Mat::transposed(&v, dh),
                    false,
                    T::ONE,
                    Threads::One,
                );
                for i in 0..len {
                    let di = dot(&dout[i * dh..(i + 1) * dh], &o[i * dh..(i + 1) * dh]);
                    for j in first_key(i, dims.window)..=i {
                        p[i * len + j] *= dp[i * len + j] - di;
                    }
                }
                // p now holds dS (zero outside the window): dQ = s·dS·K, dK += s·dSᵀ·Q.
                let dqh = &mut dq[hh * len * dh..(hh + 1) * len * dh];
                gemm(
                    len,
                    dh,
                    len,
                    dqh,
                    dh,
                    Mat::rows(&p, len),
                    Mat::rows(&k, dh),
                    false,
                    scale,
                    Threads::One,
                );
                gemm(
                    len,
                    dh,
                    len,
                    &mut dk,
                    dh,
                    Mat::transposed(&p, len),
                    Mat::rows(&q, dh),
                    true,
                    scale,
                    Threads::One,
                );
            }
            (dq, dk, dv)
        })
        .collect();
    d_qkv[..n * lay.width].fill(T::ZERO);
    for (&(s, e, g), (dq, dk, dv)) in work.iter().zip(&results) {
        for i in 0..e - s {
            let t = s + i;
            for hh in 0..group {
                d_qkv[lay.q(t, g * group + hh)..][..dh]
                    .copy_from_slice(&dq[(hh * (e - s) + i) * dh..][..dh]);
            }
            d_qkv[lay.k(t, g)..][..dh].copy_from_slice(&dk[i * dh..][..dh]);
            d_qkv[lay.v(t, g)..][..dh].copy_from_slice(&dv[i * dh..][..dh]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The window on packed rows: against nopad-flash's host reference (an independent
    //! implementation: per-row loops over each query's keys), and bit for bit the plain causal
    //! result when no sequence outgrows it. (`cpu/tests.rs` checks windows against a dense masked
    //! softmax and finite differences too.)

    use nopad_flash::reference::{self, Precision};
    use nopad_rng::Rng;

    use super::super::{Cpu, Scalar};
    use crate::prelude::*;

    /// Packed rows of `lens`: `cu_seqlens` and dims with `window`.
    fn batch(lens: &[usize], window: Option<usize>) -> (Vec<i32>, AttnDims) {
        let ends = lens.iter().scan(0i32, |end, &l| {
            *end += l as i32;
            Some(*end)
        });
        let cu: Vec<i32> = std::iter::once(0).chain(ends).collect();
        let dims = AttnDims {
            n: cu[lens.len()] as usize,
            n_seqs: lens.len(),
            max_seqlen: lens.iter().copied().max().unwrap_or(0),
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            scale: 0.35,
            window,
        };
        (cu, dims)
    }

    /// Forward `out`, `lse` and backward `d_qkv` of one call on `Cpu<T>`.
    fn run<T: Scalar>(
        qkv: &[T],
        d_out: &[T],
        cu: &[i32],
        dims: AttnDims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let b = Cpu::<T>::new();
        let (n, h) = (dims.n, dims.n_heads);
        let mut out = vec![T::from_f32(f32::NAN); n * dims.out_width()];
        let mut lse = vec![T::from_f32(f32::NAN); h * n];
        b.attention_forward(AttnFwd {
            out: &mut out,
            lse: &mut lse,
            qkv,
            cu_seqlens: &cu.to_vec(),
            dims,
        })
        .unwrap();
        let mut d_qkv = vec![T::from_f32(f32::NAN); n * dims.qkv_width()];
        b.attention_backward(AttnBwd {
            d_qkv: &mut d_qkv,
            d_out,
            qkv,
            out: &out,
            lse: &lse,
            cu_seqlens: &cu.to_vec(),
            dims,
        })
        .unwrap();
        (out, lse, d_qkv)
    }

    /// Values on a grid of 1/64, exact in f32 and f64.
    fn grid(rng: &mut Rng, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| (rng.normal() * 64.0).round() as f32 / 64.0)
            .collect()
    }

    fn max_rel(got: &[f64], want: &[f32]) -> f64 {
        let scale = want.iter().fold(1e-9f64, |m, &w| m.max((w as f64).abs()));
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g - w as f64).abs() / scale)
            .fold(
                0.0,
                |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
            )
    }

    #[test]
    fn windowed_attention_matches_the_host_reference_on_packed_rows() {
        let lens = [1, 40, 0, 75, 3, 17];
        let mut rng = Rng::new(41);
        for window in [1, 2, 3, 16, 40, 64] {
            let (cu, dims) = batch(&lens, Some(window));
            let qkv = grid(&mut rng, dims.n * dims.qkv_width());
            let d_out = grid(&mut rng, dims.n * dims.out_width());
            let want = reference::attention(&qkv, &d_out, &cu, &dims, Precision::F64);
            let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
            let (out, lse, d_qkv) = run::<f64>(&to64(&qkv), &to64(&d_out), &cu, dims);
            // The reference hands back f32 copies: agreement to f32 rounding.
            for (what, got, want) in [
                ("out", &out, &want.out),
                ("lse", &lse, &want.lse),
                ("d_qkv", &d_qkv, &want.d_qkv),
            ] {
                let e = max_rel(got, want);
                assert!(e < 1e-6, "window {window}: {what} relative error {e:e}");
            }
            // The window matters here: plain causal attention differs.
            let (plain, _, _) = run::<f64>(&to64(&qkv), &to64(&d_out), &cu, batch(&lens, None).1);
            assert!(max_rel(&plain, &want.out) > 1e-3, "window {window}");
        }
    }

    fn window_as_long_as_every_sequence_is_bitwise_causal<T: Scalar>() {
        let lens = [5, 0, 33, 1, 64, 2];
        let mut rng = Rng::new(43);
        let (cu, plain) = batch(&lens, None);
        let qkv: Vec<T> = grid(&mut rng, plain.n * plain.qkv_width())
            .into_iter()
            .map(T::from_f32)
            .collect();
        let d_out: Vec<T> = grid(&mut rng, plain.n * plain.out_width())
            .into_iter()
            .map(T::from_f32)
            .collect();
        let want = run(&qkv, &d_out, &cu, plain);
        for window in [64, 65, 1 << 20] {
            let got = run(&qkv, &d_out, &cu, batch(&lens, Some(window)).1);
            let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<u64>>();
            assert_eq!(bits(&got.0), bits(&want.0), "out, window {window}");
            assert_eq!(bits(&got.1), bits(&want.1), "lse, window {window}");
            assert_eq!(bits(&got.2), bits(&want.2), "d_qkv, window {window}");
        }
    }

    #[test]
    fn a_window_no_sequence_exceeds_gives_the_causal_bits() {
        window_as_long_as_every_sequence_is_bitwise_causal::<f32>();
        window_as_long_as_every_sequence_is_bitwise_causal::<f64>();
    }

    #[test]
    fn a_window_of_zero_keys_is_refused() {
        let (cu, dims) = batch(&[3], Some(0));
        let b = Cpu::<f32>::new();
        let qkv = vec![0.0f32; dims.n * dims.qkv_width()];
        let (mut out, mut lse) = (vec![0.0; dims.n * dims.out_width()], vec![0.0; 4 * dims.n]);
        let err = b
            .attention_forward(AttnFwd {
                out: &mut out,
                lse: &mut lse,
                qkv: &qkv,
                cu_seqlens: &cu,
                dims,
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("sliding window of 0"), "{err}");
    }
}
