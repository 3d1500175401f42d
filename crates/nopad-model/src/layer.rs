//! One decoder layer's explicit forward and backward, written against [`Backend`]. The model
//! calls these for every layer; with activation recomputation (`Model::set_recompute`) the
//! backward first re-runs a layer's forward from its saved input residual stream.
//!
//! Legend: N tokens, D hidden, H/Hkv heads, Dh head dim, W = (H + 2·Hkv)·Dh, F MLP width.
//!
//! Just over 600 lines: the forward and the backward are read side by side, as in `model.rs`.

use nopad_backend::args::{
    AddRmsNormFwd, AttnBwd, AttnFwd, HeadRmsNormBwd, HeadRmsNormFwd, LinearBwd, LinearFwd,
    RmsNormBwd, RmsNormFwd, Rope, SwigluBwd, SwigluFwd,
};
use nopad_backend::{AttnDims, Backend, GradWrite, HeadNormDims, LinearDims, RopeDims};

use crate::config::Config;
use crate::error::Result;
use crate::layout::LayerRanges;
use crate::lora::apply::{base_weight, Site};
use crate::lora::LayerPass;
use crate::profile::Profile;

/// What every layer of one pass shares: the backend, the config, the parameters and the batch.
pub(crate) struct Ctx<'a, B: Backend> {
    pub b: &'a B,
    pub c: &'a Config,
    /// `[P]` parameters.
    pub p: &'a B::Buf,
    /// `[Dh/2]` RoPE inverse frequencies.
    pub inv_freq: &'a B::Buf,
    /// `[N]` positions.
    pub positions: &'a B::Ints,
    /// `[S + 1]` segment boundaries.
    pub cu_seqlens: &'a B::Ints,
    /// Attention shape of the batch.
    pub attn: AttnDims,
    /// Tokens N.
    pub n: usize,
    /// `Recompute::Mlp` in this layer: the gate/up projections live in `Scratch::gu`, not in
    /// `LayerActs::gu`, and the backward recomputes them.
    pub mlp_recompute: bool,
    /// How the backward writes parameter gradients (overwrite in a step's first micro-batch).
    pub grad_write: GradWrite,
}

/// Saved activations of one layer, each `[cap, ·]`.
///
/// The norm outputs and the SwiGLU output are not kept: the backward recomputes them from the
/// residual streams, the saved `rstd` and `gu` (cheap, memory-bound kernels), which saves
/// `2·D + F` values per token and layer, a third of the activation memory.
pub struct LayerActs<B: Backend> {
    /// `[N]` input_layernorm's reciprocal RMS.
    pub rstd1: B::Buf,
    /// `[N, W]` q, k (rotated) and v.
    pub qkv: B::Buf,
    /// `[N, H·Dh]` attention output.
    pub att: B::Buf,
    /// `[H, N]` attention log-sum-exp.
    pub lse: B::Buf,
    /// `[N, D]` residual stream after attention.
    pub res_mid: B::Buf,
    /// `[N]` post_attention_layernorm's reciprocal RMS.
    pub rstd2: B::Buf,
    /// `[N, 2F]` gate and up projections (empty under `Recompute::Mlp`); the backward
    /// overwrites them with their gradient.
    pub gu: B::Buf,
    /// What the q/k norms' backward reads, in a model that has them.
    pub qk_norm: Option<QkNormActs<B>>,
}

/// The saved activations of the per-head norms of the query and key heads (Qwen3's `q_norm`,
/// `k_norm`), `Hn = H + Hkv` heads a token.
pub struct QkNormActs<B: Backend> {
    /// `[N, Hn, Dh]` the heads before the norm.
    pub x: B::Buf,
    /// `[N, Hn]` their reciprocal RMS.
    pub rstd: B::Buf,
}

/// Buffers every layer reuses, `[cap, ·]`.
pub struct Scratch<B: Backend> {
    /// `[N, D]` a norm output (forward) or its recomputation (backward).
    pub h: B::Buf,
    /// `[N, F]` a SwiGLU output, likewise.
    pub a: B::Buf,
    /// `[N]` reciprocal RMS written by recomputations (equal to the saved one).
    pub rstd_tmp: B::Buf,
    /// `[N, D]` gradient of the residual stream (accumulates through a layer).
    pub d_res: B::Buf,
    /// `[N, D]` gradient of a norm output.
    pub d_h: B::Buf,
    /// `[N, W]`.
    pub d_qkv: B::Buf,
    /// `[N, H·Dh]`.
    pub d_att: B::Buf,
    /// `[N, F]`.
    pub d_a: B::Buf,
    /// `[N, 2F]` gate and up projections under `Recompute::Mlp` (else empty).
    pub gu: B::Buf,
}

