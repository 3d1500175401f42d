//! The arguments of every layer op of [`crate::Ops`], one struct per op: the names, shapes and
//! write rules are written here once, and the trait, the CPU and the CUDA implementations all
//! take the struct. Views are the backend's [`Device::Ref`] / [`Device::Mut`]; a field documented
//! as "Grad" or "Master" is a buffer of that [`crate::Kind`], anything else is Compute.
//!
//! Adding an op: a struct here, a method in [`crate::Ops`], its CPU function, its CUDA launcher
//! (and `.cu` file), and a body in `tests/conformance.rs`.

use crate::{AttnDims, Device, GradWrite, HeadNormDims, LinearDims, RopeDims};

/// Arguments of [`crate::Ops::embedding_forward`]: `x[N, D] = table[tokens[t], :]`.
pub struct EmbeddingFwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, D]`, overwritten.
    pub x: B::Mut<'a>,
    /// `[V, D]`.
    pub table: B::Ref<'a>,
    /// `[N]` token ids, each below V.
    pub tokens: &'a B::Ints,
    /// Tokens N.
    pub n: usize,
    /// Hidden size D.
    pub d: usize,
}

/// Arguments of [`crate::Ops::embedding_backward`]: `d_table[tokens[t], :] += dx[t, :]`.
pub struct EmbeddingBwd<'a, B: Device + ?Sized + 'a> {
    /// `[V, D]` Grad, always accumulated (tied embeddings add to the output head's gradient).
    pub d_table: B::Mut<'a>,
    /// `[N, D]`.
    pub dx: B::Ref<'a>,
    /// `[N]` token ids, each below V.
    pub tokens: &'a B::Ints,
    /// Tokens N.
    pub n: usize,
    /// Hidden size D.
    pub d: usize,
}

/// Arguments of [`crate::Ops::linear_forward`]: `y[N, out] = x[N, in] · w[out, in]ᵀ (+ b[out])`.
pub struct LinearFwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, out]`, overwritten.
    pub y: B::Mut<'a>,
    /// `[N, in]`.
    pub x: B::Ref<'a>,
    /// `[out, in]`.
    pub w: B::Ref<'a>,
    /// `[out]`, or no bias.
    pub b: Option<B::Ref<'a>>,
    /// The GEMM's shape.
    pub dims: LinearDims,
}

/// Arguments of [`crate::Ops::linear_backward`]:
/// `dx (+)= dy · w`, `d_w (+)= dyᵀ · x`, `d_b (+)= Σ_rows dy`.
///
/// Every output is optional. A frozen weight (an adapter's base layer) passes `d_w: None` and
/// `d_b: None`: the weight-gradient GEMM is skipped and only `dx` is computed. An adapter path
/// whose `dx` adds to the base layer's passes `dx_write: Accumulate` (the GEMM with beta = 1),
/// so it needs no temporary buffer.
pub struct LinearBwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, in]`, written as `dx_write` says; None skips the GEMM.
    pub dx: Option<B::Mut<'a>>,
    /// How `dx` is written: `Overwrite` for a layer's own input gradient, `Accumulate` to add
    /// onto one another path wrote.
    pub dx_write: GradWrite,
    /// `[out, in]` Grad, written as `write` says (also when N = 0); None: a frozen weight.
    pub d_w: Option<B::Mut<'a>>,
    /// `[out]` Grad, written as `write` says; None: no bias, or a frozen one.
    pub d_b: Option<B::Mut<'a>>,
    /// `[N, out]`, the output's gradient.
    pub dy: B::Ref<'a>,
    /// `[N, in]`, the forward's input (read only for `d_w`).
    pub x: B::Ref<'a>,
    /// `[out, in]` (read only for `dx`).
    pub w: B::Ref<'a>,
    /// The forward GEMM's shape.
    pub dims: LinearDims,
    /// How the parameter gradients `d_w`, `d_b` are written.
    pub write: GradWrite,
}

/// Arguments of [`crate::Ops::rmsnorm_forward`]: `rstd[t] = 1/√(mean(x[t]²) + eps)`,
/// `y[t] = x[t] · rstd[t] · weight`.
pub struct RmsNormFwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, D]`, overwritten.
    pub y: B::Mut<'a>,
    /// `[N]` Master, overwritten; saved for the backward.
    pub rstd: B::Mut<'a>,
    /// `[N, D]`.
    pub x: B::Ref<'a>,
    /// `[D]`.
    pub weight: B::Ref<'a>,
    /// Rows N.
    pub n: usize,
    /// Row length D.
    pub d: usize,
    /// Added to the mean square.
    pub eps: f32,
}

