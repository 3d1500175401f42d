//! Generation with a KV cache ([`Model::generate`]).
//!
//! Prefill: the prompts as one packed row (positions restart per prompt, one attention segment
//! each) through the training forward's layers (`layer::forward`, varlen attention), each
//! layer's keys and values (after RoPE) copied from its `qkv` rows to the prompt's rows of that
//! layer's cache (`Ops::copy_rows`); the last row of each prompt gathered, normed and projected
//! to logits (`linear_forward` with the head, not the fused loss). Decode: one token per live
//! sequence per step, at position = its length so far, through the same `layer::forward` with
//! its attention replaced by a hook (`layer::Attention`): the step's keys and values appended
//! (`Ops::copy_rows`), then `Ops::decode_attention` of the one query over the sequence's cache;
//! then the final norm and the head over the live rows.
//!
//! Sequence i owns cache rows `first_i .. first_i + prompt_i + max_new - 1` of every layer; a
//! finished sequence leaves the batch and its rows are simply no longer read. LoRA adapters
//! apply at every projection as in the training forward (not merged: one path serves training
//! samples, where the weights change every step, and an NF4 base, which cannot take a merged
//! delta), with dropout off; an NF4 base is dequantised one site at a time as the forward does.
//! Every buffer comes from `generate::parts` (which the memory plan counts) and is freed when
//! the call returns.

use std::time::Instant;

use nopad_backend::args::{CopyRows, DecodeAttn, DecodeDims, EmbeddingFwd, LinearFwd, RmsNormFwd};
use nopad_backend::{AttnDims, Backend, GradWrite, LinearDims};
use nopad_rng::Rng;

use super::acts::{layer_acts, scratch};
use super::{softmax_scale, Model};
use crate::error::{ModelError, Result};
use crate::generate::{self, GenerateOptions, Generated, Stop};
use crate::layer::{self, LayerActs, Scratch};
use crate::lora::{LayerPass, LoraScratch};
use crate::profile::Profile;

/// The buffers of one generation (see `generate::parts` for their shapes and order).
struct Bufs<B: Backend> {
    /// `[L, rows, 2·Hkv·Dh]`.
    cache: B::Buf,
    /// Cache rows per layer.
    rows: usize,
    la: LayerActs<B>,
    s: Scratch<B>,
    /// Two residual streams, written in turn by the layers.
    res: [B::Buf; 2],
    /// `[S, D]` each prompt's last row, then `[S, D]` its norm, `[S]` its reciprocal RMS.
    last: B::Buf,
    normed: B::Buf,
    rstd: B::Buf,
    /// `[S, V]`.
    logits: B::Buf,
    /// The adapters' `u` and scratch, in a LoRA model.
    lora: Option<(B::Buf, LoraScratch<B>)>,
}

/// How a pass through the layers attends.
enum Attend<'a, B: Backend> {
    /// Varlen attention within each segment of `cu_seqlens` (the training forward's).
    Prefill {
        cu_seqlens: &'a B::Ints,
        attn: AttnDims,
    },
    /// One query per sequence over its cache rows `[2·B]` (first, count): all of them in a
    /// full-attention layer (`spans`), the last W in a layer with a sliding window W
    /// (`windowed`, present when some layer has one).
    Decode {
        spans: &'a B::Ints,
        windowed: Option<&'a B::Ints>,
    },
}

impl<B: Backend> Clone for Attend<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Attend<'_, B> {}

/// One sequence of the batch.
struct Seq {
    /// Its first cache row.
    first: usize,
    /// Its prompt's tokens.
    prompt: usize,
    /// Its draws.
    rng: Rng,
    /// What it generated.
    ids: Vec<i32>,
    /// Why and when it ended.
    end: Option<(Stop, f64)>,
}

