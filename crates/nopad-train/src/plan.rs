//! The memory plan: the predicted peak of a training step by what it holds (weights, master,
//! moments, gradients, activations of the largest micro-batch, the output head's workspace and
//! the allocator's slack), before anything is allocated; which modes and micro-batch sizes fit
//! a device; and the refusal a run that cannot fit gets. Pure: a device is described by its
//! element sizes and [`Accounting`] ([`DeviceSizes`]), so `nopad stats` plans for a GPU it does
//! not have. The model's share comes from nopad-model's `memory` module, whose size functions
//! the model allocates from. `docs/MEMORY.md` explains the terms.

use std::fmt;
use std::sync::Mutex;

use nopad_backend::{Accounting, Backend, BackendError, Kind, MasterPrecision, StatePrecision};
use nopad_data::{Example, PackOptions, Strategy};
use nopad_model::lora::memory::{lora_model_bytes, LoraShape};
use nopad_model::memory::{self, GradHolding};
use nopad_model::{Config, Layout, ModelError, Recompute};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// The cuBLASLt workspace the CUDA backend takes from its pool at start (its `WORKSPACE_BYTES`).
pub const CUDA_BLAS_WORKSPACE: usize = 32 << 20;
/// The CUDA output head's largest fp32 logits chunk, in elements, and in rows (its
/// `CHUNK_ELEMS` and `CHUNK_ROWS`).
const LM_HEAD_CHUNK_ELEMS: usize = 1 << 27;
const LM_HEAD_CHUNK_ROWS: usize = 8192;
/// Device memory outside the allocator's pool: the CUDA context, the loaded kernel modules and
/// the cuBLASLt handle (an estimate; `nvidia-smi` shows about this much for an idle context on
/// an H100). Counted as slack, not in the peak `peak_memory` measures.
pub const CUDA_CONTEXT_BYTES: usize = 600 << 20;
/// The caching allocator's slack over the live bytes: its size classes pad a request by up to
/// 1/8 and a request may take a cached block up to 1.5× its size; a step's buffers mostly
/// repeat, so 1/16 of the peak is the planning margin.
pub const CUDA_SLACK_DIVISOR: usize = 16;

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
    /// What is trained.
    pub trained: Trained,
}

impl Modes {
    fn grads(&self) -> GradHolding {
        if self.optim_in_backward {
            GradHolding::GroupScratch
        } else if self.grad_aliasing {
            GradHolding::Aliased
        } else {
            GradHolding::Separate
        }
    }

    /// A short name for tables: `states/master/recompute[/aliased|/in-backward][ lora-rR
    /// (nf4)]`.
    pub fn label(&self) -> String {
        let g = match self.grads() {
            GradHolding::Separate => "",
            GradHolding::Aliased => " alias",
            GradHolding::GroupScratch => " in-bwd",
        };
        let t = match self.trained {
            Trained::Full => String::new(),
            Trained::Lora(s) => format!(" lora-r{} {}", s.r, s.base.name()),
        };
        format!(
            "{}/{}/{}{g}{t}{}",
            crate::states_name(self.states),
            crate::master_name(self.master),
            self.recompute,
            if self.offload { " offload" } else { "" }
        )
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
}

/// The predicted memory of a step, in bytes, by what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The settings planned for.
    pub modes: Modes,
    /// Tokens of the largest micro-batch.
    pub tokens: usize,
    /// Parameters (plus the RoPE table and the loss accumulator).
    pub weights: usize,
    /// fp32 master weights (beyond the parameters).
    pub master: usize,
    /// AdamW's two moments.
    pub moments: usize,
    /// Parameter gradients (with aliasing: beyond the activations they share memory with).
    pub gradients: usize,
    /// Saved activations and the layers' scratch.
    pub activations: usize,
    /// The output head's logits chunk and its row buffers, the uploaded batch, the cuBLASLt
    /// workspace (CUDA; the CPU's op scratch is host memory it does not count).
    pub workspace: usize,
    /// What the device needs beyond the peak: the allocator's padding and cache, the context.
    pub slack: usize,
}

impl Plan {
    /// The predicted peak (what `Backend::peak_memory` measures).
    pub fn peak(&self) -> usize {
        self.weights
            + self.master
            + self.moments
            + self.gradients
            + self.activations
            + self.workspace
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
        write!(
            f,
            "  {:<22} {:>11}  (device needs {})",
            "peak",
            gib(self.peak()),
            gib(self.needed())
        )
    }
}