/// RoPE over the query and key heads at the start of each `qkv` row.
fn rope_dims(c: &Config, n: usize) -> RopeDims {
    RopeDims {
        n,
        row_stride: c.qkv_width(),
        n_rot_heads: c.num_attention_heads + c.num_key_value_heads,
        head_dim: c.head_dim,
    }
}

/// The query and key heads the q/k norms normalise, at the start of each `qkv` row.
fn head_norm_dims(c: &Config, n: usize) -> HeadNormDims {
    HeadNormDims {
        n,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    }
}

fn dims(c: &Config) -> (usize, usize, usize, usize, f32) {
    let hd = c.num_attention_heads * c.head_dim;
    (
        c.hidden_size,
        c.intermediate_size,
        c.qkv_width(),
        hd,
        c.rms_norm_eps as f32,
    )
}

/// How a layer's forward attends: `None`, the varlen causal attention within each segment of
/// `Ctx::cu_seqlens` (training, evaluation, a generation's prefill); `Some(f)`, `f(la)` writes
/// `la.att` from the rotated `la.qkv` (a generation step's attention over its KV cache).
pub(crate) type Attention<'f, B> = Option<&'f mut dyn FnMut(&mut LayerActs<B>) -> Result<()>>;

/// Layer forward: `res_out = layer(res_in)`, saving what the backward needs in `la`. With
/// `res_out = None` (recomputation) it stops once `la` is complete (after the gate/up GEMM).
/// `lora`: the layer's adapters, added after each base projection they target.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<B: Backend>(
    cx: &Ctx<'_, B>,
    lr: &LayerRanges,
    la: &mut LayerActs<B>,
    acts: &mut Scratch<B>,
    res_in: &B::Buf,
    res_out: Option<&mut B::Buf>,
    mut lora: Option<&mut LayerPass<'_, B>>,
    attention: Attention<'_, B>,
    prof: &mut Profile,
) -> Result<()> {
    let (b, c, p, n) = (cx.b, cx.c, cx.p, cx.n);
    let (d, f, w, hd, eps) = dims(c);
    let nd = 0..n * d;
    // Attention block.
    b.rmsnorm_forward(RmsNormFwd {
        y: b.view_mut(&mut acts.h, nd.clone()),
        rstd: b.view_mut(&mut la.rstd1, 0..n),
        x: b.view(res_in, nd.clone()),
        weight: b.view(p, lr.ln1.clone()),
        n,
        d,
        eps,
    })?;
    prof.mark(b, "rmsnorm fwd")?;
    b.linear_forward(LinearFwd {
        y: b.view_mut(&mut la.qkv, 0..n * w),
        x: b.view(&acts.h, nd.clone()),
        w: base_weight(b, p, lr.qkv_w.clone(), lora.as_deref_mut(), Site::Qkv)?,
        b: lr.qkv_b.clone().map(|r| b.view(p, r)),
        dims: LinearDims {
            n,
            d_in: d,
            d_out: w,
        },
    })?;
    prof.mark(b, "qkv_proj fwd")?;
    adapt(&mut lora, b, Site::Qkv, &acts.h, &mut la.qkv, n, prof)?;
    if let (Some(qk), Some(wr)) = (la.qk_norm.as_mut(), lr.qk_norm.clone()) {
        // q_norm/k_norm, on the projections (with bias and adapters) before RoPE.
        let hn = c.num_attention_heads + c.num_key_value_heads;
        b.head_rmsnorm_forward(HeadRmsNormFwd {
            qkv: b.view_mut(&mut la.qkv, 0..n * w),
            x: b.view_mut(&mut qk.x, 0..n * hn * c.head_dim),
            rstd: b.view_mut(&mut qk.rstd, 0..n * hn),
            weight: b.view(p, wr),
            dims: head_norm_dims(c, n),
            eps,
        })?;
        prof.mark(b, "qk_norm fwd")?;
    }
    let rope = rope_dims(c, n);
    b.rope_forward(Rope {
        x: b.view_mut(&mut la.qkv, 0..n * w),
        inv_freq: b.view(cx.inv_freq, 0..c.head_dim / 2),
        positions: cx.positions,
        dims: rope,
    })?;
    prof.mark(b, "rope fwd")?;
    match attention {
        None => b.attention_forward(AttnFwd {
            out: b.view_mut(&mut la.att, 0..n * hd),
            lse: b.view_mut(&mut la.lse, 0..n * c.num_attention_heads),
            qkv: b.view(&la.qkv, 0..n * w),
            cu_seqlens: cx.cu_seqlens,
            dims: cx.attn,
        })?,
        Some(f) => f(la)?,
    }
    prof.mark(b, "attention fwd")?;
    b.linear_forward(LinearFwd {
        y: b.view_mut(&mut la.res_mid, nd.clone()),
        x: b.view(&la.att, 0..n * hd),
        w: base_weight(b, p, lr.o_w.clone(), lora.as_deref_mut(), Site::O)?,
        b: lr.o_b.clone().map(|r| b.view(p, r)),
        dims: LinearDims {
            n,
            d_in: hd,
            d_out: d,
        },
    })?;
    prof.mark(b, "o_proj fwd")?;
    adapt(&mut lora, b, Site::O, &la.att, &mut la.res_mid, n, prof)?;
    // res_mid = res_in + attention block; MLP block: h2 = post_attention_layernorm(res_mid).
    b.add_rmsnorm_forward(AddRmsNormFwd {
        y: b.view_mut(&mut acts.h, nd.clone()),
        rstd: b.view_mut(&mut la.rstd2, 0..n),
        x: b.view_mut(&mut la.res_mid, nd.clone()),
        r: b.view(res_in, nd.clone()),
        weight: b.view(p, lr.ln2.clone()),
        n,
        d,
        eps,
    })?;
    prof.mark(b, "residual_add+rmsnorm fwd")?;
    let gu = if cx.mlp_recompute {
        &mut acts.gu
    } else {
        &mut la.gu
    };
    b.linear_forward(LinearFwd {
        y: b.view_mut(gu, 0..n * 2 * f),
        x: b.view(&acts.h, nd.clone()),
        w: base_weight(
            b,
            p,
            lr.gate_up_w.clone(),
            lora.as_deref_mut(),
            Site::GateUp,
        )?,
        b: None,
        dims: LinearDims {
            n,
            d_in: d,
            d_out: 2 * f,
        },
    })?;
    prof.mark(b, "gate_up_proj fwd")?;
    adapt(&mut lora, b, Site::GateUp, &acts.h, gu, n, prof)?;
    // The rest of the MLP is skipped when recomputing for the backward.
    let Some(res_out) = res_out else {
        return Ok(());
    };
    let gu = if cx.mlp_recompute { &acts.gu } else { &la.gu };
    b.swiglu_forward(SwigluFwd {
        a: b.view_mut(&mut acts.a, 0..n * f),
        gu: b.view(gu, 0..n * 2 * f),
        n,
        f,
    })?;
    prof.mark(b, "swiglu fwd")?;
    b.linear_forward(LinearFwd {
        y: b.view_mut(res_out, nd.clone()),
        x: b.view(&acts.a, 0..n * f),
        w: base_weight(b, p, lr.down_w.clone(), lora.as_deref_mut(), Site::Down)?,
        b: None,
        dims: LinearDims {
            n,
            d_in: f,
            d_out: d,
        },
    })?;
    prof.mark(b, "down_proj fwd")?;
    adapt(&mut lora, b, Site::Down, &acts.a, res_out, n, prof)?;
    b.add_assign(
        b.view_mut(res_out, nd.clone()),
        b.view(&la.res_mid, nd.clone()),
        n * d,
    )?;
    prof.mark(b, "residual_add fwd")?;
    Ok(())
}

