//! The terms of a plan: the model's bytes from nopad-model's `memory` module, AdamW's moments and
//! master copy as the optimizer allocates them, the CUDA output head's workspace, the slack,
//! and what ZeRO sharding leaves a rank: its pieces of every trainable range, cut exactly as
//! [`crate::collective::aligned_shard`] cuts them for the optimizer (`optimizer/shard.rs`).

use nopad_backend::{Kind, MasterPrecision, StatePrecision};
use nopad_model::lora::memory::{lora_model_bytes, LoraShape};
use nopad_model::memory::{self, GradHolding};
use nopad_model::{Config, Layout, ParamGroup};

use super::{DeviceSizes, Modes, Plan, Trained};
use crate::collective::aligned_shard;

/// The cuBLASLt workspace the CUDA backend takes from its pool at start (its `WORKSPACE_BYTES`).
pub const CUDA_BLAS_WORKSPACE: usize = 32 << 20;
/// The CUDA output head's largest fp32 logits chunk, in elements (frozen: a LoRA run's), and in
/// rows (its `CHUNK_ELEMS`, `FROZEN_CHUNK_ELEMS` and `CHUNK_ROWS`).
const LM_HEAD_CHUNK_ELEMS: usize = 1 << 27;
const LM_HEAD_FROZEN_CHUNK_ELEMS: usize = 1 << 26;
const LM_HEAD_CHUNK_ROWS: usize = 8192;
/// Device memory outside the allocator's pool: the CUDA context, the loaded kernel modules and
/// the cuBLASLt handle (an estimate; `nvidia-smi` shows about this much for an idle context on
/// an H100). Counted as slack, not in the peak `peak_memory` measures.
pub const CUDA_CONTEXT_BYTES: usize = 600 << 20;
/// The caching allocator's slack over the live bytes: its size classes pad a request by up to
/// 1/8 and a request may take a cached block up to 1.5× its size; a step's buffers mostly
/// repeat, so 1/16 of the peak is the planning margin.
pub const CUDA_SLACK_DIVISOR: usize = 16;

/// One AdamW state (both moments) of `n` parameters: one buffer per moment, plus its block
/// scales in 8-bit.
fn state_bytes(n: usize, states: StatePrecision, dev: &DeviceSizes) -> usize {
    2 * match states {
        StatePrecision::F32 => dev.held(n, Kind::Master),
        StatePrecision::Bf16 => dev.held(n, Kind::Moment16),
        StatePrecision::Block8 => {
            dev.held(n, Kind::Code8)
                + dev.held(n.div_ceil(nopad_backend::codes::QUANT_BLOCK), Kind::Master)
        }
    }
}

/// The master copy of `n` parameters, when one is kept (none offloaded).
fn master_bytes(n: usize, modes: &Modes, dev: &DeviceSizes) -> usize {
    match modes.master {
        MasterPrecision::F32 if dev.master_per_param > 0 && !modes.offload => {
            memory::held(n * dev.master_per_param, &dev.acc)
        }
        _ => 0,
    }
}

/// The CUDA output head's scratch at its peak (every row a target row, the bound) and the
/// batch's integer arrays; see `lm_head.rs` in the CUDA backend.
/// A frozen head (`frozen`: a LoRA run) takes smaller chunks.
fn head_workspace(cfg: &Config, tokens: usize, frozen: bool, dev: &DeviceSizes) -> usize {
    if !dev.acc.pooled_scratch || tokens == 0 {
        return 0;
    }
    let (d, v, m) = (cfg.hidden_size, cfg.vocab_size, tokens);
    let elems = match frozen {
        true => LM_HEAD_FROZEN_CHUNK_ELEMS,
        false => LM_HEAD_CHUNK_ELEMS,
    };
    let max_rows = (elems / v).clamp(1, LM_HEAD_CHUNK_ROWS);
    let chunk = m.div_ceil(m.div_ceil(max_rows));
    let int = |len: usize| memory::held(len * 4, &dev.acc);
    // xc and dxc [M, D], logits [C, V] fp32, losses [M] fp32, rows and targets [M] i32;
    // tokens, targets, positions and cu_seqlens of the batch.
    2 * dev.held(m * d, Kind::Compute)
        + memory::held(chunk * v * 4, &dev.acc)
        + memory::held(m * 4, &dev.acc)
        + 2 * int(m)
        + 4 * int(tokens + 1)
        + CUDA_BLAS_WORKSPACE
}

/// What one rank holds of the optimizer's state (and, in stage 3, of the weights).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Share {
    /// AdamW's moments, bytes.
    moments: usize,
    /// The master copy, bytes.
    master: usize,
    /// Elements of this rank's pieces of every trainable range (the stage-2 accumulator's
    /// length, and in stage 3 the length of the weights it keeps).
    pieces: usize,
}

impl Share {
    /// Whole (stage 0): one state per part of the weight-decay split at `split` of `total`.
    fn whole(split: usize, total: usize, modes: &Modes, dev: &DeviceSizes) -> Self {
        let moments = match modes.offload {
            true => 0,
            false => [split, total - split]
                .into_iter()
                .filter(|&n| n > 0)
                .map(|n| state_bytes(n, modes.states, dev))
                .sum(),
        };
        Share {
            moments,
            master: master_bytes(total, modes, dev),
            pieces: total,
        }
    }