/// Arguments of [`crate::Ops::add_rmsnorm_forward`]: the residual add fused with the RMSNorm
/// after it, `x += r`, then `y = rmsnorm(x)` with `rstd` saved, exactly as `add_assign`
/// followed by `rmsnorm_forward`.
pub struct AddRmsNormFwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, D]`, overwritten.
    pub y: B::Mut<'a>,
    /// `[N]` Master, overwritten.
    pub rstd: B::Mut<'a>,
    /// `[N, D]`, the residual stream: `x += r` in place.
    pub x: B::Mut<'a>,
    /// `[N, D]`.
    pub r: B::Ref<'a>,
    /// `[D]`.
    pub weight: B::Ref<'a>,
    /// Rows N.
    pub n: usize,
    /// Row length D.
    pub d: usize,
    /// Added to the mean square.
    pub eps: f32,
}

/// Arguments of [`crate::Ops::rmsnorm_backward`]: `dx += ∂L/∂x`,
/// `d_weight (+)= Σ_t dy[t] · x[t] · rstd[t]`.
pub struct RmsNormBwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, D]`, accumulated: the residual stream's gradient arrives from the skip connection
    /// and from the norm.
    pub dx: B::Mut<'a>,
    /// `[D]` Grad, written as `write` says; None: a frozen weight (only `dx` is computed).
    pub d_weight: Option<B::Mut<'a>>,
    /// `[N, D]`.
    pub dy: B::Ref<'a>,
    /// `[N, D]`, the forward's input.
    pub x: B::Ref<'a>,
    /// `[D]`.
    pub weight: B::Ref<'a>,
    /// `[N]` Master, from the forward.
    pub rstd: B::Ref<'a>,
    /// Rows N.
    pub n: usize,
    /// Row length D.
    pub d: usize,
    /// How `d_weight` is written.
    pub write: GradWrite,
}

/// Arguments of [`crate::Ops::head_rmsnorm_forward`]: for every token t and normalised head h
/// (the H query heads, then the Hkv key heads of [`HeadNormDims`]), with `v = qkv[t, h, :]`:
/// `x[t, h, :] = v`, `rstd[t, h] = 1/√(mean(v²) + eps)`, `qkv[t, h, :] = v · rstd[t, h] · w`,
/// where `w` is `weight[0..Dh]` for a query head and `weight[Dh..2·Dh]` for a key head.
pub struct HeadRmsNormFwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, (H + 2·Hkv)·Dh]`: the query and key heads normalised in place, the value heads
    /// untouched.
    pub qkv: B::Mut<'a>,
    /// `[N, H + Hkv, Dh]`, overwritten: the heads before the norm, saved for the backward.
    pub x: B::Mut<'a>,
    /// `[N, H + Hkv]` Master, overwritten; saved for the backward.
    pub rstd: B::Mut<'a>,
    /// `[2·Dh]`: the query heads' weight, then the key heads'.
    pub weight: B::Ref<'a>,
    /// The heads' shape.
    pub dims: HeadNormDims,
    /// Added to the mean square.
    pub eps: f32,
}

/// Arguments of [`crate::Ops::head_rmsnorm_backward`], in place: on entry the query and key
/// heads of `d_qkv` hold the gradient of the norm's output, on return that of its input
/// (`dx = r·w·dy − x·r³·Σ(w·dy·x)/Dh` per head); `d_weight (+)= Σ dy · x · rstd` over every
/// token and query head (first Dh) or key head (last Dh).
pub struct HeadRmsNormBwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, (H + 2·Hkv)·Dh]`: the query and key heads overwritten as above, the value heads
    /// untouched.
    pub d_qkv: B::Mut<'a>,
    /// `[2·Dh]` Grad, written as `write` says; None: frozen weights (only `dx` is computed).
    pub d_weight: Option<B::Mut<'a>>,
    /// `[N, H + Hkv, Dh]`, the forward's saved input.
    pub x: B::Ref<'a>,
    /// `[N, H + Hkv]` Master, from the forward.
    pub rstd: B::Ref<'a>,
    /// `[2·Dh]`.
    pub weight: B::Ref<'a>,
    /// The heads' shape.
    pub dims: HeadNormDims,
    /// How `d_weight` is written.
    pub write: GradWrite,
}

