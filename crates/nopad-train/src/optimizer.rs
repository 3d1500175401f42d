//! AdamW over the flat parameter buffer: fp32 moments (and an fp32 master copy where the backend
//! computes in lower precision), global gradient-norm clipping, and two groups (weight decay on
//! matrices, none on norms and biases, as HF Trainer does).

use nopad_backend::{AdamW, AdamWStep, Backend, Kind};
use nopad_model::Model;

use crate::error::Result;

/// Hyper-parameters that stay fixed for a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay for matrices.
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f32>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
        }
    }
}

/// What one update did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the update was applied (false when the norm was not finite).
    pub applied: bool,
}

/// Optimizer state.
pub struct Optimizer<B: Backend> {
    /// Settings.
    pub cfg: AdamWConfig,
    /// `[P]` first moments (Master).
    pub m: B::Buf,
    /// `[P]` second moments (Master).
    pub v: B::Buf,
    /// `[P]` fp32 master weights (in the backend's form, see `Backend::master_new`), when the
    /// backend's Compute type is narrower.
    pub master: Option<B::Buf>,
    /// Updates applied so far.
    pub step: u64,
}

impl<B: Backend> Optimizer<B> {
    /// Fresh state for a model (moments zero, master copied from the parameters).
    pub fn new(b: &B, model: &Model<B>, cfg: AdamWConfig) -> Result<Self> {
        let n = model.layout.total;
        let m = b.alloc(n, Kind::Master)?;
        let v = b.alloc(n, Kind::Master)?;
        let master = if b.needs_master() {
            Some(b.master_new(&model.params, n)?)
        } else {
            None
        };
        Ok(Optimizer {
            cfg,
            m,
            v,
            master,
            step: 0,
        })
    }

    /// The global L2 norm of the accumulated gradients.
    pub fn grad_norm(&self, b: &B, model: &mut Model<B>) -> Result<f64> {
        let n = model.layout.total;
        let g = model.grads(b)?;
        Ok(b.sum_squares(b.view(g, 0..n), n)?.sqrt())
    }

    /// Applies one update with learning rate `lr` (clipping by the global norm) unless the
    /// gradient norm is not finite, in which case nothing changes. Gradients are left as they
    /// are; the caller zeroes them.
    pub fn update(&mut self, b: &B, model: &mut Model<B>, lr: f64) -> Result<UpdateInfo> {
        let norm = self.grad_norm(b, model)?;
        if !norm.is_finite() {
            return Ok(UpdateInfo {
                grad_norm: norm,
                applied: false,
            });
        }
        let clip = match self.cfg.max_grad_norm {
            Some(max) if norm > max as f64 => (max as f64 / (norm + 1e-6)) as f32,
            _ => 1.0,
        };
        self.step += 1;
        let split = model.layout.decay_end;
        let total = model.layout.total;
        let (params, grads) = model.params_and_grads(b)?;
        for (range, wd) in [(0..split, self.cfg.weight_decay), (split..total, 0.0)] {
            if range.is_empty() {
                continue;
            }
            let hp = AdamW {
                lr: lr as f32,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: wd,
                step: self.step,
                grad_scale: clip,
            };
            let n = range.len();
            b.adamw(AdamWStep {
                param: b.view_mut(params, range.clone()),
                master: self.master.as_mut().map(|m| b.view_mut(m, range.clone())),
                grad: b.view(grads, range.clone()),
                m: b.view_mut(&mut self.m, range.clone()),
                v: b.view_mut(&mut self.v, range.clone()),
                n,
                hp,
            })?;
        }
        Ok(UpdateInfo {
            grad_norm: norm,
            applied: true,
        })
    }

    /// `range` of the weights to save: the fp32 master weights when there are some, else the
    /// parameters.
    pub fn read_weights(
        &self,
        b: &B,
        model: &Model<B>,
        range: std::ops::Range<usize>,
    ) -> nopad_backend::Result<Vec<f32>> {
        match &self.master {
            Some(m) => b.master_read(&model.params, m, range),
            None => b.read(&model.params, range),
        }
    }
}