/// `acts.h` = h2 = post_attention_layernorm(res_mid), recomputed from the saved residual stream.
fn recompute_h2<B: Backend>(
    cx: &Ctx<'_, B>,
    lr: &LayerRanges,
    la: &LayerActs<B>,
    acts: &mut Scratch<B>,
) -> Result<()> {
    let (b, n) = (cx.b, cx.n);
    let (d, _, _, _, eps) = dims(cx.c);
    b.rmsnorm_forward(RmsNormFwd {
        y: b.view_mut(&mut acts.h, 0..n * d),
        rstd: b.view_mut(&mut acts.rstd_tmp, 0..n),
        x: b.view(&la.res_mid, 0..n * d),
        weight: b.view(cx.p, lr.ln2.clone()),
        n,
        d,
        eps,
    })?;
    Ok(())
}

/// Layer backward: on entry `acts.d_res` = ∂loss/∂res_out, on exit ∂loss/∂res_in; parameter
/// gradients accumulate into `base = (g, gr)` at `gr`: the layer's ranges in the gradient
/// buffer, which are `lr` (the parameters' ranges) for a gradient buffer shaped like the
/// parameters, or ranges of a one-group scratch when the optimizer runs in the backward.
/// `base = None`: the base weights are frozen and only input gradients flow through them;
/// `lora = (adapters, their gradient buffer)` adds the adapters' share.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<B: Backend>(
    cx: &Ctx<'_, B>,
    lr: &LayerRanges,
    la: &mut LayerActs<B>,
    acts: &mut Scratch<B>,
    mut base: Option<(&mut B::Buf, &LayerRanges)>,
    mut lora: Option<(&mut LayerPass<'_, B>, &mut B::Buf)>,
    res_in: &B::Buf,
    prof: &mut Profile,
) -> Result<()> {
    let (b, c, p, n) = (cx.b, cx.c, cx.p, cx.n);
    let (d, f, w, hd, eps) = dims(c);
    let nd = 0..n * d;
    // d_res = ∂loss/∂res[l+1]. MLP block: res[l+1] = res_mid + a·down_wᵀ, with a
    // recomputed from the saved gate/up projections (themselves recomputed under
    // Recompute::Mlp, from h2 = post_attention_layernorm(res_mid)).
    if cx.mlp_recompute {
        recompute_h2(cx, lr, la, acts)?;
        b.linear_forward(LinearFwd {
            y: b.view_mut(&mut acts.gu, 0..n * 2 * f),
            x: b.view(&acts.h, nd.clone()),
            w: base_weight(b, p, lr.gate_up_w.clone(), pass_of(&mut lora), Site::GateUp)?,
            b: None,
            dims: LinearDims {
                n,
                d_in: d,
                d_out: 2 * f,
            },
        })?;
        let lora_fwd = &mut lora.as_mut().map(|(lp, _)| &mut **lp);
        adapt(lora_fwd, b, Site::GateUp, &acts.h, &mut acts.gu, n, prof)?;
    }
    let gu = if cx.mlp_recompute { &acts.gu } else { &la.gu };
    b.swiglu_forward(SwigluFwd {
        a: b.view_mut(&mut acts.a, 0..n * f),
        gu: b.view(gu, 0..n * 2 * f),
        n,
        f,
    })?;
    prof.mark(b, "recompute bwd")?;
    b.linear_backward(LinearBwd {
        dx: Some(b.view_mut(&mut acts.d_a, 0..n * f)),
        dx_write: GradWrite::Overwrite,
        d_w: base
            .as_mut()
            .map(|(g, gr)| b.view_mut(g, gr.down_w.clone())),
        d_b: None,
        dy: b.view(&acts.d_res, nd.clone()),
        x: b.view(&acts.a, 0..n * f),
        w: base_weight(b, p, lr.down_w.clone(), pass_of(&mut lora), Site::Down)?,
        dims: LinearDims {
            n,
            d_in: f,
            d_out: d,
        },
        write: cx.grad_write,
    })?;
    prof.mark(b, "down_proj bwd")?;
    let (dy, x) = (&acts.d_res, &acts.a);
    adapt_bwd(&mut lora, cx, Site::Down, dy, x, &mut acts.d_a, prof)?;
    // In place: the gate/up projections become their gradient.
    let d_gu = if cx.mlp_recompute {
        &mut acts.gu
    } else {
        &mut la.gu
    };
    b.swiglu_backward(SwigluBwd {
        gu: b.view_mut(d_gu, 0..n * 2 * f),
        d_a: b.view(&acts.d_a, 0..n * f),
        n,
        f,
    })?;
    prof.mark(b, "swiglu bwd")?;
    if !cx.mlp_recompute {
        recompute_h2(cx, lr, la, acts)?;
        prof.mark(b, "recompute bwd")?;
    }
    b.linear_backward(LinearBwd {
        dx: Some(b.view_mut(&mut acts.d_h, nd.clone())),
        dx_write: GradWrite::Overwrite,
        d_w: base
            .as_mut()
            .map(|(g, gr)| b.view_mut(g, gr.gate_up_w.clone())),
        d_b: None,
        dy: b.view(
            if cx.mlp_recompute { &acts.gu } else { &la.gu },
            0..n * 2 * f,
        ),
        x: b.view(&acts.h, nd.clone()),
        w: base_weight(b, p, lr.gate_up_w.clone(), pass_of(&mut lora), Site::GateUp)?,
        dims: LinearDims {
            n,
            d_in: d,
            d_out: 2 * f,
        },
        write: cx.grad_write,
    })?;
    prof.mark(b, "gate_up_proj bwd")?;
    let d_gu = if cx.mlp_recompute { &acts.gu } else { &la.gu };
    adapt_bwd(
        &mut lora,
        cx,
        Site::GateUp,
        d_gu,
        &acts.h,
        &mut acts.d_h,
        prof,
    )?;
    b.rmsnorm_backward(RmsNormBwd {
        dx: b.view_mut(&mut acts.d_res, nd.clone()),
        d_weight: base.as_mut().map(|(g, gr)| b.view_mut(g, gr.ln2.clone())),
        dy: b.view(&acts.d_h, nd.clone()),
        x: b.view(&la.res_mid, nd.clone()),
        weight: b.view(p, lr.ln2.clone()),
        rstd: b.view(&la.rstd2, 0..n),
        n,
        d,
        write: cx.grad_write,
    })?;
    prof.mark(b, "rmsnorm bwd")?;
    // d_res = ∂loss/∂res_mid. Attention block: res_mid = res[l] + att·o_wᵀ.
    let (dw, db) = split_weight_bias(b, &mut base, |gr| (&gr.o_w, &gr.o_b));
    b.linear_backward(LinearBwd {
        dx: Some(b.view_mut(&mut acts.d_att, 0..n * hd)),
        dx_write: GradWrite::Overwrite,
        d_w: dw,
        d_b: db,
        dy: b.view(&acts.d_res, nd.clone()),
        x: b.view(&la.att, 0..n * hd),
        w: base_weight(b, p, lr.o_w.clone(), pass_of(&mut lora), Site::O)?,
        dims: LinearDims {
            n,
            d_in: hd,
            d_out: d,
        },
        write: cx.grad_write,
    })?;
    prof.mark(b, "o_proj bwd")?;
    adapt_bwd(
        &mut lora,
        cx,
        Site::O,
        &acts.d_res,
        &la.att,
        &mut acts.d_att,
        prof,
    )?;
    b.attention_backward(AttnBwd {
        d_qkv: b.view_mut(&mut acts.d_qkv, 0..n * w),
        d_out: b.view(&acts.d_att, 0..n * hd),
        qkv: b.view(&la.qkv, 0..n * w),
        out: b.view(&la.att, 0..n * hd),
        lse: b.view(&la.lse, 0..n * c.num_attention_heads),
        cu_seqlens: cx.cu_seqlens,
        dims: cx.attn,
    })?;
    prof.mark(b, "attention bwd")?;
    let rope = rope_dims(c, n);
    b.rope_backward(Rope {
        x: b.view_mut(&mut acts.d_qkv, 0..n * w),
        inv_freq: b.view(cx.inv_freq, 0..c.head_dim / 2),
        positions: cx.positions,
        dims: rope,
    })?;
    prof.mark(b, "rope bwd")?;
    if let (Some(qk), Some(wr)) = (la.qk_norm.as_ref(), lr.qk_norm.clone()) {
        // d_qkv's q and k heads: ∂loss/∂(normed heads) in, ∂loss/∂(projections) out.
        let hn = c.num_attention_heads + c.num_key_value_heads;
        b.head_rmsnorm_backward(HeadRmsNormBwd {
            d_qkv: b.view_mut(&mut acts.d_qkv, 0..n * w),
            d_weight: base
                .as_mut()
                .and_then(|(g, gr)| Some(b.view_mut(g, gr.qk_norm.clone()?))),
            x: b.view(&qk.x, 0..n * hn * c.head_dim),
            rstd: b.view(&qk.rstd, 0..n * hn),
            weight: b.view(p, wr),
            dims: head_norm_dims(c, n),
            write: cx.grad_write,
        })?;
        prof.mark(b, "qk_norm bwd")?;
    }
    // h1 = input_layernorm(res[l]), recomputed.
    b.rmsnorm_forward(RmsNormFwd {
        y: b.view_mut(&mut acts.h, nd.clone()),
        rstd: b.view_mut(&mut acts.rstd_tmp, 0..n),
        x: b.view(res_in, nd.clone()),
        weight: b.view(p, lr.ln1.clone()),
        n,
        d,
        eps,
    })?;
    prof.mark(b, "recompute bwd")?;
    let (dw, db) = split_weight_bias(b, &mut base, |gr| (&gr.qkv_w, &gr.qkv_b));
    b.linear_backward(LinearBwd {
        dx: Some(b.view_mut(&mut acts.d_h, nd.clone())),
        dx_write: GradWrite::Overwrite,
        d_w: dw,
        d_b: db,
        dy: b.view(&acts.d_qkv, 0..n * w),
        x: b.view(&acts.h, nd.clone()),
        w: base_weight(b, p, lr.qkv_w.clone(), pass_of(&mut lora), Site::Qkv)?,
        dims: LinearDims {
            n,
            d_in: d,
            d_out: w,
        },
        write: cx.grad_write,
    })?;
    prof.mark(b, "qkv_proj bwd")?;
    adapt_bwd(
        &mut lora,
        cx,
        Site::Qkv,
        &acts.d_qkv,
        &acts.h,
        &mut acts.d_h,
        prof,
    )?;
    b.rmsnorm_backward(RmsNormBwd {
        dx: b.view_mut(&mut acts.d_res, nd.clone()),
        d_weight: base.as_mut().map(|(g, gr)| b.view_mut(g, gr.ln1.clone())),
        dy: b.view(&acts.d_h, nd.clone()),
        x: b.view(res_in, nd.clone()),
        weight: b.view(p, lr.ln1.clone()),
        rstd: b.view(&la.rstd1, 0..n),
        n,
        d,
        write: cx.grad_write,
    })?;
    prof.mark(b, "rmsnorm bwd")?;
    // d_res = ∂loss/∂res[l].
    Ok(())
}