/// Arguments of [`crate::Ops::rope_forward`] and [`crate::Ops::rope_backward`] (in place).
pub struct Rope<'a, B: Device + ?Sized + 'a> {
    /// Rows of `dims.row_stride` elements; the first `dims.n_rot_heads` heads of each rotate.
    pub x: B::Mut<'a>,
    /// `[Dh/2]` Master.
    pub inv_freq: B::Ref<'a>,
    /// `[N]` positions.
    pub positions: &'a B::Ints,
    /// The rotation's shape.
    pub dims: RopeDims,
}

/// Arguments of [`crate::Ops::attention_forward`].
pub struct AttnFwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, H·Dh]`, overwritten.
    pub out: B::Mut<'a>,
    /// `[H, N]` Master, overwritten: natural-log log-sum-exp of the scaled scores, saved for
    /// the backward.
    pub lse: B::Mut<'a>,
    /// `[N, (H + 2·Hkv)·Dh]`, as described in [`AttnDims`].
    pub qkv: B::Ref<'a>,
    /// `[S + 1]` sequence boundaries.
    pub cu_seqlens: &'a B::Ints,
    /// The batch's shape.
    pub dims: AttnDims,
}

/// Arguments of [`crate::Ops::attention_backward`].
pub struct AttnBwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, (H + 2·Hkv)·Dh]`, every element overwritten.
    pub d_qkv: B::Mut<'a>,
    /// `[N, H·Dh]`.
    pub d_out: B::Ref<'a>,
    /// `[N, (H + 2·Hkv)·Dh]`, the forward's input.
    pub qkv: B::Ref<'a>,
    /// `[N, H·Dh]`, the forward's output.
    pub out: B::Ref<'a>,
    /// `[H, N]` Master, from the forward.
    pub lse: B::Ref<'a>,
    /// `[S + 1]` sequence boundaries.
    pub cu_seqlens: &'a B::Ints,
    /// The batch's shape.
    pub dims: AttnDims,
}

/// Arguments of [`crate::Ops::swiglu_forward`]: `a[N, F] = silu(gate) · up`.
pub struct SwigluFwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, F]`, overwritten.
    pub a: B::Mut<'a>,
    /// `[N, 2F]`: gate then up, per row.
    pub gu: B::Ref<'a>,
    /// Rows N.
    pub n: usize,
    /// MLP width F.
    pub f: usize,
}

/// Arguments of [`crate::Ops::swiglu_backward`], in place: the backward is the last reader of
/// `gu`, so its gradient replaces it and no separate `[N, 2F]` buffer is needed.
pub struct SwigluBwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, 2F]`: the forward's input on entry, its gradient `d_gu` on return.
    pub gu: B::Mut<'a>,
    /// `[N, F]`.
    pub d_a: B::Ref<'a>,
    /// Rows N.
    pub n: usize,
    /// MLP width F.
    pub f: usize,
}

