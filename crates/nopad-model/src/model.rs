//! The decoder's explicit forward and backward, written once against [`Backend`].
//!
//! Like llm.c there is no autograd: [`Model::forward_train`] saves the activations each layer's
//! backward needs in named buffers ([`LayerActs`]), and [`Model::backward`] walks the layers in
//! reverse, a page of code that reads line by line against the forward. The first micro-batch
//! after [`Model::zero_grads`] *writes* the parameter gradients (no zeroing pass), the following
//! ones add to them (so micro-batches of one optimizer step just add up).
//!
//! With [`Model::set_grad_aliasing`] (for steps of one micro-batch) the parameter gradients share
//! memory with the saved activations ([`crate::arena`]): the backward writes layer `l`'s
//! gradients when the activations of the layers above `l` are dead, so they may lie there.
//!
//! A model sharded by weight ([`Model::new_sharded`], ZeRO stage 3) holds only its pieces: the
//! `*_from` passes ask a [`WeightSource`] for each group's weights just ahead of their use
//! (`model/sharded.rs`); a model that holds every weight runs with [`Resident`], which brings
//! nothing.
//!
//! Legend: N tokens, D hidden, H/Hkv heads, Dh head dim, W = (H + 2·Hkv)·Dh, F MLP width,
//! V vocabulary, L layers.
//!
//! Over 600 lines on purpose: the forward and the backward are meant to be read side by side,
//! so they stay in one file; the gradient modes, LoRA's adapters and weight sharding live in
//! `model/`.

use std::ops::Range;

use nopad_backend::args::{EmbeddingBwd, EmbeddingFwd, LmHeadLoss, RmsNormBwd, RmsNormFwd};
use nopad_backend::{AttnDims, Backend, GradWrite, Kind, LinearDims};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::layer;
use crate::layout::{GroupKind, Layout, ParamGroup};
use crate::profile::Profile;
use crate::recompute::{gu_homes, GuHome, Recompute};

mod acts;
mod decode;
mod grad_slots;
mod hand_over;
mod lora;
mod offload;
mod sharded;
pub use acts::Acts;
use grad_slots::Slots as GradSlots;
pub(crate) use grad_slots::{
    scratch_len as group_scratch_len, weights_len as gathered_weights_len,
};
use lora::Adapter;
use sharded::{fetch, fetch_top, weights, Sharded};
pub use sharded::{Phase, Piece, Placed, Resident, WeightSource};

/// One micro-batch as the model consumes it (host slices; uploaded by [`Model::forward_train`] and
/// [`Model::forward_eval`]).
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

/// What [`Model::backward_with`] hands its hook once a parameter group's gradient is written.
pub struct GroupGrads<'a, B: Backend> {
    /// The group's index in [`Layout::groups`].
    pub index: usize,
    /// The group.
    pub group: &'a ParamGroup,
    /// `[P]` every parameter; the hook may write the group's ranges only.
    pub params: &'a mut B::Buf,
    /// The gradients; the group's are written for this backward, at
    /// [`GroupGrads::grad_range`]. Writable so that a data-parallel hook can exchange the
    /// group's gradient in place (all-reduce, reduce-scatter); nothing else may be written.
    pub grads: &'a mut B::Buf,
    /// Where the group's gradients lie in a one-group scratch; None: at the parameters' offsets.
    slots: Option<&'a [(Range<usize>, usize)]>,
}

impl<B: Backend> GroupGrads<'_, B> {
    /// Where the gradient of `r`, a range inside one of the group's ranges, lies in
    /// [`GroupGrads::grads`]: `r` itself in a buffer shaped like the parameters, elsewhere when
    /// the optimizer runs in the backward.
    pub fn grad_range(&self, r: &Range<usize>) -> Range<usize> {
        match self.slots {
            None => r.clone(),
            Some(placed) => grad_slots::locate(placed.iter(), r)
                .unwrap_or_else(|| panic!("range {r:?} is not in group {}", self.group.kind)),
        }
    }
}

/// Calls `hook` for the group of `kind` among `groups`.
fn group_ready<B: Backend, E: From<ModelError>>(
    groups: &[ParamGroup],
    slots: Option<&GradSlots>,
    kind: GroupKind,
    params: &mut B::Buf,
    grads: &mut B::Buf,
    hook: &mut impl FnMut(GroupGrads<'_, B>) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let Some(index) = groups.iter().position(|g| g.kind == kind) else {
        return Err(ModelError::Input(format!("no parameter group {kind} in the layout")).into());
    };
    hook(GroupGrads {
        index,
        group: &groups[index],
        params,
        grads,
        slots: slots.map(|s| s.groups[index].as_slice()),
    })
}