    /// Rank `rank`'s (stages 1 to 3): one state and one master copy per non-empty piece, each
    /// trainable range of each group cut into `modes.ranks` pieces starting on multiples of 256
    /// with 8-bit moments (so the quantisation blocks stay those of one rank).
    fn of_rank(groups: &[ParamGroup], rank: usize, modes: &Modes, dev: &DeviceSizes) -> Self {
        let align = match modes.states {
            StatePrecision::Block8 => nopad_backend::codes::QUANT_BLOCK,
            _ => 1,
        };
        let mut s = Share::default();
        for (range, _) in groups.iter().flat_map(ParamGroup::ranges) {
            let n = aligned_shard(rank, modes.ranks, range.len(), align).len();
            if n > 0 && !modes.offload {
                s.moments += state_bytes(n, modes.states, dev);
                s.master += master_bytes(n, modes, dev);
            }
            s.pieces += n;
        }
        s
    }
}

/// The plan of a step of `cfg` with `tokens` in its largest micro-batch. In a sharded run the
/// plan of the rank whose share is largest (rank 0, as pieces are cut), so it holds for every
/// rank.
pub fn plan(cfg: &Config, tokens: usize, modes: Modes, dev: &DeviceSizes) -> Plan {
    plan_at(cfg, tokens, modes, dev, None)
}

/// The plan of rank `rank` of a run of `modes.ranks` ranks (every rank's is the same at stage
/// 0): what that rank's measured peak is, with `tokens` in its own largest micro-batch.
pub fn plan_rank(
    cfg: &Config,
    tokens: usize,
    modes: Modes,
    dev: &DeviceSizes,
    rank: usize,
) -> Plan {
    plan_at(cfg, tokens, modes, dev, Some(rank))
}

/// The plan of rank `rank`, or of the rank with the largest share (None).
fn plan_at(
    cfg: &Config,
    tokens: usize,
    modes: Modes,
    dev: &DeviceSizes,
    rank: Option<usize>,
) -> Plan {
    let layout = Layout::new(cfg);
    let size = |k: Kind| dev.size(k);
    let mdev = memory::Device {
        size: &size,
        acc: dev.acc,
    };
    // What trains: the model's bytes, the trainable groups and where their weight-decay part
    // ends (every adapter matrix decays).
    let acts = (modes.recompute, modes.offload_acts);
    let lora_groups;
    let (model, groups, decay_end) = match modes.trained {
        Trained::Full => {
            let m = memory::model_bytes(cfg, &layout, tokens, acts, modes.grads(), &mdev);
            (m, &layout.groups, layout.decay_end)
        }
        Trained::Lora(shape) => {
            let m = lora_model_bytes(cfg, &shape, tokens, acts, &mdev);
            lora_groups = shape.layout(cfg);
            (m, &lora_groups.groups, lora_groups.total)
        }
    };
    let trained: usize = groups.iter().map(ParamGroup::len).sum();
    // Stage 3 keeps this rank's pieces of the weights and gathers two layers and the ends; a
    // LoRA run's frozen base is not sharded (its adapters are the trainable part).
    let sharded_weights = modes.shard >= 3 && modes.trained == Trained::Full;
    // From stage 2 an accumulator of this rank's pieces of the gradients; in stage 3 the
    // pieces of the weights.
    let by_pieces = |s: &Share| {
        let acc = match modes.shard {
            0 | 1 => 0,
            _ => dev.held(s.pieces, Kind::Grad),
        };
        let own = match sharded_weights {
            true => dev.held(s.pieces, Kind::Compute),
            false => 0,
        };
        (acc, own)
    };
    let share = match (modes.shard, rank) {
        (0, _) => Share::whole(decay_end, trained, &modes, dev),
        (_, Some(r)) => Share::of_rank(groups, r, &modes, dev),
        // Rank 0's as the pieces are cut; the largest, whatever the cut, is what must fit.
        (_, None) => (0..modes.ranks.max(1))
            .map(|r| Share::of_rank(groups, r, &modes, dev))
            .max_by_key(|s| {
                let (acc, own) = by_pieces(s);
                s.moments + s.master + acc + own
            })
            .unwrap_or_default(),
    };
    let (acc, own) = by_pieces(&share);
    let weights = match sharded_weights {
        true => {
            model.weights - dev.held(layout.total, Kind::Compute)
                + own
                + dev.held(memory::gathered_weights_len(&layout), Kind::Compute)
        }
        false => model.weights,
    };
    // `Model::new` allocates gradients as large as what trains; a model that keeps one group's
    // at a time frees them before step 1 (a sharded stage-3 model never allocates them).
    let construction = match (modes.grads(), sharded_weights) {
        (GradHolding::GroupScratch, false) => model.weights + dev.held(trained, Kind::Grad),
        _ => 0,
    };
    let mut p = Plan {
        modes,
        tokens,
        weights,
        master: share.master,
        moments: share.moments,
        gradients: model.grads + acc,
        activations: model.activations,
        workspace: head_workspace(cfg, tokens, modes.trained != Trained::Full, dev),
        slack: 0,
        construction,
        sampling: 0,
    };
    if dev.acc.pooled_scratch {
        p.slack = p.peak() / CUDA_SLACK_DIVISOR + CUDA_CONTEXT_BYTES;
    }
    p
}

/// Bytes of a run's samples on `dev`: the KV cache and buffers of generating `max_new` tokens
/// after prompts of `prompts` tokens (`nopad_model::generate::bytes`, what the model allocates
/// from), with the adapters of `lora` in a LoRA run.
pub fn sampling_bytes(
    cfg: &Config,
    lora: Option<&LoraShape>,
    prompts: &[usize],
    max_new: usize,
    dev: &DeviceSizes,
) -> usize {
    let size = |k: Kind| dev.size(k);
    let mdev = memory::Device {
        size: &size,
        acc: dev.acc,
    };
    let layout = lora.map(|l| l.layout(cfg));
    nopad_model::generate::bytes(cfg, layout.as_ref(), prompts, max_new, &mdev)
}