/// Arguments of [`crate::Ops::lm_head_loss`]: `logits[t] = x[t] · w[V, D]ᵀ`; for each row with
/// `targets[t] != -100`, `loss += logsumexp(logits[t]) − logits[t][targets[t]]`.
pub struct LmHeadLoss<'a, B: Device + ?Sized + 'a> {
    /// `[1]` Master: the loss sum is added to it.
    pub loss_sum: B::Mut<'a>,
    /// `[N, D]`: `grad_scale · ∂loss_t/∂x[t]`, overwritten (zero for rows without a target);
    /// None in evaluation.
    pub dx: Option<B::Mut<'a>>,
    /// `[V, D]` Grad: `grad_scale · Σ_t ∂loss_t/∂w`, written as `write` says (no row with a
    /// target and `Overwrite` leave it zero); None in evaluation or for a frozen head.
    pub d_w: Option<B::Mut<'a>>,
    /// `[N, D]`.
    pub x: B::Ref<'a>,
    /// `[V, D]`.
    pub w: B::Ref<'a>,
    /// `[N]` target ids, or -100 for no target.
    pub targets: &'a B::Ints,
    /// `n` = N, `d_in` = D, `d_out` = V.
    pub dims: LinearDims,
    /// 1 / (target tokens of the whole optimizer step), which makes the loss token-weighted
    /// across micro-batches.
    pub grad_scale: f32,
    /// How `d_w` is written.
    pub write: GradWrite,
}

/// The column block a low-rank adapter owns in a fused projection's output `[N, stride]`:
/// columns `c0..c0 + out` (q, k or v of `qkv`; gate or up of `gu`; all of `o_proj`'s or
/// `down_proj`'s), and the adapter's own product `[N, in] → [N, out]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnBlock {
    /// Rows N.
    pub n: usize,
    /// The wide rows' length.
    pub stride: usize,
    /// The block's first column.
    pub c0: usize,
    /// The product's input width `in`.
    pub d_in: usize,
    /// The block's width `out`.
    pub d_out: usize,
}

impl ColumnBlock {
    /// `(n, stride, c0, d_in, d_out)`.
    pub(crate) fn dims(&self) -> (usize, usize, usize, usize, usize) {
        (self.n, self.stride, self.c0, self.d_in, self.d_out)
    }

    /// Checks that the block lies inside the row; returns the lengths of the wide rows
    /// (`N·stride`), the narrow input (`N·in`) and the weight (`out·in`).
    pub(crate) fn lens(&self, op: &'static str) -> crate::Result<(usize, usize, usize)> {
        let (n, stride, c0, d_in, d_out) = self.dims();
        crate::error::check(c0 + d_out <= stride, op, || {
            format!(
                "columns {c0}..{} exceed the row length {stride}",
                c0 + d_out
            )
        })?;
        Ok((n * stride, n * d_in, d_out * d_in))
    }
}

/// Arguments of [`crate::Ops::columns_linear_forward`]: `y[:, c0..c0 + out] += s · x · wᵀ`, an
/// adapter's scaled up-projection added straight into its columns of the fused output (one GEMM
/// accumulating into the strided block: no `[N, out]` temporary and no separate add).
pub struct ColumnsLinearFwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, stride]`: columns `c0..c0 + out` accumulated into, the others untouched.
    pub y: B::Mut<'a>,
    /// `[N, in]`.
    pub x: B::Ref<'a>,
    /// `[out, in]`.
    pub w: B::Ref<'a>,
    /// Where the block lies and the product's shape.
    pub block: ColumnBlock,
    /// Scale s.
    pub s: f32,
}

/// Arguments of [`crate::Ops::columns_linear_backward`], the backward of
/// [`ColumnsLinearFwd`]: with `dt = s · dy[:, c0..c0 + out]` (read in place, never gathered),
/// `dx = dt · w` (overwritten) and `d_w (+)= dtᵀ · x` (as `write` says).
pub struct ColumnsLinearBwd<'a, B: Device + ?Sized + 'a> {
    /// `[N, in]` Compute, overwritten.
    pub dx: B::Mut<'a>,
    /// `[out, in]` Grad, written as `write` says.
    pub d_w: B::Mut<'a>,
    /// `[N, stride]`: the fused output's gradient.
    pub dy: B::Ref<'a>,
    /// `[N, in]`: the forward's input.
    pub x: B::Ref<'a>,
    /// `[out, in]`.
    pub w: B::Ref<'a>,
    /// Where the block lies and the product's shape.
    pub block: ColumnBlock,
    /// Scale s.
    pub s: f32,
    /// How `d_w` is written.
    pub write: GradWrite,
}

/// Arguments of [`crate::Ops::dropout`]: `y[i] (+)= keep(seed, i) ? x[i] / (1 − p) : 0` for
/// `i < n`. The mask is a counter-based hash of `(seed, i)` ([`crate::dropout_keep`]), identical
/// on every backend, so the backward regenerates it from the seed instead of saving it.
pub struct Dropout<'a, B: Device + ?Sized + 'a> {
    /// `[n]`, written as `write` says (the backward adds the masked gradient into `dx`).
    pub y: B::Mut<'a>,
    /// `[n]`.
    pub x: B::Ref<'a>,
    /// Elements n.
    pub n: usize,
    /// Drop probability p, in `[0, 1)`.
    pub p: f32,
    /// The mask's seed (one per step, layer and module).
    pub seed: u64,
    /// `Overwrite` in the forward, `Accumulate` in the backward.
    pub write: GradWrite,
}

/// Arguments of [`crate::Ops::dequant_nf4`]: `y[i] = NF4[code i] · scale of i's block` for
/// `i < n`, an NF4 matrix with double-quantised scales read into Compute values (the format:
/// [`crate::nf4`]).
pub struct DequantNf4<'a, B: Device + ?Sized + 'a> {
    /// `[n]`, overwritten.
    pub y: B::Mut<'a>,
    /// `[⌈n/2⌉]` Code8: two 4-bit codes a byte, the first element in the high nibble.
    pub codes: B::Ref<'a>,
    /// `[⌈n/64⌉]` Code8: each block scale's 8-bit code.
    pub scale_codes: B::Ref<'a>,
    /// `[⌈n/64/256⌉ + 1]` Master: the absmax of each 256 block scales, then their mean.
    pub absmax: B::Ref<'a>,
    /// Elements n.
    pub n: usize,
}