/// Device copies of one micro-batch's integer arrays, plus its shape.
struct Uploaded<B: Backend> {
    tokens: B::Ints,
    targets: B::Ints,
    positions: B::Ints,
    cu_seqlens: B::Ints,
    attn: AttnDims,
}

impl<B: Backend> Uploaded<B> {
    /// The attention shape of layer `l`: the batch's, with the layer's sliding window
    /// (`Config::layer_window`).
    fn layer_attn(&self, c: &Config, l: usize) -> AttnDims {
        AttnDims {
            window: c.layer_window(l),
            ..self.attn
        }
    }
}

/// What the gradient buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GradState {
    /// Zero as far as anyone can tell: the buffer may hold anything, and the next training
    /// forward and backward overwrite it instead of adding.
    Zero,
    /// A training forward wrote the output head's gradient this way; its backward has not run.
    Pending(GradWrite),
    /// The sum of the gradients of the micro-batches since [`Model::zero_grads`].
    Written,
}

/// A Llama-family decoder on a backend.
pub struct Model<B: Backend> {
    /// The configuration.
    pub cfg: Config,
    /// Where each parameter lives.
    pub layout: Layout,
    /// `[P]` parameters as the forward reads them (Compute); over an NF4 base only those not
    /// quantised, viewed as `views` says; in a sharded model `[Σ piece]`, this rank's pieces
    /// (`model/sharded.rs`), which a pass gathers into `sharded`'s resident weights.
    pub params: B::Buf,
    /// Over an NF4 base, how `params` is viewed (`lora::nf4::param_views`); in a sharded model,
    /// how the resident weights are; else `layout`.
    views: Option<Layout>,
    /// ZeRO stage 3: the pieces' map and the gathered weights ([`Model::new_sharded`]).
    sharded: Option<Sharded<B>>,
    /// `[P]` gradients (Grad); read them through [`Model::grads`]. Empty in an evaluation model
    /// and, with aliasing, until the first forward allocates the activations. In a LoRA model
    /// shaped like the adapters (the base takes no gradient).
    pub(crate) grads: B::Buf,
    /// The adapters of a LoRA model ([`Model::new_lora`]).
    adapter: Option<Adapter<B>>,
    grad_state: GradState,
    has_grads: bool,
    alias_grads: bool,
    /// With the optimizer in the backward, `grads` is a one-group scratch laid out by this.
    slots: Option<GradSlots>,
    inv_freq: B::Buf,
    loss_sum: B::Buf,
    acts: Option<Acts<B>>,
    saved: Option<Uploaded<B>>,
    profile: Profile,
    recompute: Recompute,
    /// Layers whose gate/up projections are offloaded (`--offload activations:K`).
    offload: usize,
    /// Each layer's [`GuHome`] under `recompute` and `offload`.
    homes: Vec<GuHome>,
}

impl<B: Backend> Model<B> {
    /// A model with zero parameters; fill them with [`crate::weights::init_random`] or
    /// [`crate::weights::load_checkpoint`] through [`Model::write_params`].
    pub fn new(b: &B, cfg: Config) -> Result<Self> {
        Self::build(b, cfg, true, None, None)
    }

    /// The same for evaluation only: no gradient buffer (as large as the parameters, fp32 on
    /// CUDA), so [`Model::backward`] and [`Model::zero_grads`] are errors.
    pub fn new_eval(b: &B, cfg: Config) -> Result<Self> {
        Self::build(b, cfg, false, None, None)
    }