/// AdamW's moments of `total` parameters as the optimizer allocates them: one state per part
/// of the weight-decay split at `split`, each moment one buffer (plus its block scales in 8-bit).
fn moment_bytes(split: usize, total: usize, states: StatePrecision, dev: &DeviceSizes) -> usize {
    let one = |len: usize, k: Kind| memory::held(len * dev.size(k), &dev.acc);
    [split, total - split]
        .into_iter()
        .filter(|&n| n > 0)
        .map(|n| {
            2 * match states {
                StatePrecision::F32 => one(n, Kind::Master),
                StatePrecision::Bf16 => one(n, Kind::Moment16),
                StatePrecision::Block8 => {
                    one(n, Kind::Code8)
                        + one(n.div_ceil(nopad_backend::codes::QUANT_BLOCK), Kind::Master)
                }
            }
        })
        .sum()
}

/// The CUDA output head's scratch at its peak (every row a target row, the bound) and the
/// batch's integer arrays; see `lm_head.rs` in the CUDA backend.
fn head_workspace(cfg: &Config, tokens: usize, dev: &DeviceSizes) -> usize {
    if !dev.acc.pooled_scratch || tokens == 0 {
        return 0;
    }
    let one = |len: usize, k: Kind| memory::held(len * dev.size(k), &dev.acc);
    let (d, v, m) = (cfg.hidden_size, cfg.vocab_size, tokens);
    let max_rows = (LM_HEAD_CHUNK_ELEMS / v).clamp(1, LM_HEAD_CHUNK_ROWS);
    let chunk = m.div_ceil(m.div_ceil(max_rows));
    let int = |len: usize| memory::held(len * 4, &dev.acc);
    // xc and dxc [M, D], logits [C, V] fp32, losses [M] fp32, rows and targets [M] i32;
    // tokens, targets, positions and cu_seqlens of the batch.
    2 * one(m * d, Kind::Compute)
        + memory::held(chunk * v * 4, &dev.acc)
        + memory::held(m * 4, &dev.acc)
        + 2 * int(m)
        + 4 * int(tokens + 1)
        + CUDA_BLAS_WORKSPACE
}

/// The plan of a step of `cfg` with `tokens` in its largest micro-batch.
pub fn plan(cfg: &Config, tokens: usize, modes: Modes, dev: &DeviceSizes) -> Plan {
    let layout = Layout::new(cfg);
    let size = |k: Kind| dev.size(k);
    let mdev = memory::Device {
        size: &size,
        acc: dev.acc,
    };
    // What trains: its count and where its weight-decay part ends (every adapter matrix decays).
    let (model, trained, decay_end) = match modes.trained {
        Trained::Full => {
            let m =
                memory::model_bytes(cfg, &layout, tokens, modes.recompute, modes.grads(), &mdev);
            (m, layout.total, layout.decay_end)
        }
        Trained::Lora(shape) => {
            let m = lora_model_bytes(cfg, &shape, tokens, modes.recompute, &mdev);
            let n = shape.layout(cfg).total;
            (m, n, n)
        }
    };
    let master = match modes.master {
        _ if modes.offload => 0,
        MasterPrecision::F32 if dev.master_per_param > 0 => {
            memory::held(trained * dev.master_per_param, &dev.acc)
        }
        _ => 0,
    };
    let workspace = head_workspace(cfg, tokens, dev);
    let mut p = Plan {
        modes,
        tokens,
        weights: model.weights,
        master,
        moments: if modes.offload {
            0
        } else {
            moment_bytes(decay_end, trained, modes.states, dev)
        },
        gradients: model.grads,
        activations: model.activations,
        workspace,
        slack: 0,
    };
    if dev.acc.pooled_scratch {
        p.slack = p.peak() / CUDA_SLACK_DIVISOR + CUDA_CONTEXT_BYTES;
    }
    p
}

