//! The memory plan: the predicted peak of a training step by what it holds (weights, master,
//! moments, gradients, activations of the largest micro-batch, the output head's workspace and
//! the allocator's slack), before anything is allocated; which modes, ZeRO stages and
//! micro-batch sizes fit a device; and the refusal a run that cannot fit gets. Pure: a device is
//! described by its element sizes and [`Accounting`] ([`DeviceSizes`]), so `nopad stats` plans
//! for a GPU it does not have. The model's share comes from nopad-model's `memory` module,
//! whose size functions the model allocates from. `docs/MEMORY.md` explains the terms.
//!
//! - this file: what a plan is planned for ([`Modes`], [`DeviceSizes`]) and what it says
//!   ([`Plan`]);
//! - `terms.rs`: the terms themselves, one rank's share of a sharded state included;
//! - `fit.rs`: what fits a budget (the largest micro-batch, the mode and stage grids, tables);
//! - `refusal.rs`: the text of a run that does not fit, naming what would;
//! - `run.rs`: the plan of a run (its modes from the config, the stage `--shard` defaults to,
//!   the check before allocation, the plan kept for an out-of-memory error).

use std::fmt;

use nopad_backend::{Accounting, Backend, Kind, MasterPrecision, StatePrecision};
use nopad_model::lora::memory::LoraShape;
use nopad_model::memory::GradHolding;
use nopad_model::Recompute;

mod fit;
mod refusal;
mod run;
mod terms;

pub use fit::{largest_fitting, mode_grid, stage_grid, table, PLANNED_STAGES};
pub use refusal::check_fits;
pub(crate) use run::pack_options;
pub use run::{
    check_device, check_run, is_out_of_memory, largest_micro_batch, last_plan, modes_of,
    print_plan_for_out_of_memory,
};
pub use terms::{
    plan, plan_rank, sampling_bytes, CUDA_BLAS_WORKSPACE, CUDA_CONTEXT_BYTES, CUDA_SLACK_DIVISOR,
};

/// What a run trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Trained {
    /// Every parameter.
    #[default]
    Full,
    /// LoRA adapters on a frozen base (bf16 or NF4): no base gradients, master or moments; the
    /// adapters with their gradients, master and moments, and the saved `u` activations.
    Lora(LoraShape),
}

/// The settings that decide a step's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modes {
    /// Precision of AdamW's moments (`--optim-states`).
    pub states: StatePrecision,
    /// fp32 master weights or none (`--master-weights`).
    pub master: MasterPrecision,
    /// Activation recomputation (`--recompute`).
    pub recompute: Recompute,
    /// Gradients over dead activations (on with one micro-batch per step unless turned off).
    pub grad_aliasing: bool,
    /// The optimizer runs in the backward, group by group (`--optim-in-backward`): only a
    /// gradient scratch for the groups in flight.
    pub optim_in_backward: bool,
    /// The master weights and moments live in host memory (`--offload optimizer`): none on the
    /// device.
    pub offload: bool,
    /// Layers whose gate/up projections are offloaded to the host (`--offload activations:K`).
    pub offload_acts: usize,
    /// What is trained.
    pub trained: Trained,
    /// Ranks of the data-parallel run (1: one process).
    pub ranks: usize,
    /// The ZeRO stage as `--shard` numbers it (0 to 3, see [`PLANNED_STAGES`]): 1 divides the
    /// moments and master weights over the ranks, 2 also the gradients (one group's full
    /// gradient at a time plus an accumulator of this rank's pieces), 3 also the weights (this
    /// rank's pieces plus two gathered layers and the embedding, head and final norm).
    pub shard: u8,
}

impl Modes {
    /// How the model holds its gradients: one group at a time from stage 2 on (full fine-tuning;
    /// a LoRA model's adapter gradients stay whole) and with the optimizer in the backward.
    fn grads(&self) -> GradHolding {
        let sharded = self.shard >= 2 && self.trained == Trained::Full;
        if self.optim_in_backward || sharded {
            GradHolding::GroupScratch
        } else if self.grad_aliasing {
            GradHolding::Aliased
        } else {
            GradHolding::Separate
        }
    }

    /// A short name for tables: `states/master/recompute[ alias| in-bwd][ lora-rR (nf4)]
    /// [ offload][ stage S×N]`.
    pub fn label(&self) -> String {
        let g = match (self.optim_in_backward, self.grads()) {
            (true, _) => " in-bwd",
            (false, GradHolding::Aliased) => " alias",
            _ => "",
        };
        let t = match self.trained {
            Trained::Full => String::new(),
            Trained::Lora(s) => format!(" lora-r{} {}", s.r, s.base.name()),
        };
        let shard = match (self.ranks, self.shard) {
            (1, 0) => String::new(),
            (n, s) => format!(" stage {s}×{n}"),
        };
        format!(
            "{}/{}/{}{g}{t}{}{shard}",
            crate::states_name(self.states),
            crate::master_name(self.master),
            self.recompute,
            if self.offload { " offload" } else { "" }
        ) + &match self.offload_acts {
            0 => String::new(),
            k => format!(" acts-offload:{k}"),
        }
    }
}

/// A device as the plan sees it: element sizes, accounting, and whether the backend keeps
/// master weights (and how many bytes a parameter's take).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSizes {
    /// Bytes of a Compute, Master, Grad, Moment16 and Code8 element.
    pub kinds: [usize; 5],
    /// Bytes of one parameter's master copy when kept (CUDA bf16: the low 16 bits; 0: none).
    pub master_per_param: usize,
    /// How buffers count.
    pub acc: Accounting,
}

