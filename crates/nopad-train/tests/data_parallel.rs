//! Data parallelism on the CPU backend in f64: N ranks (threads over [`ThreadGroup`]), each
//! given its share of every step's micro-batches, against one rank given all of them with
//! gradient accumulation, for every sharding stage, moment precision and LoRA. In stage 3 each
//! rank holds only its pieces of the weights and gathers every group's from the others just
//! ahead of its use; its parameters here are its pieces gathered after the run.
//!
//! **The bound.** The ranks compute the same micro-batches' gradients bit for bit; what differs
//! is the order in which they are added: one rank accumulates micro-batch after micro-batch
//! (`((g1 + g2) + g3) + g4`), N ranks add each rank's sum in rank order (`(g1 + g2) + (g3 +
//! g4)`; in stage 2 `((0 + (g1 + g3)) + (g2 + g4))`). Each order's error is at most about
//! (k - 1) · u · Σ|gi| with u = 2^-53 and k ≤ 6 terms, so the gradients agree to ~1e-15 of
//! their terms' magnitude; the squared norm sums the same values in another grouping (pieces,
//! not whole runs). The loss sum is exchanged the same way. AdamW divides m by √v, so an
//! element's update keeps the gradient's relative error (its first step is sign(g), exact
//! unless g cancels to ~1e-15 of its terms, which the tolerance below covers through lr). So:
//! loss and norm agree within 1e-12 relative; each parameter within 1e-12 + lr · 1e-10
//! absolute after three steps (lr ≤ 1e-2; weights are O(1)). Measured: at most 5e-14. Not bit
//! for bit, because floating-point addition is not associative and the order is what changed.
//! (With `--master-weights none` the parameters are rounded to bf16 after each update and come
//! out identical.)

use std::thread;

use nopad_backend::cpu::Cpu;
use nopad_backend::Device;
use nopad_data::Batch;
use nopad_model::{Config, GroupKind, Model};
use nopad_train::{
    build_lora_model, train_step, weight_pieces, AdamWConfig, Collective, MasterPrecision,
    ModelSource, Optimizer, Placement, ShardStage, SingleProcess, StatePrecision, StepOutcome,
    ThreadGroup,
};

mod common;

type B = Cpu<f64>;

/// Loss and norm: relative agreement (see the module docs).
const REL: f64 = 1e-12;

/// Which model a run trains.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Two layers whose every range lies on a block of 256 (8-bit moments shard exactly).
    Full { tied: bool },
    /// LoRA adapters (r 4, no dropout) over the tiny preset.
    Lora,
}

/// The model of `kind`; `sharded`: rank `coll.rank()`'s pieces only (stage 3, cut for
/// moments in `states`).
fn model(b: &B, kind: Kind, sharded: Option<(&dyn Collective<B>, StatePrecision)>) -> Model<B> {
    match kind {
        Kind::Full { tied } => {
            let cfg = common::block_aligned_config(tied);
            let mut m = match sharded {
                Some((coll, states)) => {
                    let pieces = weight_pieces(&cfg, coll, states).unwrap();
                    Model::new_sharded(b, cfg.clone(), &pieces, coll.world_size()).unwrap()
                }
                None => Model::new(b, cfg.clone()).unwrap(),
            };
            let layout = m.layout.clone();
            nopad_model::weights::init_random(&cfg, &layout, 7, |o, v| m.write_params(b, o, v))
                .unwrap();
            m
        }
        Kind::Lora => {
            let lt = common::lora_train(4, 0.0);
            build_lora_model(b, &ModelSource::Preset("tiny".into()), 5, None, &lt)
                .unwrap()
                .0
        }
    }
}

/// Three steps of `per_step` micro-batches each (flatten, 3 examples a micro-batch).
fn steps(kind: Kind, per_step: usize) -> Vec<Vec<Batch>> {
    let vocab = match kind {
        Kind::Full { .. } => 64,
        Kind::Lora => Config::preset("tiny").unwrap().vocab_size,
    };
    let mut loader = common::flatten_loader(vocab, 64, per_step);
    (0..3)
        .map(|_| {
            let s = loader.next().unwrap();
            assert_eq!(s.batches.len(), per_step);
            s.batches
        })
        .collect()
}