    fn build(
        b: &B,
        cfg: Config,
        grads: bool,
        adapter: Option<Adapter<B>>,
        shard: Option<(&[Piece], usize)>,
    ) -> Result<Self> {
        let layout = Layout::new(&cfg);
        let mut views = adapter
            .as_ref()
            .filter(|a| a.nf4.is_some())
            .map(|_| crate::lora::nf4::param_views(&layout));
        let trainable = adapter.as_ref().map_or(layout.total, |a| a.layout.total);
        let mut n = views.as_ref().map_or(layout.total, |v| v.total);
        let sharded = match shard {
            Some((pieces, ranks)) => {
                let (s, len) = Sharded::new(b, &layout, pieces, ranks)?;
                (views, n) = (Some(s.views.clone()), len);
                Some(s)
            }
            None => None,
        };
        let params = b
            .alloc(n, Kind::Compute)
            .map_err(|e| e.while_allocating(|| format!("the model's {n} parameters")))?;
        let has_grads = grads;
        // A sharded model never holds every gradient: one group's at a time.
        let slots = sharded.as_ref().map(|_| GradSlots::grads(&layout));
        let grad_len = match (&slots, grads) {
            (Some(s), true) => s.len,
            (None, true) => trainable,
            (_, false) => 0,
        };
        let grads = b.alloc(grad_len, Kind::Grad).map_err(|e| {
            e.while_allocating(|| format!("the gradients of {trainable} parameters"))
        })?;
        let freqs = crate::rope::inv_freq(&cfg);
        let mut inv_freq = b.alloc(freqs.len(), Kind::Master)?;
        b.write(&mut inv_freq, 0, &freqs)?;
        let loss_sum = b.alloc(1, Kind::Master)?;
        let homes = vec![GuHome::Kept; cfg.num_hidden_layers];
        Ok(Model {
            cfg,
            layout,
            params,
            views,
            sharded,
            grads,
            adapter,
            grad_state: GradState::Zero,
            has_grads,
            alias_grads: false,
            slots,
            inv_freq,
            loss_sum,
            acts: None,
            saved: None,
            profile: Profile::default(),
            recompute: Recompute::None,
            offload: 0,
            homes,
        })
    }

    /// How much of each layer's activations the backward recomputes (see [`Recompute`]).
    /// Offloaded layers (`set_offload_activations`) stay offloaded; full recomputation with
    /// offloaded layers drops the offloading (it keeps nothing to offload).
    pub fn set_recompute(&mut self, mode: Recompute) {
        let offload = if mode == Recompute::Full {
            0
        } else {
            self.offload
        };
        self.set_activations(mode, offload)
            .expect("an offload count the model accepted stays valid with any partial mode");
    }

    /// Offloads `k` layers' gate/up projections to page-locked host memory between the forward
    /// and the backward (see `model/offload.rs`); 0 offloads none. Refused with full
    /// recomputation or more layers than the model has.
    pub fn set_offload_activations(&mut self, k: usize) -> Result<()> {
        self.set_activations(self.recompute, k)
    }

    /// Allocates the activation buffers for micro-batches of up to `tokens` tokens now, instead
    /// of growing them with the first larger batch. A run that offloads activations reserves
    /// its largest micro-batch before step 1: the offloaded layers' page-locked host buffers
    /// take a second or more to pin, which a step should not pay.
    pub fn reserve_activations(&mut self, b: &B, tokens: usize) -> Result<()> {
        self.ensure_acts(b, tokens)
    }

    fn set_activations(&mut self, mode: Recompute, offload: usize) -> Result<()> {
        let homes =
            gu_homes(self.cfg.num_hidden_layers, mode, offload).map_err(ModelError::Input)?;
        if (mode, offload) != (self.recompute, self.offload) {
            // The activation buffers are laid out for the mode (which layers keep `gu`).
            self.acts = None;
        }
        (self.recompute, self.offload, self.homes) = (mode, offload, homes);
        Ok(())
    }