/// The largest micro-batch, in tokens, whose plan fits in `budget` bytes (None: not even one
/// token fits). The plan grows with the tokens, so a bisection finds it.
pub fn largest_fitting(
    cfg: &Config,
    modes: Modes,
    dev: &DeviceSizes,
    budget: usize,
) -> Option<usize> {
    let fits = |t: usize| plan(cfg, t, modes, dev).needed() <= budget;
    if !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1usize, 1usize << 24);
    if fits(hi) {
        return Some(hi);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// The mode combinations worth showing: states × master × recompute none/full, each with the
/// gradients as `base` holds them, and optimizer-in-backward where `in_backward` says it can
/// run (one micro-batch per step, and the flag exists).
pub fn mode_grid(base: Modes, in_backward: bool) -> Vec<Modes> {
    let mut v = Vec::new();
    for states in [
        StatePrecision::F32,
        StatePrecision::Bf16,
        StatePrecision::Block8,
    ] {
        for master in [MasterPrecision::F32, MasterPrecision::None] {
            for recompute in [Recompute::None, Recompute::Full] {
                let m = Modes {
                    states,
                    master,
                    recompute,
                    optim_in_backward: false,
                    ..base
                };
                v.push(m);
                if in_backward {
                    v.push(Modes {
                        optim_in_backward: true,
                        ..m
                    });
                }
            }
        }
    }
    v
}

/// One row per mode of `grid`: its plan at `tokens` and the largest micro-batch that fits
/// `budget`, as a text table.
pub fn table(
    cfg: &Config,
    tokens: usize,
    grid: &[Modes],
    dev: &DeviceSizes,
    budget: usize,
) -> String {
    let mut s = format!(
        "{:<26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}\n",
        "states/master/recompute",
        "weights",
        "states",
        "grads",
        "acts",
        "peak",
        "needs",
        "largest micro-batch that fits"
    );
    let g = |b: usize| format!("{:.2}", b as f64 / (1u64 << 30) as f64);
    for &m in grid {
        let p = plan(cfg, tokens, m, dev);
        let fit = match largest_fitting(cfg, m, dev, budget) {
            Some(t) => format!("{t} tokens"),
            None => "none (the states alone do not fit)".into(),
        };
        s += &format!(
            "{:<26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {fit}\n",
            m.label(),
            g(p.weights),
            g(p.master + p.moments),
            g(p.gradients),
            g(p.activations),
            g(p.peak()),
            g(p.needed()),
        );
    }
    s
}

/// The refusal of a run whose plan does not fit `budget` bytes: the plan, the modes that fit
/// at this micro-batch and the largest micro-batch the current modes fit. `Ok` when it fits.
pub fn check_fits(
    cfg: &Config,
    tokens: usize,
    modes: Modes,
    dev: &DeviceSizes,
    budget: usize,
    in_backward: bool,
) -> std::result::Result<Plan, String> {
    let p = plan(cfg, tokens, modes, dev);
    if p.needed() <= budget {
        return Ok(p);
    }
    let mut msg = format!(
        "the run does not fit: it needs {} and the device has {}\n{p}\n",
        gib(p.needed()),
        gib(budget)
    );
    let fitting: Vec<String> = mode_grid(modes, in_backward)
        .into_iter()
        .filter(|&m| plan(cfg, tokens, m, dev).needed() <= budget)
        .map(|m| {
            format!(
                "{} ({})",
                flags(&m),
                gib(plan(cfg, tokens, m, dev).needed())
            )
        })
        .collect();
    if fitting.is_empty() {
        msg += "no mode fits a micro-batch of this size\n";
    } else {
        msg += &format!(
            "modes that fit at {tokens} tokens:\n  {}\n",
            fitting.join("\n  ")
        );
    }
    match largest_fitting(cfg, modes, dev, budget) {
        Some(t) => {
            msg += &format!(
                "with these modes, micro-batches of up to {t} tokens fit (lower --batch-size or --max-len)"
            )
        }
        None => msg += "with these modes not even one token fits",
    }
    Err(msg)
}

/// The command-line flags of a mode combination.
fn flags(m: &Modes) -> String {
    let mut s = format!(
        "--optim-states {} --master-weights {} --recompute {}",
        crate::states_name(m.states),
        crate::master_name(m.master),
        m.recompute
    );
    if m.optim_in_backward {
        s += " --optim-in-backward";
    }
    s
}

/// The largest micro-batch, in tokens, `examples` can make under `pack` in any epoch order:
/// `flatten` the sum of the `batch_size` longest examples, `pad` `batch_size` rows of the
/// longest, `concat` and `offline` `batch_size` rows of `max_len` (at most every token).
pub fn largest_micro_batch(examples: &[Example], pack: &PackOptions) -> usize {
    let bs = pack.batch_size.max(1);
    let mut lens: Vec<usize> = examples.iter().map(Example::len).collect();
    lens.sort_unstable_by(|a, b| b.cmp(a));
    let all: usize = lens.iter().sum();
    match pack.strategy {
        Strategy::Flatten => lens.iter().take(bs).sum(),
        Strategy::Pad => bs.min(lens.len()) * lens.first().copied().unwrap_or(0),
        Strategy::Concat | Strategy::Offline => (bs * pack.max_len).min(all),
    }
}

/// The modes of a training run (gradient aliasing is off in LoRA runs).
pub fn modes_of(tc: &TrainConfig) -> Modes {
    Modes {
        states: tc.adamw.states,
        master: tc.adamw.master,
        recompute: tc.recompute,
        grad_aliasing: tc.grad_aliasing
            && tc.grad_accum == 1
            && !tc.optim_in_backward
            && tc.lora.is_none(),
        optim_in_backward: tc.optim_in_backward,
        offload: tc.offload == crate::Placement::Host,
        trained: match &tc.lora {
            Some(l) => Trained::Lora(LoraShape::of(&l.settings, l.base)),
            None => Trained::Full,
        },
    }
}

/// The last plan [`check_device`] printed, for a run-time out-of-memory error to show beside
/// its own numbers: the error surfaces far from where the plan was made (inside
/// `nopad_train::train` or a benchmark), so the plan is kept here rather than threaded through.
static LAST_PLAN: Mutex<Option<String>> = Mutex::new(None);

/// The plan [`check_device`] printed last, if any.
pub fn last_plan() -> Option<String> {
    LAST_PLAN.lock().ok().and_then(|p| p.clone())
}

/// Plans a step of `cfg` with `tokens` in its largest micro-batch on `b`, prints the plan to
/// stderr, and refuses (before anything is allocated) when it does not fit the device's memory
/// (`gpu_memory` bytes, if given, else [`Backend::total_memory`]; no check where neither is
/// known). `in_backward`: whether optimizer-in-backward may be suggested.
pub fn check_device<B: Backend>(
    b: &B,
    cfg: &Config,
    tokens: usize,
    modes: Modes,
    gpu_memory: Option<usize>,
    in_backward: bool,
) -> Result<Plan> {
    let dev = DeviceSizes::of(b);
    let p = plan(cfg, tokens, modes, &dev);
    if let Ok(mut last) = LAST_PLAN.lock() {
        *last = Some(p.to_string());
    }
    if let Some(budget) = gpu_memory.or_else(|| b.total_memory()) {
        // The refusal carries the plan itself.
        check_fits(cfg, tokens, modes, &dev, budget, in_backward)
            .map_err(|msg| TrainError::Config(format!("memory plan: {msg}")))?;
    }
    eprintln!("nopad: {p}");
    Ok(p)
}

/// Whether an error is the device running out of memory (which the caller then shows beside
/// [`last_plan`]).
pub fn is_out_of_memory(e: &TrainError) -> bool {
    matches!(
        e,
        TrainError::Backend(BackendError::OutOfMemory { .. })
            | TrainError::Model(ModelError::Backend(BackendError::OutOfMemory { .. }))
    )
}

/// How a run packs its micro-batches (the session's and the plan's, one definition).
pub(crate) fn pack_options(tc: &TrainConfig, cfg: &Config) -> PackOptions {
    PackOptions {
        strategy: tc.strategy,
        batch_size: tc.batch_size,
        max_len: tc.max_len,
        pad_token_id: crate::session::pad_token_id(cfg),
        group_by_length: tc.group_by_length,
    }
}

/// Parses `--gpu-memory GIB` (a positive number of GiB) into bytes.
pub fn parse_gib(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<f64>() {
        Ok(g) if g.is_finite() && g > 0.0 => Ok((g * (1u64 << 30) as f64) as usize),
        _ => Err(format!("`{s}` is not a positive number of GiB")),
    }
}

/// Prints the last memory plan to stderr, beside an out-of-memory error the caller reports
/// (the error names what was being allocated; the plan says what the step holds).
pub fn print_plan_for_out_of_memory() {
    if let Some(p) = last_plan() {
        eprintln!("nopad: the device ran out of memory; the {p}");
    }
}