const KINDS: [Kind; 5] = [
    Kind::Compute,
    Kind::Master,
    Kind::Grad,
    Kind::Moment16,
    Kind::Code8,
];

impl DeviceSizes {
    /// The sizes of a backend.
    pub fn of<B: Backend>(b: &B) -> Self {
        DeviceSizes {
            kinds: KINDS.map(|k| b.kind_size(k)),
            master_per_param: b.master_bytes(1),
            acc: b.accounting(),
        }
    }

    /// The CUDA backend in bf16 mode (`bf16_grads`: bf16 parameter gradients, what one
    /// micro-batch per step gets by default), for planning without a device.
    pub fn cuda_bf16(bf16_grads: bool) -> Self {
        DeviceSizes {
            kinds: [2, 4, if bf16_grads { 2 } else { 4 }, 2, 1],
            master_per_param: 2,
            acc: Accounting {
                round: 512,
                shares_parts: true,
                pooled_scratch: true,
            },
        }
    }

    fn size(&self, k: Kind) -> usize {
        let i = KINDS.iter().position(|&x| x == k).unwrap_or(0);
        self.kinds[i]
    }

    /// Bytes of one buffer of `len` elements of kind `k`, as the device counts it.
    fn held(&self, len: usize, k: Kind) -> usize {
        nopad_model::memory::held(len * self.size(k), &self.acc)
    }
}

/// The predicted memory of a step, in bytes, by what it holds (for a sharded run: what the
/// rank with the largest share holds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The settings planned for.
    pub modes: Modes,
    /// Tokens of the largest micro-batch.
    pub tokens: usize,
    /// Parameters (plus the RoPE table and the loss accumulator); in stage 3 this rank's pieces
    /// and the gathered layers.
    pub weights: usize,
    /// fp32 master weights (beyond the parameters).
    pub master: usize,
    /// AdamW's two moments.
    pub moments: usize,
    /// Parameter gradients (with aliasing: beyond the activations they share memory with; from
    /// stage 2 the one-group scratch plus the accumulator of this rank's pieces).
    pub gradients: usize,
    /// Saved activations and the layers' scratch.
    pub activations: usize,
    /// The output head's logits chunk and its row buffers, the uploaded batch, the cuBLASLt
    /// workspace (CUDA; the CPU's op scratch is host memory it does not count).
    pub workspace: usize,
    /// What the device needs beyond the peak: the allocator's padding and cache, the context.
    pub slack: usize,
    /// The peak while the model is built, before the step's buffers exist: its parameters and
    /// a gradient buffer as large as them, which the one-group scratch (stage 2, the optimizer
    /// in the backward, `--offload optimizer`) replaces before step 1. Beyond the step's sum
    /// only where that scratch saves more than the step adds.
    pub construction: usize,
    /// A run's samples between steps (`--sample-every`): the KV cache and the generation's
    /// buffers, alive beside everything a step keeps between steps; 0 without samples.
    pub sampling: usize,
}

impl Plan {
    /// This plan with `bytes` of samples between steps (the slack recomputed on a device that
    /// has one).
    pub fn with_sampling(mut self, bytes: usize) -> Plan {
        self.sampling = bytes;
        if self.slack > 0 {
            self.slack = self.peak() / CUDA_SLACK_DIVISOR + CUDA_CONTEXT_BYTES;
        }
        self
    }

    /// The step's bytes: the sum of the terms but the slack.
    fn step(&self) -> usize {
        self.weights
            + self.master
            + self.moments
            + self.gradients
            + self.activations
            + self.workspace
    }

    /// The predicted peak (what `Backend::peak_memory` measures): the step's bytes (plus the
    /// samples', taken between steps while the step's buffers stay allocated), or the model's
    /// construction where that is larger.
    pub fn peak(&self) -> usize {
        (self.step() + self.sampling).max(self.construction)
    }

    /// What the device must have: the peak plus the slack.
    pub fn needed(&self) -> usize {
        self.peak() + self.slack
    }

    /// The terms as (name, bytes), in table order.
    pub fn terms(&self) -> [(&'static str, usize); 7] {
        [
            ("weights", self.weights),
            ("master", self.master),
            ("moments", self.moments),
            ("gradients", self.gradients),
            ("activations", self.activations),
            ("logits/loss workspace", self.workspace),
            ("allocator slack", self.slack),
        ]
    }
}

/// Bytes in the largest binary unit (up to GiB) that keeps them at least 1, two decimals.
pub fn gib(bytes: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", units[u])
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "memory plan ({}, largest micro-batch {} tokens):",
            self.modes.label(),
            self.tokens
        )?;
        for (name, bytes) in self.terms() {
            writeln!(f, "  {name:<22} {:>11}", gib(bytes))?;
        }
        if self.sampling > 0 {
            let (what, bytes) = ("samples (KV cache)", gib(self.sampling));
            writeln!(
                f,
                "  {what:<22} {bytes:>11}  (between steps, beside the above)"
            )?;
        }
        if self.construction > self.step() + self.sampling {
            writeln!(
                f,
                "  {:<22} {:>11}  (the model's full gradient buffer before the scratch replaces it)",
                "while building",
                gib(self.construction)
            )?;
        }
        write!(
            f,
            "  {:<22} {:>11}  (device needs {})",
            "peak",
            gib(self.peak()),
            gib(self.needed())
        )
    }
}

/// Parses `--gpu-memory GIB` (a positive number of GiB) into bytes.
pub fn parse_gib(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<f64>() {
        Ok(g) if g.is_finite() && g > 0.0 => Ok((g * (1u64 << 30) as f64) as usize),
        _ => Err(format!("`{s}` is not a positive number of GiB")),
    }
}