impl<B: Backend> Model<B> {
    /// Generates up to `opts.max_new_tokens` tokens after each prompt (ids), all prompts decoded
    /// together as one batch of sequences of different lengths; returns one [`Generated`] per
    /// prompt, in order. Touches neither the training activations nor the gradients, so it can
    /// run between the steps of a training run.
    pub fn generate(
        &mut self,
        b: &B,
        prompts: &[Vec<i32>],
        opts: &GenerateOptions,
    ) -> Result<Vec<Generated>> {
        self.generate_with(b, prompts, opts, |_, _| {})
    }

    /// [`Model::generate`], handing `on_logits(i, logits)` every row of logits `[V]` sequence
    /// i's next token is chosen from, in order (to compare backends, or a forward without the
    /// cache).
    pub fn generate_with(
        &mut self,
        b: &B,
        prompts: &[Vec<i32>],
        opts: &GenerateOptions,
        mut on_logits: impl FnMut(usize, &[f64]),
    ) -> Result<Vec<Generated>> {
        let clock = Instant::now();
        opts.sampling.validate().map_err(ModelError::Input)?;
        self.check_prompts(prompts, opts.max_new_tokens)?;
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        if opts.max_new_tokens == 0 {
            let none = Generated {
                ids: Vec::new(),
                stop: Stop::Length,
                seconds: 0.0,
            };
            return Ok(vec![none; prompts.len()]);
        }
        let mut bufs = self.alloc_bufs(b, &lens, opts.max_new_tokens)?;
        let mut first = 0;
        let mut seqs: Vec<Seq> = lens
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let s = Seq {
                    first,
                    prompt: p,
                    rng: Rng::derived(opts.seed, &format!("generate {i}")),
                    ids: Vec::new(),
                    end: None,
                };
                first += p + opts.max_new_tokens - 1;
                s
            })
            .collect();
        let mut logits = self.prefill(b, &mut bufs, prompts, &seqs)?;
        loop {
            let live: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].end.is_none()).collect();
            let v = self.cfg.vocab_size;
            for (row, &i) in live.iter().enumerate() {
                let l = &logits[row * v..(row + 1) * v];
                on_logits(i, l);
                let sq = &mut seqs[i];
                let t = opts.sampling.pick(l, &mut sq.rng) as i32;
                sq.ids.push(t);
                let now = clock.elapsed().as_secs_f64();
                if opts.eos.contains(&t) {
                    sq.end = Some((Stop::Eos, now));
                } else if sq.ids.len() >= opts.max_new_tokens {
                    sq.end = Some((Stop::Length, now));
                }
            }
            let live: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].end.is_none()).collect();
            if live.is_empty() {
                break;
            }
            logits = self.decode_step(b, &mut bufs, &seqs, &live)?;
        }
        Ok(seqs
            .into_iter()
            .map(|s| {
                let (stop, seconds) = s.end.unwrap_or((Stop::Length, 0.0));
                Generated {
                    ids: s.ids,
                    stop,
                    seconds,
                }
            })
            .collect())
    }

    /// What the model cannot generate from: no prompt, an empty one, an id outside the
    /// vocabulary, a sharded model, a sequence longer than a sliding window or than a dynamic
    /// RoPE's context.
    fn check_prompts(&self, prompts: &[Vec<i32>], max_new: usize) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(m));
        if self.sharded.is_some() {
            return bad("a model sharded by weight (ZeRO stage 3) cannot generate: its ranks hold pieces of each layer".into());
        }
        if prompts.is_empty() {
            return bad("no prompt to generate from".into());
        }
        let v = self.cfg.vocab_size;
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return bad(format!("prompt {i} has no token"));
            }
            if let Some(&t) = p.iter().find(|&&t| t < 0 || t as usize >= v) {
                return bad(format!(
                    "prompt {i}: token id {t} is outside the vocabulary of {v}"
                ));
            }
            let total = p.len() + max_new;
            let ctx = self.cfg.max_position_embeddings;
            if let (crate::RopeScaling::Dynamic { .. }, true) =
                (&self.cfg.rope_scaling, total > ctx)
            {
                return bad(format!("prompt {i}: {} tokens plus {max_new} new exceed max_position_embeddings ({ctx}), beyond which HF rescales this model's dynamic RoPE and nopad does not", p.len()));
            }
        }
        Ok(())
    }

    /// Allocates the buffers of a generation from prompts of `lens` tokens.
    fn alloc_bufs(&self, b: &B, lens: &[usize], max_new: usize) -> Result<Bufs<B>> {
        let layout = self.adapter.as_ref().map(|a| &a.layout);
        let parts = generate::parts(&self.cfg, layout, lens, max_new);
        let mut bufs = parts
            .iter()
            .map(|&(len, kind)| b.alloc(len, kind))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| {
                e.while_allocating(|| {
                    format!(
                        "the KV cache and buffers of {} prompts of {} tokens generating {max_new}",
                        lens.len(),
                        lens.iter().sum::<usize>()
                    )
                })
            })?
            .into_iter();
        let mut next = || bufs.next().expect("one buffer per part");
        let cache = next();
        let la = layer_acts(&mut next, self.cfg.qk_norm);
        let s = scratch(&mut next);
        let res = [next(), next()];
        let (last, normed, rstd, logits) = (next(), next(), next(), next());
        let lora = match layout {
            Some(_) => Some((next(), LoraScratch::from_bufs(vec![next(), next()])?)),
            None => None,
        };
        Ok(Bufs {
            cache,
            rows: generate::cache_rows(lens, max_new),
            la,
            s,
            res,
            last,
            normed,
            rstd,
            logits,
            lora,
        })
    }

    /// The prompts through every layer, their keys and values into the cache; returns the
    /// logits of each prompt's last token `[S, V]`.
    fn prefill(
        &mut self,
        b: &B,
        bufs: &mut Bufs<B>,
        prompts: &[Vec<i32>],
        seqs: &[Seq],
    ) -> Result<Vec<f64>> {
        let tokens: Vec<i32> = prompts.iter().flatten().copied().collect();
        let n = tokens.len();
        let mut cu = vec![0i32];
        let (mut positions, mut pairs, mut last) = (Vec::new(), Vec::new(), Vec::new());
        for (p, s) in prompts.iter().zip(seqs) {
            for j in 0..p.len() {
                pairs.extend([positions.len() as i32, (s.first + j) as i32]);
                positions.push(j as i32);
            }
            cu.push(positions.len() as i32);
            last.extend([positions.len() as i32 - 1, last.len() as i32 / 2]);
        }
        let c = &self.cfg;
        let attn = AttnDims {
            n,
            n_seqs: prompts.len(),
            max_seqlen: prompts.iter().map(Vec::len).max().unwrap_or(0),
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: softmax_scale(c),
            window: None,
        };
        let cu_seqlens = b.ints(&cu)?;
        let io = (b.ints(&tokens)?, b.ints(&positions)?, b.ints(&pairs)?);
        let prefill = Attend::Prefill {
            cu_seqlens: &cu_seqlens,
            attn,
        };
        let d = c.hidden_size;
        let out = self.layers(b, bufs, (&io.0, &io.1, &io.2), n, prefill)?;
        // Each prompt's last row of the final residual stream.
        let (res, last_rows) = (&bufs.res[out], &mut bufs.last);
        b.copy_rows(CopyRows {
            y: b.view_mut(last_rows, 0..prompts.len() * d),
            x: b.view(res, 0..n * d),
            pairs: &b.ints(&last)?,
            n: prompts.len(),
            x_stride: d,
            c0: 0,
            w: d,
        })?;
        self.head(b, bufs, None, prompts.len())
    }

    /// One token per live sequence (`live`, indices into `seqs`): their last generated token
    /// through every layer over the cache; returns their logits `[live, V]`.
    fn decode_step(
        &mut self,
        b: &B,
        bufs: &mut Bufs<B>,
        seqs: &[Seq],
        live: &[usize],
    ) -> Result<Vec<f64>> {
        let (mut tokens, mut positions, mut pairs, mut spans, mut windowed) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // HF's sliding window: the query at position `pos` sees keys `pos - W + 1 ..= pos`.
        let window = self.cfg.sliding_window.filter(|_| {
            (0..self.cfg.num_hidden_layers).any(|l| self.cfg.layer_window(l).is_some())
        });
        for (t, s) in live.iter().map(|&i| &seqs[i]).enumerate() {
            // The token fed back sits after the prompt and the tokens before it.
            let pos = s.prompt + s.ids.len() - 1;
            tokens.push(*s.ids.last().expect("a live sequence has generated a token"));
            positions.push(pos as i32);
            pairs.extend([t as i32, (s.first + pos) as i32]);
            spans.extend([s.first as i32, pos as i32 + 1]);
            if let Some(w) = window {
                let seen = (pos + 1).min(w);
                windowed.extend([(s.first + pos + 1 - seen) as i32, seen as i32]);
            }
        }
        let n = live.len();
        let io = (b.ints(&tokens)?, b.ints(&positions)?, b.ints(&pairs)?);
        let spans = b.ints(&spans)?;
        let windowed = match window {
            Some(_) => Some(b.ints(&windowed)?),
            None => None,
        };
        let decode = Attend::Decode {
            spans: &spans,
            windowed: windowed.as_ref(),
        };
        let out = self.layers(b, bufs, (&io.0, &io.1, &io.2), n, decode)?;
        self.head(b, bufs, Some(out), n)
    }

    /// `n` tokens (ids, positions, and their (row, cache row) pairs) through every layer,
    /// attending as `attend` says; returns which residual buffer holds the output.
    fn layers(
        &mut self,
        b: &B,
        bufs: &mut Bufs<B>,
        (tokens, positions, pairs): (&B::Ints, &B::Ints, &B::Ints),
        n: usize,
        attend: Attend<'_, B>,
    ) -> Result<usize> {
        let c = &self.cfg;
        let pv = self.views.as_ref().unwrap_or(&self.layout);
        let (p, d) = (&self.params, c.hidden_size);
        let mut ad = self.adapter.as_mut();
        b.embedding_forward(EmbeddingFwd {
            x: b.view_mut(&mut bufs.res[0], 0..n * d),
            table: b.view(p, pv.embed.clone()),
            tokens,
            n,
            d,
        })?;
        let dims = DecodeDims {
            n_seqs: n,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: softmax_scale(c),
        };
        let (w, cw, rows) = (dims.qkv_width(), dims.cache_width(), bufs.rows);
        // A decode step's layer context still names a batch shape, which only the varlen
        // attention reads: one segment of its n rows.
        let one_segment = b.ints(&[0, n as i32])?;
        let (cu_seqlens, attn) = match attend {
            Attend::Prefill { cu_seqlens, attn } => (cu_seqlens, attn),
            Attend::Decode { .. } => (
                &one_segment,
                AttnDims {
                    n,
                    n_seqs: 1,
                    max_seqlen: n,
                    n_heads: dims.n_heads,
                    n_kv_heads: dims.n_kv_heads,
                    head_dim: dims.head_dim,
                    scale: dims.scale,
                    window: None,
                },
            ),
        };
        let mut prof = Profile::default();
        for (l, lr) in pv.layers.iter().enumerate() {
            let cx = layer::Ctx {
                b,
                c,
                p,
                inv_freq: &self.inv_freq,
                positions,
                cu_seqlens,
                // The prefill attends within each layer's window; a decode step's attention is
                // the hook below, which applies the window through its spans.
                attn: AttnDims {
                    window: match attend {
                        Attend::Prefill { .. } => c.layer_window(l),
                        Attend::Decode { .. } => None,
                    },
                    ..attn
                },
                n,
                mlp_recompute: false,
                grad_write: GradWrite::Accumulate,
            };
            let mut pass = match (ad.as_deref_mut(), bufs.lora.as_mut()) {
                (Some(a), Some((u, s))) => Some(LayerPass {
                    cfg: &a.cfg,
                    mods: &a.layout.layers[l],
                    params: &a.params,
                    u,
                    s,
                    p: 0.0,
                    seed: 0,
                    nf4: a.nf4.as_mut(),
                    layer: l,
                }),
                _ => None,
            };
            let (lo, hi) = bufs.res.split_at_mut(1);
            let (res_in, res_out) = match l % 2 {
                0 => (&lo[0], &mut hi[0]),
                _ => (&hi[0], &mut lo[0]),
            };
            let cache = &mut bufs.cache;
            let at = l * rows * cw..(l + 1) * rows * cw;
            // The rotated keys and values of the n rows into the sequences' cache rows.
            let append = |la: &LayerActs<B>, cache: &mut B::Buf| {
                b.copy_rows(CopyRows {
                    y: b.view_mut(cache, at.clone()),
                    x: b.view(&la.qkv, 0..n * w),
                    pairs,
                    n,
                    x_stride: w,
                    c0: dims.n_heads * dims.head_dim,
                    w: cw,
                })
            };
            // A step appends its tokens' keys and values, then attends over the cache.
            let mut over_cache;
            let hook: layer::Attention<'_, B> = match attend {
                Attend::Prefill { .. } => None,
                Attend::Decode { spans, windowed } => {
                    let spans = match (c.layer_window(l), windowed) {
                        (Some(_), Some(w)) => w,
                        _ => spans,
                    };
                    over_cache = |la: &mut LayerActs<B>| -> Result<()> {
                        append(la, cache)?;
                        Ok(b.decode_attention(DecodeAttn {
                            out: b.view_mut(&mut la.att, 0..n * dims.out_width()),
                            qkv: b.view(&la.qkv, 0..n * w),
                            cache: b.view(cache, at.clone()),
                            spans,
                            dims,
                        })?)
                    };
                    Some(&mut over_cache)
                }
            };
            let (la, s) = (&mut bufs.la, &mut bufs.s);
            let out = Some(res_out);
            layer::forward(&cx, lr, la, s, res_in, out, pass.as_mut(), hook, &mut prof)?;
            if let Attend::Prefill { .. } = attend {
                append(la, &mut bufs.cache)?;
            }
        }
        Ok(pv.layers.len() % 2)
    }

    /// The final norm and the head over `n` rows: of residual buffer `res` (a decode step), or
    /// of the gathered last rows (`None`, the prefill); returns the logits `[n, V]`.
    fn head(&self, b: &B, bufs: &mut Bufs<B>, res: Option<usize>, n: usize) -> Result<Vec<f64>> {
        let c = &self.cfg;
        let pv = self.views.as_ref().unwrap_or(&self.layout);
        let (d, v) = (c.hidden_size, c.vocab_size);
        let x = match res {
            Some(i) => &bufs.res[i],
            None => &bufs.last,
        };
        b.rmsnorm_forward(RmsNormFwd {
            y: b.view_mut(&mut bufs.normed, 0..n * d),
            rstd: b.view_mut(&mut bufs.rstd, 0..n),
            x: b.view(x, 0..n * d),
            weight: b.view(&self.params, pv.norm.clone()),
            n,
            d,
            eps: c.rms_norm_eps as f32,
        })?;
        b.linear_forward(LinearFwd {
            y: b.view_mut(&mut bufs.logits, 0..n * v),
            x: b.view(&bufs.normed, 0..n * d),
            w: b.view(&self.params, pv.lm_head.clone()),
            b: None,
            dims: LinearDims {
                n,
                d_in: d,
                d_out: v,
            },
        })?;
        Ok(b.read_f64(&bufs.logits, 0..n * v)?)
    }
}