fn adamw(states: StatePrecision, master: MasterPrecision) -> AdamWConfig {
    AdamWConfig {
        weight_decay: 0.1,
        // Low enough that clipping acts, so the global norm matters.
        max_grad_norm: Some(0.5),
        states,
        master,
        ..AdamWConfig::default()
    }
}

fn lr(step: usize) -> f64 {
    1e-2 / (step + 1) as f64
}

/// What a run leaves: each step's outcome, the trainable parameters (whole), the optimizer's
/// state elements and the parameter elements the rank allocated.
type Trace = (Vec<StepOutcome>, Vec<f64>, usize, usize);

/// The whole parameters of a stage-3 rank: every rank's pieces, summed over the ranks into
/// zeros elsewhere (exact).
fn gathered(b: &B, coll: &dyn Collective<B>, m: &Model<B>) -> Vec<f64> {
    let mut whole = vec![0.0; m.layout.total];
    let mine = b
        .read_f64(m.trainable(), 0..b.buf_len(m.trainable()))
        .unwrap();
    let mut at = 0;
    for p in m.pieces() {
        let n = p.own.len();
        whole[p.own].copy_from_slice(&mine[at..at + n]);
        at += n;
    }
    coll.all_reduce_host(&mut whole).unwrap();
    whole
}

/// One rank trains `shares` (its micro-batches of each step) over `coll`.
fn rank_run(
    coll: &dyn Collective<B>,
    kind: Kind,
    cfg: AdamWConfig,
    stage: ShardStage,
    shares: &[Vec<Batch>],
) -> Trace {
    let b = B::new();
    let sharded = (stage == ShardStage::Params).then_some((coll, cfg.states));
    let mut m = model(&b, kind, sharded);
    if stage.one_group_grads() && !matches!(kind, Kind::Lora) {
        m.set_update_in_backward(&b, true).unwrap();
    }
    let mut opt = Optimizer::for_rank(&b, &m, cfg, Placement::Device, (coll, stage)).unwrap();
    let outs = shares
        .iter()
        .enumerate()
        .map(|(step, batches)| {
            train_step(&b, coll, &mut m, &mut opt, batches, lr(step))
                .unwrap_or_else(|e| panic!("rank {}: {e}", coll.rank()))
        })
        .collect();
    let params = match m.is_sharded() {
        true => gathered(&b, coll, &m),
        false => b
            .read_f64(m.trainable(), 0..b.buf_len(m.trainable()))
            .unwrap(),
    };
    (outs, params, opt.state_elements(&b), m.param_elements(&b))
}