// ---- generation: the KV cache's append and the one-query attention over it -----------------

/// Arguments of [`crate::Ops::copy_rows`]: `y[pairs[2t + 1], 0..w] = x[pairs[2t], c0..c0 + w]`
/// for `t < n`: rows of `x` (or a run of their columns) copied to chosen rows of `y`, whose
/// rows are `w` long. Appending each new token's keys and values to its sequence's rows of a
/// KV cache (`x` = the `qkv` rows, `c0 = H·Dh`, `w = 2·Hkv·Dh`), and gathering the last row of
/// each prompt (`c0 = 0`, `w` = the row length).
pub struct CopyRows<'a, B: Device + ?Sized + 'a> {
    /// `[rows, w]`: the destination rows written, the others untouched.
    pub y: B::Mut<'a>,
    /// `[rows, x_stride]`.
    pub x: B::Ref<'a>,
    /// `[2·n]` (source row of `x`, destination row of `y`) pairs; the destinations distinct.
    pub pairs: &'a B::Ints,
    /// Rows copied n.
    pub n: usize,
    /// Elements between the starts of consecutive rows of `x`.
    pub x_stride: usize,
    /// The first column of `x` copied.
    pub c0: usize,
    /// Columns copied w: the row length of `y`.
    pub w: usize,
}

impl<B: Device + ?Sized> CopyRows<'_, B> {
    /// Checks the pairs (`pairs` as the host knows them) against the views' lengths: every
    /// source row inside `x`, every destination row inside `y` and no destination twice.
    pub(crate) fn check(&self, pairs: &[i32], x_len: usize, y_len: usize) -> crate::Result<()> {
        const OP: &str = "copy_rows";
        let (n, xs, c0, w) = (self.n, self.x_stride, self.c0, self.w);
        crate::error::check(c0 + w <= xs || n == 0, OP, || {
            format!("columns {c0}..{} exceed the source rows of {xs}", c0 + w)
        })?;
        crate::error::check(pairs.len() >= 2 * n, OP, || {
            format!("{} pair entries for {n} rows", pairs.len())
        })?;
        let (x_rows, y_rows) = (x_len / xs.max(1), y_len / w.max(1));
        let mut seen = std::collections::HashSet::with_capacity(n);
        for (t, p) in pairs[..2 * n].chunks(2).enumerate() {
            let (src, dst) = (p[0], p[1]);
            crate::error::check(
                src >= 0 && (src as usize) < x_rows && dst >= 0 && (dst as usize) < y_rows,
                OP,
                || {
                    format!("pair {t} ({src} -> {dst}) is outside {x_rows} source and {y_rows} destination rows")
                },
            )?;
            crate::error::check(seen.insert(dst), OP, || {
                format!("pair {t} writes destination row {dst} a second time")
            })?;
        }
        Ok(())
    }
}

