//! The model's LoRA mode: a frozen base plus adapters ([`crate::lora`]). The base parameters
//! stay in [`Model::params`] and take no gradient; the adapters live in a buffer of their own,
//! and the model's gradient buffer is shaped like it, so the trainable parameters, their groups
//! and their gradients are the adapter's ([`Model::trainable_groups`],
//! [`Model::params_and_grads`]).

use nopad_backend::{mix64, Backend, Kind};

use super::Model;
use crate::error::{ModelError, Result};
use crate::layout::ParamGroup;
use crate::lora::memory::adapter_parts;
use crate::lora::nf4::Nf4Base;
use crate::lora::{AdapterLayout, LayerPass, LoraConfig, LoraScratch};
use crate::quant::BaseDtype;

/// The adapters of a LoRA model and their activations.
pub(crate) struct Adapter<B: Backend> {
    pub cfg: LoraConfig,
    pub layout: AdapterLayout,
    /// `[A]` every adapter matrix (Compute).
    pub params: B::Buf,
    /// The base's projection matrices in NF4 (QLoRA), or None (they are in the model's
    /// parameters).
    pub nf4: Option<Nf4Base<B>>,
    /// Per layer `[adapters, cap, r]`: the saved `u = drop(x)·Aᵀ`.
    u: Vec<B::Buf>,
    scratch: Option<LoraScratch<B>>,
    cap: usize,
    /// Which dropout masks this micro-batch draws: the step ([`Model::set_lora_step`]) and
    /// the training micro-batches since (counted at the end of each backward).
    step: u64,
    micro: u64,
}

impl<B: Backend> Adapter<B> {
    pub(super) fn new(
        b: &B,
        cfg: &crate::Config,
        lora: LoraConfig,
        base: BaseDtype,
    ) -> Result<Self> {
        lora.validate("LoRA settings")?;
        let nf4 = match base {
            BaseDtype::Bf16 => None,
            BaseDtype::Nf4 => Some(Nf4Base::new(b, cfg, &crate::Layout::new(cfg))?),
        };
        let layout = AdapterLayout::new(cfg, &lora);
        let n = layout.total;
        let params = b
            .alloc(n, Kind::Compute)
            .map_err(|e| e.while_allocating(|| format!("the adapters' {n} parameters")))?;
        Ok(Adapter {
            cfg: lora,
            layout,
            params,
            nf4,
            u: Vec::new(),
            scratch: None,
            cap: 0,
            step: 0,
            micro: 0,
        })
    }

    /// Makes the saved `u` and the scratch hold `n` tokens.
    pub(super) fn ensure(&mut self, b: &B, n: usize) -> Result<()> {
        if self.scratch.is_some() && self.cap >= n {
            return Ok(());
        }
        self.u.clear();
        self.scratch = None;
        // The memory plan counts these same parts (`lora::memory::adapter_parts`).
        let parts = adapter_parts(&self.layout, n, self.cfg.dropout > 0.0);
        let mut bufs = parts
            .iter()
            .map(|&(len, kind)| b.alloc(len, kind))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let scratch = bufs.split_off(self.layout.layers.len());
        self.u = bufs;
        self.scratch = Some(LoraScratch::from_bufs(scratch)?);
        self.cap = n;
        Ok(())
    }

    /// Layer `l`'s adapters for a training (`train`, with dropout) or evaluation pass.
    pub(super) fn pass(&mut self, l: usize, train: bool) -> LayerPass<'_, B> {
        LayerPass {
            cfg: &self.cfg,
            mods: &self.layout.layers[l],
            params: &self.params,
            u: &mut self.u[l],
            s: self.scratch.as_mut().expect("ensure ran before the pass"),
            p: if train { self.cfg.dropout } else { 0.0 },
            seed: mix64(mix64(self.cfg.seed ^ mix64(self.step) ^ self.micro) ^ l as u64),
            nf4: self.nf4.as_mut(),
            layer: l,
        }
    }

    /// Called once a training micro-batch's backward is done: the next draws other masks.
    pub(super) fn next_micro_batch(&mut self) {
        self.micro += 1;
    }
}

impl<B: Backend> Model<B> {
    /// A LoRA model: frozen base parameters (fill them as for [`Model::new`]) and zero adapters
    /// (fill them with [`crate::lora::init_adapter`] or a PEFT file through
    /// [`Model::write_adapter`]). With `train` the gradient buffer holds the adapters'
    /// gradients only; without it the model evaluates.
    pub fn new_lora(b: &B, cfg: crate::Config, lora: LoraConfig, train: bool) -> Result<Self> {
        Self::new_lora_over(b, cfg, lora, BaseDtype::Bf16, train)
    }