/// N ranks, rank r given `shares(r)` of every step.
fn ranks_run(
    n: usize,
    kind: Kind,
    cfg: AdamWConfig,
    stage: ShardStage,
    shares: impl Fn(usize) -> Vec<Vec<Batch>> + Sync,
) -> Vec<Trace> {
    thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(n)
            .into_iter()
            .map(|r| {
                let shares = &shares;
                s.spawn(move || rank_run(&r, kind, cfg, stage, &shares(r.rank())))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The largest absolute difference of two parameter vectors.
fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Checks every rank of `runs` against the one-rank `reference` within the bound, and that all
/// ranks hold the same parameters bit for bit.
fn check(what: &str, reference: &Trace, runs: &[Trace]) {
    for (r, run) in runs.iter().enumerate() {
        for (step, (a, o)) in reference.0.iter().zip(&run.0).enumerate() {
            assert!(a.applied && o.applied, "{what}: step {step} skipped");
            let rel = |x: f64, y: f64| (x - y).abs() / x.abs();
            assert!(
                rel(a.loss, o.loss) < REL,
                "{what} rank {r} step {step}: loss {} vs {}",
                a.loss,
                o.loss
            );
            assert!(
                rel(a.grad_norm, o.grad_norm) < REL,
                "{what} rank {r} step {step}: norm {} vs {}",
                a.grad_norm,
                o.grad_norm
            );
        }
        let d = max_diff(&reference.1, &run.1);
        assert!(
            d < 1e-12 + lr(0) * 1e-9,
            "{what} rank {r}: parameters differ by {d:e}"
        );
        assert_eq!(
            run.1, runs[0].1,
            "{what}: rank {r} holds other parameters than rank 0"
        );
    }
}

/// One rank with every micro-batch of each step.
fn reference(kind: Kind, cfg: AdamWConfig, all: &[Vec<Batch>]) -> Trace {
    rank_run(&SingleProcess, kind, cfg, ShardStage::Replicated, all)
}

/// Rank r of n takes micro-batches r·k..(r+1)·k of each step.
fn share(all: &[Vec<Batch>], r: usize, k: usize) -> Vec<Vec<Batch>> {
    all.iter().map(|s| s[r * k..(r + 1) * k].to_vec()).collect()
}

#[test]
fn n_ranks_equal_one_rank_at_the_same_global_batch_in_every_stage() {
    let modes = [
        (StatePrecision::F32, MasterPrecision::F32, false),
        (StatePrecision::Block8, MasterPrecision::F32, true),
        (StatePrecision::F32, MasterPrecision::None, false),
    ];
    for (states, master, tied) in modes {
        let kind = Kind::Full { tied };
        let cfg = adamw(states, master);
        for n in [2, 3] {
            let all = steps(kind, 2 * n);
            let want = reference(kind, cfg, &all);
            for stage in ShardStage::ALL {
                let what = format!(
                    "{states:?}/{master:?} tied={tied}, {n} ranks, stage {}",
                    stage.number()
                );
                let runs = ranks_run(n, kind, cfg, stage, |r| share(&all, r, 2));
                check(&what, &want, &runs);
            }
        }
    }
}

/// LoRA in stages 0 to 2; stage 3 (weights sharded) is refused, naming the stages that take it.
#[test]
fn lora_ranks_exchange_only_the_adapters_and_equal_one_rank() {
    let cfg = adamw(StatePrecision::F32, MasterPrecision::F32);
    let all = steps(Kind::Lora, 4);
    let want = reference(Kind::Lora, cfg, &all);
    for stage in ShardStage::ALL {
        if stage == ShardStage::Params {
            let b = B::new();
            let m = model(&b, Kind::Lora, None);
            let coll = (&SingleProcess as &dyn Collective<B>, stage);
            let e = Optimizer::for_rank(&b, &m, cfg, Placement::Device, coll).err();
            let e = e.expect("LoRA in stage 3 is refused").to_string();
            assert!(e.contains("a LoRA run's base is frozen"), "{e}");
            assert!(e.contains("use --shard 0, 1 or 2"), "{e}");
            continue;
        }
        let runs = ranks_run(2, Kind::Lora, cfg, stage, |r| share(&all, r, 2));
        check(&format!("LoRA stage {}", stage.number()), &want, &runs);
    }
}

#[test]
fn uneven_shares_with_empty_micro_batches_equal_one_rank() {
    let kind = Kind::Full { tied: false };
    let cfg = adamw(StatePrecision::F32, MasterPrecision::F32);
    let all = steps(kind, 5);
    let want = reference(kind, cfg, &all);
    // Three ranks of two micro-batches: the last has one empty micro-batch.
    let three = |r: usize| -> Vec<Vec<Batch>> {
        all.iter()
            .map(|s| {
                let mut mine = s[(2 * r).min(5)..(2 * r + 2).min(5)].to_vec();
                mine.resize(2, Batch::default());
                mine
            })
            .collect()
    };
    // Two ranks of five: the second has nothing at all.
    let two = |r: usize| -> Vec<Vec<Batch>> {
        all.iter()
            .map(|s| match r {
                0 => s.clone(),
                _ => vec![Batch::default(); 5],
            })
            .collect()
    };
    for stage in ShardStage::ALL {
        check(
            &format!("3 ranks, one empty micro-batch, stage {}", stage.number()),
            &want,
            &ranks_run(3, kind, cfg, stage, three),
        );
        check(
            &format!("2 ranks, one empty share, stage {}", stage.number()),
            &want,
            &ranks_run(2, kind, cfg, stage, two),
        );
    }
}

#[test]
fn sharded_state_per_rank_is_a_one_over_n_share() {
    let kind = Kind::Full { tied: false };
    for states in [StatePrecision::F32, StatePrecision::Block8] {
        let cfg = adamw(states, MasterPrecision::F32);
        let all = steps(kind, 4);
        let one_step = &all[..1];
        let whole = reference(kind, cfg, one_step).2;
        let m = model(&B::new(), kind, None);
        let params = m.layout.total;
        let ranges: usize = m.layout.groups.iter().map(|g| g.ranges().count()).sum();
        assert_eq!(
            whole,
            2 * params,
            "{states:?}: two moments over every parameter"
        );
        for n in [2, 4] {
            for stage in [ShardStage::States, ShardStage::Grads, ShardStage::Params] {
                let runs = ranks_run(n, kind, cfg, stage, |r| share(one_step, r, 4 / n));
                let held: Vec<usize> = runs.iter().map(|t| t.2).collect();
                // Stages 2 and 3 add the gradient pieces: one more share of the parameters.
                let per = if stage.one_group_grads() { 3 } else { 2 };
                let total: usize = held.iter().sum();
                assert_eq!(
                    total,
                    per * params,
                    "{states:?} stage {} {n} ranks: {held:?}",
                    stage.number()
                );
                for h in &held {
                    let share = per * params / n;
                    // Each range's pieces differ from 1/N by less than a block each.
                    assert!(
                        h.abs_diff(share) <= per * 256 * ranges,
                        "{states:?} stage {} {n} ranks: {held:?}",
                        stage.number()
                    );
                }
                // Stage 3's parameters: this rank's pieces (1/N) plus two layers, the
                // embedding, the head and the norm gathered; below, every parameter.
                let size = |k| m.layout.group(k).map_or(0, |g| g.len());
                let gathered = 2 * size(GroupKind::Layer(0))
                    + size(GroupKind::Embedding)
                    + size(GroupKind::Head)
                    + size(GroupKind::FinalNorm);
                let weights: Vec<usize> = runs.iter().map(|t| t.3).collect();
                if stage != ShardStage::Params {
                    assert!(weights.iter().all(|&w| w == params), "{weights:?}");
                    continue;
                }
                let pieces: Vec<usize> = weights.iter().map(|w| w - gathered).collect();
                assert_eq!(
                    pieces.iter().sum::<usize>(),
                    params,
                    "{n} ranks: {weights:?}"
                );
                for p in &pieces {
                    assert!(p.abs_diff(params / n) <= 256 * ranges, "{pieces:?}");
                }
            }
        }
    }
}

/// With more layers than the two slots, a stage-3 rank holds far less than the model.
#[test]
fn stage_3_holds_its_pieces_and_two_layers_not_the_model() {
    let mut cfg = common::block_aligned_config(false);
    cfg.num_hidden_layers = 8;
    let b = B::new();
    for n in [2, 4] {
        let ranks = ThreadGroup::new(n);
        let held: Vec<usize> = ranks
            .iter()
            .map(|r| {
                let pieces = weight_pieces::<B>(&cfg, r, StatePrecision::F32).unwrap();
                let m = Model::new_sharded(&b, cfg.clone(), &pieces, n).unwrap();
                m.param_elements(&b)
            })
            .collect();
        let layout = nopad_model::Layout::new(&cfg);
        let size = |k| layout.group(k).map_or(0, |g| g.len());
        let gathered = 2 * size(GroupKind::Layer(0))
            + size(GroupKind::Embedding)
            + size(GroupKind::Head)
            + size(GroupKind::FinalNorm);
        let ranges: usize = layout.groups.iter().map(|g| g.ranges().count()).sum();
        let own: Vec<usize> = held.iter().map(|h| h - gathered).collect();
        assert_eq!(
            own.iter().sum::<usize>(),
            layout.total,
            "{n} ranks: {held:?}"
        );
        for o in &own {
            assert!(o.abs_diff(layout.total / n) <= ranges, "{n} ranks: {own:?}");
        }
        // Two of eight layers and 1/N of the rest.
        assert!(held[0] < layout.total / 2 + layout.total / n, "{held:?}");
    }
}

/// A rank whose deferred collectives really are deferred: the buffer holds NaN from the call
/// until `settle`, which writes the sum back. A step that read a gradient before settling would
/// train on NaN.
struct Deferring {
    inner: nopad_train::ThreadRank,
    /// (the caller's buffer, its length, the sum to write back at settle).
    pending: std::sync::Mutex<Vec<(usize, usize, Vec<f64>)>>,
    deferred: std::sync::atomic::AtomicUsize,
}

impl Deferring {
    fn defer(
        &self,
        buf: &mut [f64],
        n: usize,
        op: impl FnOnce(&mut [f64]) -> nopad_train::Result<()>,
    ) -> nopad_train::Result<()> {
        let mut sum = buf.to_vec();
        op(&mut sum[..n])?;
        buf.iter_mut().for_each(|x| *x = f64::NAN);
        let at = buf.as_mut_ptr() as usize;
        self.pending.lock().unwrap().push((at, buf.len(), sum));
        self.deferred
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl Collective<B> for Deferring {
    fn rank(&self) -> usize {
        Collective::<B>::rank(&self.inner)
    }
    fn world_size(&self) -> usize {
        Collective::<B>::world_size(&self.inner)
    }
    fn all_reduce_host(&self, vals: &mut [f64]) -> nopad_train::Result<()> {
        Collective::<B>::all_reduce_host(&self.inner, vals)
    }
    fn all_reduce(&self, b: &B, buf: &mut [f64], n: usize) -> nopad_train::Result<()> {
        self.inner.all_reduce(b, buf, n)
    }
    fn reduce_scatter(&self, b: &B, buf: &mut [f64], n: usize) -> nopad_train::Result<()> {
        self.inner.reduce_scatter(b, buf, n)
    }
    fn all_gather(&self, b: &B, buf: &mut [f64], n: usize) -> nopad_train::Result<()> {
        self.inner.all_gather(b, buf, n)
    }
    fn shard(&self, n: usize) -> std::ops::Range<usize> {
        Collective::<B>::shard(&self.inner, n)
    }
    fn all_reduce_deferred(&self, b: &B, buf: &mut [f64], n: usize) -> nopad_train::Result<()> {
        self.defer(buf, n, |s| self.inner.all_reduce(b, s, n))
    }
    fn reduce_scatter_deferred(&self, b: &B, buf: &mut [f64], n: usize) -> nopad_train::Result<()> {
        self.defer(buf, n, |s| self.inner.reduce_scatter(b, s, n))
    }
    fn settle(&self, _b: &B) -> nopad_train::Result<()> {
        for (at, len, sum) in self.pending.lock().unwrap().drain(..) {
            // SAFETY: the trait's contract: a deferred buffer is neither freed nor moved before
            // `settle` (what this test checks the step keeps to).
            let buf = unsafe { std::slice::from_raw_parts_mut(at as *mut f64, len) };
            buf.copy_from_slice(&sum);
        }
        Ok(())
    }
}

/// Stages 0 and 1 exchange gradients deferred, and the step settles before the update reads
/// them: with collectives that leave NaN until settle, the run equals the synchronous one bit for
/// bit (and did defer).
#[test]
fn deferred_exchanges_are_settled_before_the_update() {
    let kind = Kind::Full { tied: false };
    let cfg = adamw(StatePrecision::F32, MasterPrecision::F32);
    let all = steps(kind, 4);
    for stage in [ShardStage::Replicated, ShardStage::States] {
        let plain = ranks_run(2, kind, cfg, stage, |r| share(&all, r, 2));
        let deferred: Vec<(Trace, usize)> = thread::scope(|s| {
            let hs: Vec<_> = ThreadGroup::new(2)
                .into_iter()
                .map(|inner| {
                    let all = &all;
                    s.spawn(move || {
                        let r = inner.rank();
                        let c = Deferring {
                            inner,
                            pending: Default::default(),
                            deferred: Default::default(),
                        };
                        let t = rank_run(&c, kind, cfg, stage, &share(all, r, 2));
                        (t, c.deferred.into_inner())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, ((d, calls), p)) in deferred.iter().zip(&plain).enumerate() {
            let what = format!("stage {} rank {r}", stage.number());
            assert!(*calls > 0, "{what}: nothing was deferred");
            assert_eq!(d.0, p.0, "{what}: step outcomes");
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&d.1), bits(&p.1), "{what}: parameters");
        }
    }
}
