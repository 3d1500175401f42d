//! The decoder's explicit forward and backward, written once against [`Backend`].
//!
//! Like llm.c there is no autograd: [`Model::forward`] saves the activations each layer's
//! backward needs in named buffers ([`LayerActs`]), and [`Model::backward`] walks the layers in
//! reverse, a page of code that reads line by line against the forward. Gradients of parameters
//! accumulate in `grads` (so micro-batches of one optimizer step just add up); the caller zeroes
//! them after each update.
//!
//! Legend: N tokens, D hidden, H/Hkv heads, Dh head dim, W = (H + 2·Hkv)·Dh, F MLP width,
//! V vocabulary, L layers.

use nopad_backend::{AttnDims, Backend, Kind, LinearDims};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::layer::{self, LayerActs, Scratch};
use crate::layout::Layout;
use crate::profile::Profile;
use crate::recompute::Recompute;

/// One micro-batch as the model consumes it (host slices; uploaded by [`Model::forward`]).
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// `[N]` token ids.
    pub tokens: &'a [i32],
    /// `[N]` next-token targets, -100 where none.
    pub targets: &'a [i32],
    /// `[N]` RoPE positions.
    pub position_ids: &'a [i32],
    /// `[S + 1]` attention segment boundaries.
    pub cu_seqlens: &'a [i32],
    /// Longest segment.
    pub max_seqlen: usize,
}

/// All activation buffers, sized for `cap` tokens.
pub struct Acts<B: Backend> {
    /// Token capacity.
    pub cap: usize,
    /// `L + 1` residual streams `[N, D]`: the embedding output, then each layer's output.
    pub res: Vec<B::Buf>,
    /// Per layer.
    pub layers: Vec<LayerActs<B>>,
    /// `[N, D]` final norm output.
    pub hf: B::Buf,
    /// `[N]` its reciprocal RMS.
    pub rstdf: B::Buf,
    /// Buffers the layers share.
    pub s: Scratch<B>,
}

/// Device copies of one micro-batch's integer arrays, plus its shape.
struct Uploaded<B: Backend> {
    tokens: B::Ints,
    targets: B::Ints,
    positions: B::Ints,
    cu_seqlens: B::Ints,
    attn: AttnDims,
}

/// A Llama-family decoder on a backend.
pub struct Model<B: Backend> {
    /// The configuration.
    pub cfg: Config,
    /// Where each parameter lives.
    pub layout: Layout,
    /// `[P]` parameters as the forward reads them (Compute).
    pub params: B::Buf,
    /// `[P]` accumulated gradients (Master).
    pub grads: B::Buf,
    inv_freq: B::Buf,
    loss_sum: B::Buf,
    acts: Option<Acts<B>>,
    saved: Option<Uploaded<B>>,
    profile: Profile,
    recompute: Recompute,
}

impl<B: Backend> Model<B> {
    /// A model with zero parameters; fill them with [`crate::weights::init_random`] or
    /// [`crate::weights::load_checkpoint`] through [`Model::write_params`].
    pub fn new(b: &B, cfg: Config) -> Result<Self> {
        Self::build(b, cfg, true)
    }

    /// The same for evaluation only: no gradient buffer (as large as the parameters, fp32 on
    /// CUDA), so [`Model::backward`] and [`Model::zero_grads`] are errors.
    pub fn new_eval(b: &B, cfg: Config) -> Result<Self> {
        Self::build(b, cfg, false)
    }

    fn build(b: &B, cfg: Config, grads: bool) -> Result<Self> {
        let layout = Layout::new(&cfg);
        let params = b.alloc(layout.total, Kind::Compute)?;
        let grads = b.alloc(if grads { layout.total } else { 0 }, Kind::Grad)?;
        let freqs = crate::rope::inv_freq(&cfg);
        let mut inv_freq = b.alloc(freqs.len(), Kind::Master)?;
        b.write(&mut inv_freq, 0, &freqs)?;
        let loss_sum = b.alloc(1, Kind::Master)?;
        Ok(Model {
            cfg,
            layout,
            params,
            grads,
            inv_freq,
            loss_sum,
            acts: None,
            saved: None,
            profile: Profile::default(),
            recompute: Recompute::None,
        })
    }