    /// [`Model::new_lora`] over a base held as `base`: in NF4 (QLoRA) the projection matrices
    /// are quantised as [`Model::write_params`] receives them (each whole).
    pub fn new_lora_over(
        b: &B,
        cfg: crate::Config,
        lora: LoraConfig,
        base: BaseDtype,
        train: bool,
    ) -> Result<Self> {
        let adapter = Adapter::new(b, &cfg, lora, base)?;
        Self::build(b, cfg, train, Some(adapter), None)
    }

    /// How the base's projections are held (bf16 for a model without adapters).
    pub fn base_dtype(&self) -> BaseDtype {
        match self.adapter.as_ref().and_then(|a| a.nf4.as_ref()) {
            Some(_) => BaseDtype::Nf4,
            None => BaseDtype::Bf16,
        }
    }

    /// The LoRA settings, if this is a LoRA model.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.adapter.as_ref().map(|a| &a.cfg)
    }

    /// The adapters' layout, if this is a LoRA model.
    pub fn adapter_layout(&self) -> Option<&AdapterLayout> {
        self.adapter.as_ref().map(|a| &a.layout)
    }

    fn adapter_mut(&mut self) -> Result<&mut Adapter<B>> {
        self.adapter
            .as_mut()
            .ok_or_else(|| ModelError::Input("this model has no LoRA adapters".into()))
    }

    /// Writes host values into the adapters at `offset`.
    pub fn write_adapter(&mut self, b: &B, offset: usize, vals: &[f32]) -> Result<()> {
        Ok(b.write(&mut self.adapter_mut()?.params, offset, vals)?)
    }

    /// The adapters' values on the host.
    pub fn read_adapter(&self, b: &B) -> Result<Vec<f32>> {
        let a = self
            .adapter
            .as_ref()
            .ok_or_else(|| ModelError::Input("this model has no LoRA adapters".into()))?;
        Ok(b.read(&a.params, 0..a.layout.total)?)
    }

    /// Chooses the dropout masks of the following training micro-batches: those of optimizer
    /// step `step` (set before each step, so a resumed run draws the masks an uninterrupted
    /// one draws); each micro-batch of the step draws its own.
    pub fn set_lora_step(&mut self, step: u64) {
        self.set_lora_step_at(step, 0);
    }

    /// [`Model::set_lora_step`] for a share of the step that starts after `micro` training
    /// micro-batches of it (a data-parallel rank's share draws the masks one rank running the
    /// whole step draws for those micro-batches).
    pub fn set_lora_step_at(&mut self, step: u64, micro: u64) {
        if let Some(a) = &mut self.adapter {
            a.step = step;
            a.micro = micro;
        }
    }

    /// The groups of the parameters that train: the adapters' in a LoRA model, else
    /// [`crate::Layout::groups`].
    pub fn trainable_groups(&self) -> &[ParamGroup] {
        match &self.adapter {
            Some(a) => &a.layout.groups,
            None => &self.layout.groups,
        }
    }

    /// How many parameters train.
    pub fn trainable_len(&self) -> usize {
        match &self.adapter {
            Some(a) => a.layout.total,
            None => self.layout.total,
        }
    }

    /// The parameters that train: the adapters in a LoRA model, else [`Model::params`].
    pub fn trainable(&self) -> &B::Buf {
        match &self.adapter {
            Some(a) => &a.params,
            None => &self.params,
        }
    }

    /// The same, to write (restoring a checkpoint; tests set single elements).
    pub fn trainable_mut(&mut self) -> &mut B::Buf {
        match &mut self.adapter {
            Some(a) => &mut a.params,
            None => &mut self.params,
        }
    }

    /// Where the trainable parameters that take weight decay end (they come first): every
    /// adapter matrix decays.
    pub fn trainable_decay_end(&self) -> usize {
        match &self.adapter {
            Some(a) => a.layout.total,
            None => self.layout.decay_end,
        }
    }

    /// An error for what a LoRA model does not do.
    pub(super) fn refuse_with_lora(&self, what: &str) -> Result<()> {
        if self.adapter.is_some() {
            return Err(ModelError::Input(format!(
                "{what} is for full fine-tuning; a LoRA model's gradients are the adapters' and small"
            )));
        }
        Ok(())
    }
}