/// Shape of [`crate::Ops::decode_attention`]: one query row per sequence against that
/// sequence's cached keys and values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeDims {
    /// Sequences B (one query row each).
    pub n_seqs: usize,
    /// Query heads H.
    pub n_heads: usize,
    /// Key/value heads Hkv (dividing H; query head h reads kv head h / (H / Hkv)).
    pub n_kv_heads: usize,
    /// Head dimension Dh.
    pub head_dim: usize,
    /// The softmax scale (1/√Dh, or YaRN's).
    pub scale: f32,
}

impl DecodeDims {
    /// Elements of one `qkv` row: `(H + 2·Hkv)·Dh`.
    pub fn qkv_width(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }
    /// Elements of one cache row, a token's keys then its values: `2·Hkv·Dh`.
    pub fn cache_width(&self) -> usize {
        2 * self.n_kv_heads * self.head_dim
    }
    /// Elements of one output row: `H·Dh`.
    pub fn out_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
}

/// Arguments of [`crate::Ops::decode_attention`]: for each sequence b and query head h,
/// `out[b, h] = Σ_j softmax_j(scale · q[b, h] · k_j) · v_j` over the keys and values of
/// cache rows `spans[2b] .. spans[2b] + spans[2b + 1]` (the whole of what sequence b has
/// seen, its new token included: decoding is causal by construction), kv head h / (H / Hkv).
/// A sequence with no key gets zeros.
pub struct DecodeAttn<'a, B: Device + ?Sized + 'a> {
    /// `[B, H·Dh]`, overwritten.
    pub out: B::Mut<'a>,
    /// `[B, (H + 2·Hkv)·Dh]`: the queries are the first `H·Dh` columns of each row (keys and
    /// values are read from the cache, where [`crate::Ops::copy_rows`] put them).
    pub qkv: B::Ref<'a>,
    /// `[rows, 2·Hkv·Dh]`: each row one token's keys, then its values.
    pub cache: B::Ref<'a>,
    /// `[2·B]`: sequence b's first cache row and its number of keys.
    pub spans: &'a B::Ints,
    /// The shape.
    pub dims: DecodeDims,
}

impl<B: Device + ?Sized> DecodeAttn<'_, B> {
    /// Checks the shape and the spans (as the host knows them) against the views' lengths;
    /// returns the most keys of any sequence.
    pub(crate) fn check(&self, spans: &[i32], lens: [usize; 3]) -> crate::Result<usize> {
        const OP: &str = "decode_attention";
        let d = &self.dims;
        let [out_len, qkv_len, cache_len] = lens;
        crate::error::check(
            d.n_kv_heads > 0 && d.n_heads.is_multiple_of(d.n_kv_heads) && d.head_dim > 0,
            OP,
            || {
                format!(
                    "{} query heads, {} kv heads of {} dims (heads must be a multiple of kv heads)",
                    d.n_heads, d.n_kv_heads, d.head_dim
                )
            },
        )?;
        let b = d.n_seqs;
        for (what, have, need) in [
            ("out", out_len, b * d.out_width()),
            ("qkv", qkv_len, b * d.qkv_width()),
            ("spans", spans.len(), 2 * b),
        ] {
            crate::error::check(have >= need, OP, || {
                format!("{what} has {have} elements, needs {need}")
            })?;
        }
        let rows = cache_len / d.cache_width();
        let mut most = 0;
        for (s, span) in spans[..2 * b].chunks(2).enumerate() {
            let (first, len) = (span[0], span[1]);
            let inside = first >= 0 && len >= 0 && (first as usize + len as usize) <= rows;
            crate::error::check(inside, OP, || {
                format!("sequence {s}: rows {first}..{first}+{len} outside a cache of {rows} rows")
            })?;
            most = most.max(len as usize);
        }
        Ok(most)
    }
}