    /// How much of each layer's activations the backward recomputes (see [`Recompute`]).
    pub fn set_recompute(&mut self, mode: Recompute) {
        if mode != self.recompute {
            // The activation buffers are laid out for the mode (which layers keep `gu`).
            self.acts = None;
        }
        self.recompute = mode;
    }

    /// Times every op of the following passes (synchronising the device at each boundary).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile.set_enabled(on);
    }

    /// Seconds and calls per op label since profiling started or was last taken.
    pub fn take_profile(&mut self) -> Vec<(&'static str, f64, u64)> {
        self.profile.take()
    }

    /// Writes host values into the parameters at `offset`.
    pub fn write_params(&mut self, b: &B, offset: usize, vals: &[f32]) -> Result<()> {
        Ok(b.write(&mut self.params, offset, vals)?)
    }

    /// Sets every gradient to zero.
    pub fn zero_grads(&mut self, b: &B) -> Result<()> {
        self.check_grads(b)?;
        let n = self.layout.total;
        Ok(b.zero(b.view_mut(&mut self.grads, 0..n))?)
    }

    fn check_grads(&self, b: &B) -> Result<()> {
        if b.buf_len(&self.grads) < self.layout.total {
            return Err(ModelError::Input(
                "this model was built for evaluation (Model::new_eval) and has no gradients".into(),
            ));
        }
        Ok(())
    }

    /// Returns the loss summed since the last call (over all target tokens of the forwards run)
    /// and resets it.
    pub fn take_loss_sum(&mut self, b: &B) -> Result<f64> {
        let v = b.read_f64(&self.loss_sum, 0..1)?[0];
        b.zero(b.view_mut(&mut self.loss_sum, 0..1))?;
        Ok(v)
    }

    fn ensure_acts(&mut self, b: &B, n: usize) -> Result<()> {
        let slots = if self.recompute == Recompute::Full {
            1
        } else {
            self.cfg.num_hidden_layers
        };
        if self
            .acts
            .as_ref()
            .is_some_and(|a| a.cap >= n && a.layers.len() == slots)
        {
            return Ok(());
        }
        // Exactly the tokens of the largest batch so far: the peak then counts no slack (a
        // backend with a caching allocator makes the reallocation cheap).
        let cap = n;
        self.acts = None;
        let c = &self.cfg;
        let (d, f, h) = (c.hidden_size, c.intermediate_size, c.num_attention_heads);
        let (w, hd) = (c.qkv_width(), h * c.head_dim);
        let act = |len: usize| b.alloc(cap * len, Kind::Compute);
        let stat = |len: usize| b.alloc(cap * len, Kind::Master);
        // With recomputation one layer's worth of saved activations serves every layer.
        let slots = if self.recompute == Recompute::Full {
            1
        } else {
            c.num_hidden_layers
        };
        let mode = self.recompute;
        let gu_len = |on: bool| if on { 2 * f } else { 0 };
        let mut layers = Vec::with_capacity(slots);
        for l in 0..slots {
            layers.push(LayerActs {
                rstd1: stat(1)?,
                qkv: act(w)?,
                att: act(hd)?,
                lse: stat(h)?,
                res_mid: act(d)?,
                rstd2: stat(1)?,
                gu: act(gu_len(!mode.mlp_in_layer(l)))?,
            });
        }
        self.acts = Some(Acts {
            cap,
            res: (0..=c.num_hidden_layers)
                .map(|_| act(d))
                .collect::<std::result::Result<_, _>>()?,
            layers,
            hf: act(d)?,
            rstdf: stat(1)?,
            s: Scratch {
                h: act(d)?,
                a: act(f)?,
                rstd_tmp: stat(1)?,
                d_res: act(d)?,
                d_h: act(d)?,
                d_qkv: act(w)?,
                d_att: act(hd)?,
                d_a: act(f)?,
                gu: act(gu_len(mode.mlp_in_layer(0)))?,
            },
        });
        Ok(())
    }

    fn upload(&self, b: &B, x: &Inputs<'_>) -> Result<Uploaded<B>> {
        let n = x.tokens.len();
        let bad = |what: &str| Err(ModelError::Input(format!("batch: {what}")));
        if x.targets.len() != n || x.position_ids.len() != n {
            return bad("tokens, targets and position_ids differ in length");
        }
        if x.cu_seqlens.first() != Some(&0) || x.cu_seqlens.last().map(|&v| v as usize) != Some(n) {
            return bad("cu_seqlens must run from 0 to the number of tokens");
        }
        if let Some(w) = self.cfg.sliding_window {
            if x.max_seqlen > w {
                return Err(ModelError::Input(format!(
                    "a sequence of {} tokens exceeds the model's sliding_window of {w}; sliding-window attention is not implemented, so use --max-len {w} or less",
                    x.max_seqlen
                )));
            }
        }
        let c = &self.cfg;
        Ok(Uploaded {
            tokens: b.ints(x.tokens)?,
            targets: b.ints(x.targets)?,
            positions: b.ints(x.position_ids)?,
            cu_seqlens: b.ints(x.cu_seqlens)?,
            attn: AttnDims {
                n,
                n_seqs: x.cu_seqlens.len() - 1,
                max_seqlen: x.max_seqlen,
                n_heads: c.num_attention_heads,
                n_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                scale: 1.0 / (c.head_dim as f32).sqrt(),
            },
        })
    }

    /// Forward pass over one micro-batch; adds its loss sum to the running total
    /// ([`Model::take_loss_sum`]). With `grad_scale = Some(s)` the output head's gradient
    /// (scaled by `s` = 1 / target tokens of the optimizer step) is computed on the way and
    /// [`Model::backward`] may follow; with `None` this is evaluation only.
    pub fn forward(&mut self, b: &B, x: &Inputs<'_>, grad_scale: Option<f32>) -> Result<()> {
        if grad_scale.is_some() {
            self.check_grads(b)?;
        }
        let up = self.upload(b, x)?;
        let n = up.attn.n;
        self.ensure_acts(b, n)?;
        let c = &self.cfg;
        let d = c.hidden_size;
        let eps = c.rms_norm_eps as f32;
        let acts = self.acts.as_mut().expect("ensure_acts allocated them");
        let p = &self.params;
        let prof = &mut self.profile;
        prof.start(b)?;
        let nd = 0..n * d;
        b.embedding_forward(
            b.view_mut(&mut acts.res[0], nd.clone()),
            b.view(p, self.layout.embed.clone()),
            &up.tokens,
            n,
            d,
        )?;
        prof.mark(b, "embedding fwd")?;
        let recompute = self.recompute == Recompute::Full;
        let cx = layer::Ctx {
            b,
            c,
            p,
            inv_freq: &self.inv_freq,
            positions: &up.positions,
            cu_seqlens: &up.cu_seqlens,
            attn: up.attn,
            n,
            mlp_recompute: false,
        };
        let mode = self.recompute;
        for (l, lr) in self.layout.layers.iter().enumerate() {
            let la = &mut acts.layers[if recompute { 0 } else { l }];
            let (res_in, res_out) = acts.res.split_at_mut(l + 1);
            let cx = layer::Ctx {
                mlp_recompute: mode.mlp_in_layer(l),
                ..cx
            };
            layer::forward(
                &cx,
                lr,
                la,
                &mut acts.s,
                &res_in[l],
                Some(&mut res_out[0]),
                prof,
            )?;
        }
        let last = &acts.res[c.num_hidden_layers];
        b.rmsnorm_forward(
            b.view_mut(&mut acts.hf, nd.clone()),
            b.view_mut(&mut acts.rstdf, 0..n),
            b.view(last, nd.clone()),
            b.view(p, self.layout.norm.clone()),
            n,
            d,
            eps,
        )?;
        prof.mark(b, "rmsnorm fwd")?;
        let head = LinearDims {
            n,
            d_in: d,
            d_out: c.vocab_size,
        };
        let (dx, dw) = match grad_scale {
            Some(_) => (
                Some(b.view_mut(&mut acts.s.d_h, nd.clone())),
                Some(b.view_mut(&mut self.grads, self.layout.lm_head.clone())),
            ),
            None => (None, None),
        };
        b.lm_head_loss(
            b.view_mut(&mut self.loss_sum, 0..1),
            dx,
            dw,
            b.view(&acts.hf, nd.clone()),
            b.view(p, self.layout.lm_head.clone()),
            &up.targets,
            head,
            grad_scale.unwrap_or(0.0),
        )?;
        prof.mark(b, "lm_head_loss fwd")?;
        self.saved = grad_scale.map(|_| up);
        Ok(())
    }

    /// Backward pass of the last training [`Model::forward`]: accumulates every parameter's
    /// gradient into `grads`.
    pub fn backward(&mut self, b: &B) -> Result<()> {
        self.check_grads(b)?;
        let up = self
            .saved
            .take()
            .ok_or_else(|| ModelError::Input("backward without a training forward".into()))?;
        let n = up.attn.n;
        let c = &self.cfg;
        let d = c.hidden_size;
        let acts = self
            .acts
            .as_mut()
            .expect("a forward allocated the activations");
        let (p, g) = (&self.params, &mut self.grads);
        let prof = &mut self.profile;
        prof.start(b)?;
        let nd = 0..n * d;
        // Final norm: d_h holds ∂loss/∂hf from the fused head.
        b.zero(b.view_mut(&mut acts.s.d_res, nd.clone()))?;
        prof.mark(b, "zero bwd")?;
        b.rmsnorm_backward(
            b.view_mut(&mut acts.s.d_res, nd.clone()),
            b.view_mut(g, self.layout.norm.clone()),
            b.view(&acts.s.d_h, nd.clone()),
            b.view(&acts.res[c.num_hidden_layers], nd.clone()),
            b.view(p, self.layout.norm.clone()),
            b.view(&acts.rstdf, 0..n),
            n,
            d,
        )?;
        prof.mark(b, "rmsnorm bwd")?;
        let recompute = self.recompute == Recompute::Full;
        let cx = layer::Ctx {
            b,
            c,
            p,
            inv_freq: &self.inv_freq,
            positions: &up.positions,
            cu_seqlens: &up.cu_seqlens,
            attn: up.attn,
            n,
            mlp_recompute: false,
        };
        let mode = self.recompute;
        for (l, lr) in self.layout.layers.iter().enumerate().rev() {
            let cx = layer::Ctx {
                mlp_recompute: mode.mlp_in_layer(l),
                ..cx
            };
            if recompute {
                // Rebuild this layer's saved activations from its input residual stream.
                layer::forward(
                    &cx,
                    lr,
                    &mut acts.layers[0],
                    &mut acts.s,
                    &acts.res[l],
                    None,
                    prof,
                )?;
            }
            let la = &mut acts.layers[if recompute { 0 } else { l }];
            layer::backward(&cx, lr, la, &mut acts.s, g, &acts.res[l], prof)?;
        }
        b.embedding_backward(
            b.view_mut(g, self.layout.embed.clone()),
            b.view(&acts.s.d_res, nd.clone()),
            &up.tokens,
            n,
            d,
        )?;
        prof.mark(b, "embedding bwd")?;
        Ok(())
    }

    /// `[N, D]` gradient of the loss with respect to the embedded inputs after the last
    /// [`Model::backward`] (for tests of the input path).
    pub fn input_grad(&self, b: &B, n: usize) -> Result<Vec<f32>> {
        let acts = self
            .acts
            .as_ref()
            .ok_or_else(|| ModelError::Input("no backward has run".into()))?;
        Ok(b.read(&acts.s.d_res, 0..n * self.cfg.hidden_size)?)
    }
}

pub(crate) fn split_weight_bias<'a, B: Backend>(
    b: &'a B,
    g: &'a mut B::Buf,
    w: &std::ops::Range<usize>,
    bias: &Option<std::ops::Range<usize>>,
) -> (B::Mut<'a>, Option<B::Mut<'a>>) {
    match bias {
        Some(br) => {
            let (dw, db) = b.view_mut2(g, w.clone(), br.clone());
            (dw, Some(db))
        }
        None => (b.view_mut(g, w.clone()), None),
    }
}