/// A weight's gradient view and, when the layer has one, its bias's: two disjoint ranges of the
/// same gradient buffer, borrowed together; neither for a frozen base.
type WeightBias<'a> = (
    &'a std::ops::Range<usize>,
    &'a Option<std::ops::Range<usize>>,
);
fn split_weight_bias<'a, B: Backend>(
    b: &'a B,
    base: &'a mut Option<(&mut B::Buf, &LayerRanges)>,
    which: impl Fn(&LayerRanges) -> WeightBias<'_>,
) -> (Option<B::Mut<'a>>, Option<B::Mut<'a>>) {
    let Some((g, gr)) = base else {
        return (None, None);
    };
    match which(gr) {
        (w, Some(br)) => {
            let (dw, db) = b.view_mut2(g, w.clone(), br.clone());
            (Some(dw), Some(db))
        }
        (w, None) => (Some(b.view_mut(g, w.clone())), None),
    }
}

/// The adapters of `site`, if any, added to the output `y` of input `x` (see
/// [`LayerPass::forward`]).
fn adapt<B: Backend>(
    lora: &mut Option<&mut LayerPass<'_, B>>,
    b: &B,
    site: Site,
    x: &B::Buf,
    y: &mut B::Buf,
    n: usize,
    prof: &mut Profile,
) -> Result<()> {
    if let Some(lp) = lora {
        lp.forward(b, site, x, y, n)?;
        prof.mark(b, "lora fwd")?;
    }
    Ok(())
}

/// The adapters' backward at `site`, if any (see [`LayerPass::backward`]).
fn adapt_bwd<B: Backend>(
    lora: &mut Option<(&mut LayerPass<'_, B>, &mut B::Buf)>,
    cx: &Ctx<'_, B>,
    site: Site,
    dy: &B::Buf,
    x: &B::Buf,
    dx: &mut B::Buf,
    prof: &mut Profile,
) -> Result<()> {
    if let Some((lp, g)) = lora {
        lp.backward(cx.b, site, dy, x, dx, g, cx.grad_write, cx.n)?;
        prof.mark(cx.b, "lora bwd")?;
    }
    Ok(())
}

/// The adapters of a backward's `lora`, reborrowed (for a base weight's dequantisation).
fn pass_of<'s, 'p, B: Backend>(
    lora: &'s mut Option<(&mut LayerPass<'p, B>, &mut B::Buf)>,
) -> Option<&'s mut LayerPass<'p, B>> {
    lora.as_mut().map(|(lp, _)| &mut **lp)
}