    /// Times every op of the following passes with device timestamps at each boundary
    /// (nothing waits for the device; see [`crate::profile`]).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile.set_enabled(on);
    }

    /// Seconds and calls per op label since profiling started or was last taken.
    pub fn take_profile(&mut self, b: &B) -> Result<Vec<(&'static str, f64, u64)>> {
        self.profile.take(b)
    }

    /// Writes host values into the parameters at `offset`.
    /// Over an NF4 base a projection matrix must come whole (it is quantised); a sharded model
    /// keeps what falls in its pieces.
    pub fn write_params(&mut self, b: &B, offset: usize, vals: &[f32]) -> Result<()> {
        if let Some(s) = &self.sharded {
            return s.write(b, (&mut self.params, offset), vals);
        }
        match self.adapter.as_mut().and_then(|a| a.nf4.as_mut()) {
            Some(q) => q.write(b, &self.layout, &mut self.params, offset, vals),
            None => Ok(b.write(&mut self.params, offset, vals)?),
        }
    }

    /// Places the parameter gradients over the saved activations of the layers whose backward
    /// has finished by the time each gradient is written ([`crate::arena`]), which saves about
    /// a layer's activations or gradients, whichever is smaller, per layer. Only for optimizer
    /// steps of one micro-batch: a second training forward before [`Model::zero_grads`] would
    /// write activations over the first one's gradients, so it is refused. Call between steps.
    /// A sharded model keeps one group's gradient at a time, which leaves nothing to alias: it
    /// stays as it is.
    pub fn set_grad_aliasing(&mut self, b: &B, on: bool) -> Result<()> {
        self.check_grads()?;
        if on == self.alias_grads || self.sharded.is_some() {
            return Ok(());
        }
        self.refuse_with_lora("gradient aliasing")?;
        if on && self.slots.is_some() {
            return Err(ModelError::Input(
                "gradient aliasing and the optimizer in the backward are alternatives: turn the update in the backward off first".into(),
            ));
        }
        if self.grad_state != GradState::Zero {
            return Err(ModelError::Input(
                "gradient aliasing can change only between optimizer steps".into(),
            ));
        }
        self.alias_grads = on;
        self.acts = None;
        // With aliasing the activations' allocation brings the gradients along.
        self.grads = b.alloc(if on { 0 } else { self.layout.total }, Kind::Grad)?;
        Ok(())
    }

    /// Keeps the gradient of one parameter group at a time, in a scratch of the embedding's size
    /// plus the largest other group's ([`grad_slots`]), for optimizer steps of one micro-batch
    /// whose update runs in [`Model::backward_with`]'s hook: the hook must consume each group's
    /// gradient, because the next group's is written over it. [`Model::grads`] is then an
    /// error. Turns gradient aliasing off. Call between steps.
    pub fn set_update_in_backward(&mut self, b: &B, on: bool) -> Result<()> {
        self.check_grads()?;
        if on == self.slots.is_some() {
            return Ok(());
        }
        self.refuse_with_lora("the one-group gradient scratch")?;
        if self.sharded.is_some() {
            return Err(ModelError::Input(
                "a sharded model keeps one group's gradient at a time: it cannot hold them all"
                    .into(),
            ));
        }
        if self.grad_state != GradState::Zero {
            return Err(ModelError::Input(
                "the update in the backward can change only between optimizer steps".into(),
            ));
        }
        if on {
            self.set_grad_aliasing(b, false)?;
            let slots = GradSlots::grads(&self.layout);
            self.grads = b.alloc(0, Kind::Grad)?;
            self.grads = b.alloc(slots.len, Kind::Grad).map_err(|e| {
                e.while_allocating(|| {
                    format!("the one-group gradient scratch of {} elements", slots.len)
                })
            })?;
            self.slots = Some(slots);
        } else {
            self.slots = None;
            self.grads = b.alloc(0, Kind::Grad)?;
            self.grads = b.alloc(self.layout.total, Kind::Grad)?;
        }
        Ok(())
    }

    /// Whether the gradients are kept one group at a time ([`Model::set_update_in_backward`]).
    pub fn updates_in_backward(&self) -> bool {
        self.slots.is_some()
    }

    /// Sets every gradient to zero. Free: nothing touches the device (`b` is kept for the
    /// callers' sake), the next micro-batch's backward overwrites them.
    pub fn zero_grads(&mut self, _b: &B) -> Result<()> {
        self.check_grads()?;
        self.grad_state = GradState::Zero;
        Ok(())
    }

    /// `[P]` gradients of the micro-batches since [`Model::zero_grads`] (zeros if none ran).
    pub fn grads(&mut self, b: &B) -> Result<&B::Buf> {
        self.settle_grads(b)?;
        Ok(&self.grads)
    }

    /// The parameters to update and their gradients, for the optimizer (a LoRA model's
    /// adapters; see [`Model::trainable_groups`]).
    pub fn params_and_grads(&mut self, b: &B) -> Result<(&mut B::Buf, &B::Buf)> {
        self.settle_grads(b)?;
        let p = match &mut self.adapter {
            Some(a) => &mut a.params,
            None => &mut self.params,
        };
        Ok((p, &self.grads))
    }

    /// Makes the buffer hold what [`Model::grads`] promises.
    fn settle_grads(&mut self, b: &B) -> Result<()> {
        self.check_grads()?;
        if self.slots.is_some() {
            return Err(ModelError::Input(
                "the optimizer runs in the backward: each group's gradient is consumed there and not kept".into(),
            ));
        }
        match self.grad_state {
            GradState::Written => Ok(()),
            GradState::Pending(_) => Err(ModelError::Input(
                "a training forward's backward has not run, so its gradients are incomplete".into(),
            )),
            GradState::Zero => {
                let n = self.trainable_len();
                if b.buf_len(&self.grads) < n {
                    // Aliasing before any forward: a buffer of its own until one runs.
                    self.grads = b.alloc(n, Kind::Grad)?;
                } else {
                    b.zero(b.view_mut(&mut self.grads, 0..n))?;
                }
                Ok(())
            }
        }
    }

    fn check_grads(&self) -> Result<()> {
        if !self.has_grads {
            return Err(ModelError::Input(
                "this model was built for evaluation (Model::new_eval) and has no gradients".into(),
            ));
        }
        Ok(())
    }

    /// How a forward may touch the gradients: `Some(how the head's gradient is written)` for a
    /// training forward, `None` for evaluation; an error where it would lose gradients.
    fn begin_forward(&self, train: bool) -> Result<Option<GradWrite>> {
        let refuse = |why: &str| Err(ModelError::Input(why.into()));
        match (self.grad_state, train) {
            (GradState::Pending(_), _) => refuse(
                "a forward while the previous training forward's backward has not run",
            ),
            (GradState::Written, _) if self.slots.is_some() => refuse(
                "a forward after a backward whose gradients were consumed group by group (the optimizer in the backward is for steps of one micro-batch): zero_grads first",
            ),
            (GradState::Written, _) if self.alias_grads => refuse(
                "a forward would write activations over the gradients (gradient aliasing is for steps of one micro-batch): take the optimizer step and zero_grads first, or turn aliasing off for gradient accumulation",
            ),
            (_, false) => Ok(None),
            (GradState::Zero, true) => Ok(Some(GradWrite::Overwrite)),
            (GradState::Written, true) => Ok(Some(GradWrite::Accumulate)),
        }
    }

    /// Returns the loss summed since the last call (over all target tokens of the forwards run)
    /// and resets it.
    pub fn take_loss_sum(&mut self, b: &B) -> Result<f64> {
        let v = b.read_f64(&self.loss_sum, 0..1)?[0];
        b.zero(b.view_mut(&mut self.loss_sum, 0..1))?;
        Ok(v)
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
                scale: softmax_scale(c),
                // Set per layer, where the layer's context is built.
                window: None,
            },
        })
    }

    /// Training forward pass over one micro-batch: adds its loss sum to the running total
    /// ([`Model::take_loss_sum`]) and computes the output head's gradient on the way, scaled by
    /// `scale` (1 / target tokens of the optimizer step); [`Model::backward`] follows.
    pub fn forward_train(&mut self, b: &B, x: &Inputs<'_>, scale: f32) -> Result<()> {
        self.forward(b, x, Some(scale), &mut Resident)
    }

    /// Evaluation forward pass over one micro-batch: adds its loss sum to the running total
    /// ([`Model::take_loss_sum`]) and touches no gradient.
    pub fn forward_eval(&mut self, b: &B, x: &Inputs<'_>) -> Result<()> {
        self.forward(b, x, None, &mut Resident)
    }

    /// The forward of both: `grad_scale = Some(s)` for training, `None` for evaluation; each
    /// group's weights brought by `src` just ahead of their use.
    fn forward(
        &mut self,
        b: &B,
        x: &Inputs<'_>,
        grad_scale: Option<f32>,
        src: &mut dyn WeightSource<B>,
    ) -> Result<()> {
        if grad_scale.is_some() {
            self.check_grads()?;
        }
        self.check_source(src)?;
        let head_write = self.begin_forward(grad_scale.is_some())?;
        let up = self.upload(b, x)?;
        let n = up.attn.n;
        self.ensure_acts(b, n).map_err(|e| match e {
            ModelError::Backend(e) => ModelError::Backend(
                e.while_allocating(|| format!("the activations of a micro-batch of {n} tokens")),
            ),
            e => e,
        })?;
        let c = &self.cfg;
        let d = c.hidden_size;
        let eps = c.rms_norm_eps as f32;
        let mut ad = self.adapter.as_mut();
        if let Some(a) = ad.as_deref_mut() {
            a.ensure(b, n)?;
        }
        let acts = self.acts.as_mut().expect("ensure_acts allocated them");
        let pv = self.views.as_ref().unwrap_or(&self.layout);
        let prof = &mut self.profile;
        prof.start(b)?;
        let (own, sh) = (&self.params, &mut self.sharded);
        let fwd = |kind| (kind, Phase::Forward);
        fetch(b, own, sh, fwd(GroupKind::Embedding), src)?;
        if !pv.layers.is_empty() {
            fetch(b, own, sh, fwd(GroupKind::Layer(0)), src)?;
        }
        let p = weights(own, sh);
        let nd = 0..n * d;
        b.embedding_forward(EmbeddingFwd {
            x: b.view_mut(&mut acts.res[0], nd.clone()),
            table: b.view(p, pv.embed.clone()),
            tokens: &up.tokens,
            n,
            d,
        })?;
        prof.mark(b, "embedding fwd")?;
        let recompute = self.recompute == Recompute::Full;
        let (homes, gu_len) = (&self.homes, n * 2 * c.intermediate_size);
        let last = pv.layers.len().saturating_sub(1);
        for (l, lr) in pv.layers.iter().enumerate() {
            // The next layer's weights go into the other slot while this one computes; after
            // the last layer, the final norm's and the head's.
            if l < last {
                fetch(b, own, sh, fwd(GroupKind::Layer(l + 1)), src)?;
            } else {
                fetch_top(b, own, sh, (&self.layout, Phase::Forward), src)?;
            }
            let la = &mut acts.layers[if recompute { 0 } else { l }];
            let (res_in, res_out) = acts.res.split_at_mut(l + 1);
            let cx = layer::Ctx {
                b,
                c,
                p: weights(own, sh),
                inv_freq: &self.inv_freq,
                positions: &up.positions,
                cu_seqlens: &up.cu_seqlens,
                attn: up.layer_attn(c, l),
                n,
                mlp_recompute: homes[l] == GuHome::Recomputed,
                grad_write: GradWrite::Accumulate,
            };
            let mut pass = ad.as_deref_mut().map(|a| a.pass(l, grad_scale.is_some()));
            if let Some(o) = acts.offload.as_mut() {
                o.enter_forward(b, l, &mut la.gu)?;
            }
            layer::forward(
                &cx,
                lr,
                la,
                &mut acts.s,
                &res_in[l],
                Some(&mut res_out[0]),
                pass.as_mut(),
                None,
                prof,
            )?;
            if let Some(o) = acts.offload.as_mut() {
                o.leave_forward(b, l, &mut la.gu, gu_len, grad_scale.is_some())?;
            }
        }
        if pv.layers.is_empty() {
            fetch_top(b, own, sh, (&self.layout, Phase::Forward), src)?;
        }
        let p = weights(own, sh);
        let (last, norm) = (&acts.res[c.num_hidden_layers], pv.norm.clone());
        b.rmsnorm_forward(RmsNormFwd {
            y: b.view_mut(&mut acts.hf, nd.clone()),
            rstd: b.view_mut(&mut acts.rstdf, 0..n),
            x: b.view(last, nd.clone()),
            weight: b.view(p, norm),
            n,
            d,
            eps,
        })?;
        prof.mark(b, "rmsnorm fwd")?;
        let head = LinearDims {
            n,
            d_in: d,
            d_out: c.vocab_size,
        };
        // A LoRA model's head is frozen: only its input gradient.
        let frozen = ad.is_some();
        let (dx, dw) = match grad_scale {
            Some(_) => (
                Some(b.view_mut(&mut acts.s.d_h, nd.clone())),
                (!frozen).then(|| {
                    b.view_mut(
                        &mut self.grads,
                        match &self.slots {
                            Some(s) => s.lm_head.clone(),
                            None => self.layout.lm_head.clone(),
                        },
                    )
                }),
            ),
            None => (None, None),
        };
        b.lm_head_loss(LmHeadLoss {
            loss_sum: b.view_mut(&mut self.loss_sum, 0..1),
            dx,
            d_w: dw,
            x: b.view(&acts.hf, nd.clone()),
            w: b.view(p, pv.lm_head.clone()),
            targets: &up.targets,
            dims: head,
            grad_scale: grad_scale.unwrap_or(0.0),
            write: head_write.unwrap_or(GradWrite::Accumulate),
        })?;
        prof.mark(b, "lm_head_loss fwd")?;
        self.saved = grad_scale.map(|_| up);
        if let Some(how) = head_write {
            self.grad_state = GradState::Pending(how);
        }
        Ok(())
    }

    /// Backward pass of the last [`Model::forward_train`]: accumulates every parameter's
    /// gradient into `grads`.
    pub fn backward(&mut self, b: &B) -> Result<()> {
        self.backward_with(b, |_| Ok::<(), ModelError>(()))
    }

    /// [`Model::backward`], calling `on_group` for each parameter group ([`Layout::groups`]) as
    /// soon as this backward has written the group's gradient, in the order of the groups: the
    /// untied head, the final norm, the layers from the top down, the embedding. This is the seam
    /// for optimizer-in-backward and gradient buckets. The gradient handed over is the sum of the
    /// micro-batches since [`Model::zero_grads`]: final for the step in its last micro-batch.
    ///
    /// What the hook may do, and why that is safe: by the time a group is handed over, the rest
    /// of this backward reads neither its parameters (a layer's weights are read only by that
    /// layer's recomputation and backward, the head's only by the forward, and a tied head is
    /// the embedding, handed over last) nor writes its gradient again. So the hook may write the
    /// group's ranges of `params` (and anything outside the model: moments, master weights) and
    /// read the group's gradient. With gradient aliasing ([`Model::set_grad_aliasing`]) the
    /// group's gradient lies over the saved activations of the layers above it, which are dead
    /// and not written again in this backward (that is what makes the aliasing correct for an
    /// update after the backward too), so the hook reads the same bytes it would read later. The
    /// hook must not write other groups' ranges: lower layers still read their parameters.
    pub fn backward_with<E>(
        &mut self,
        b: &B,
        on_group: impl FnMut(GroupGrads<'_, B>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E>
    where
        E: From<ModelError> + From<nopad_backend::BackendError>,
    {
        self.backward_from(b, &mut Resident, on_group)
    }

    /// [`Model::backward_with`] with each layer's weights brought by `src` again, from the top
    /// down, just ahead of the layer's backward (and its recomputation): see
    /// [`Model::forward_train_from`]. The final norm's and the head's stay from the forward.
    /// A sharded model hands the hook its pieces as [`GroupGrads::params`].
    pub fn backward_from<E>(
        &mut self,
        b: &B,
        src: &mut dyn WeightSource<B>,
        mut on_group: impl FnMut(GroupGrads<'_, B>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E>
    where
        E: From<ModelError> + From<nopad_backend::BackendError>,
    {
        self.check_grads()?;
        self.check_source(src)?;
        let (GradState::Pending(acc), Some(up)) = (self.grad_state, self.saved.take()) else {
            return Err(ModelError::Input("backward without a training forward".into()).into());
        };
        let n = up.attn.n;
        let c = &self.cfg;
        let d = c.hidden_size;
        let acts = self
            .acts
            .as_mut()
            .expect("a forward allocated the activations");
        let g = &mut self.grads;
        let slots = self.slots.as_ref();
        let prof = &mut self.profile;
        let mut ad = self.adapter.as_mut();
        let frozen = ad.is_some();
        prof.start(b)?;
        // The untied head's gradient is complete since the forward.
        if !frozen && self.layout.embed != self.layout.lm_head {
            group_ready(
                &self.layout.groups,
                slots,
                GroupKind::Head,
                &mut self.params,
                g,
                &mut on_group,
            )?;
            prof.mark(b, "group hook (update in backward)")?;
        }
        let pv = self.views.as_ref().unwrap_or(&self.layout);
        if let Some(top) = pv.layers.len().checked_sub(1) {
            let what = (GroupKind::Layer(top), Phase::Backward);
            fetch(b, &self.params, &mut self.sharded, what, src)?;
        }
        let p = weights(&self.params, &self.sharded);
        let nd = 0..n * d;
        // Final norm: d_h holds ∂loss/∂hf from the fused head.
        b.zero(b.view_mut(&mut acts.s.d_res, nd.clone()))?;
        prof.mark(b, "zero bwd")?;
        b.rmsnorm_backward(RmsNormBwd {
            dx: b.view_mut(&mut acts.s.d_res, nd.clone()),
            d_weight: (!frozen)
                .then(|| b.view_mut(g, slots.map_or(&self.layout.norm, |s| &s.norm).clone())),
            dy: b.view(&acts.s.d_h, nd.clone()),
            x: b.view(&acts.res[c.num_hidden_layers], nd.clone()),
            weight: b.view(p, pv.norm.clone()),
            rstd: b.view(&acts.rstdf, 0..n),
            n,
            d,
            write: acc,
        })?;
        prof.mark(b, "rmsnorm bwd")?;
        if !frozen {
            group_ready(
                &self.layout.groups,
                slots,
                GroupKind::FinalNorm,
                &mut self.params,
                g,
                &mut on_group,
            )?;
            prof.mark(b, "group hook (update in backward)")?;
        }
        let recompute = self.recompute == Recompute::Full;
        let (homes, gu_len) = (&self.homes, n * 2 * c.intermediate_size);
        for (l, lr) in pv.layers.iter().enumerate().rev() {
            // The layer below goes into the other slot while this one computes.
            if l > 0 {
                let what = (GroupKind::Layer(l - 1), Phase::Backward);
                fetch(b, &self.params, &mut self.sharded, what, src)?;
            }
            // Built per layer: the hook below may write this layer's parameters.
            let cx = layer::Ctx {
                b,
                c,
                p: weights(&self.params, &self.sharded),
                inv_freq: &self.inv_freq,
                positions: &up.positions,
                cu_seqlens: &up.cu_seqlens,
                attn: up.layer_attn(c, l),
                n,
                mlp_recompute: homes[l] == GuHome::Recomputed,
                grad_write: acc,
            };
            let mut pass = ad.as_deref_mut().map(|a| a.pass(l, true));
            if recompute {
                // Rebuild this layer's saved activations from its input residual stream.
                layer::forward(
                    &cx,
                    lr,
                    &mut acts.layers[0],
                    &mut acts.s,
                    &acts.res[l],
                    None,
                    pass.as_mut(),
                    None,
                    prof,
                )?;
            }
            let la = &mut acts.layers[if recompute { 0 } else { l }];
            let gr = slots.map_or(lr, |s| &s.layers[l]);
            // Frozen base: the gradient buffer is the adapters'.
            let (base, lora) = match pass.as_mut() {
                Some(pass) => (None, Some((pass, &mut *g))),
                None => (Some((&mut *g, gr)), None),
            };
            if let Some(o) = acts.offload.as_mut() {
                o.enter_backward(b, l, &mut la.gu, gu_len)?;
            }
            layer::backward(&cx, lr, la, &mut acts.s, base, lora, &acts.res[l], prof)?;
            if let Some(o) = acts.offload.as_mut() {
                o.leave_backward(l, &mut la.gu);
            }
            let (groups, params) = match ad.as_deref_mut() {
                Some(a) => (&a.layout.groups, &mut a.params),
                None => (&self.layout.groups, &mut self.params),
            };
            group_ready(groups, slots, GroupKind::Layer(l), params, g, &mut on_group)?;
            prof.mark(b, "group hook (update in backward)")?;
        }
        if let Some(a) = ad {
            // Nothing below the first layer trains.
            a.next_micro_batch();
            self.grad_state = GradState::Written;
            return Ok(());
        }
        let embed = slots.map_or(&self.layout.embed, |s| &s.embed).clone();
        if acc == GradWrite::Overwrite && self.layout.embed != self.layout.lm_head {
            // The embedding backward adds; untied, nothing wrote this step's embedding gradient
            // (with one-group slots, the head's gradient lay there and has been consumed).
            b.zero(b.view_mut(g, embed.clone()))?;
        }
        b.embedding_backward(EmbeddingBwd {
            d_table: b.view_mut(g, embed),
            dx: b.view(&acts.s.d_res, nd.clone()),
            tokens: &up.tokens,
            n,
            d,
        })?;
        prof.mark(b, "embedding bwd")?;
        self.grad_state = GradState::Written;
        group_ready(
            &self.layout.groups,
            self.slots.as_ref(),
            GroupKind::Embedding,
            &mut self.params,
            &mut self.grads,
            &mut on_group,
        )?;
        self.profile
            .mark(b, "group hook (update in backward)")
            .map_err(E::from)
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

/// The attention's softmax scale: `1/√Dh`, times the square of YaRN's attention factor (HF
/// scales q's and k's cos and sin by it, so the logits by its square).
fn softmax_scale(c: &Config) -> f32 {
    let plain = 1.0 / (c.head_dim as f32).sqrt();
    match c.rope_scaling.attention_factor() {
        1.0 => plain,
        a => (a * a) as f32 * plain,
    }
}
