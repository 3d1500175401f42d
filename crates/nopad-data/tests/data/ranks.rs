//! Data parallelism: N loaders, one per rank, against the one-rank loader of the same global
//! batch (`grad_accum = N × ga`): the same examples and positions, exactly `ga` micro-batches on
//! every rank, exact resume, and balanced costs. Every assertion names its seed.

use std::sync::Arc;

use nopad_data::{
    imbalance, Batch, DataParallel, Example, Loader, LoaderOptions, RankCost, Step, Strategy,
};

use crate::props::loader_opts;
use crate::util::traceable;

const PAD: i32 = 0;

fn rank_opts(strategy: Strategy, ga: usize, ranks: usize, rank: usize, seed: u64) -> LoaderOptions {
    LoaderOptions {
        parallel: DataParallel::new(ranks, rank),
        ..loader_opts(strategy, 3, ga, 48, seed)
    }
}

fn run(data: &Arc<Vec<Example>>, opts: LoaderOptions, steps: usize) -> Vec<Step> {
    Loader::new(Arc::clone(data), opts)
        .expect("loader")
        .take(steps)
        .collect()
}

/// Every attention segment of the batches as its (token, target) pairs, padding dropped,
/// sorted: the multiset of what was trained, whatever the layout (pad rows, flattened examples,
/// offline rows, concat rows).
fn segments<'a>(batches: impl IntoIterator<Item = &'a Batch>) -> Vec<Vec<(i32, i32)>> {
    let mut all = vec![];
    for b in batches {
        b.validate().expect("a valid batch");
        for w in b.cu_seqlens.windows(2) {
            let (s, e) = (w[0] as usize, w[1] as usize);
            let seg: Vec<(i32, i32)> = (s..e)
                .filter(|&t| b.tokens[t] != PAD)
                .map(|t| (b.tokens[t], b.targets[t]))
                .collect();
            all.push(seg);
        }
    }
    all.sort();
    all
}

/// Units of a batch the strategy caps at `batch_size`: examples, or rows.
fn units(b: &Batch, strategy: Strategy) -> usize {
    match strategy {
        Strategy::Pad | Strategy::Flatten => b.stats.examples,
        Strategy::Concat | Strategy::Offline => b.stats.rows,
    }
}

#[test]
fn ranks_split_the_one_rank_global_step_exactly() {
    let mut empty_micro_batches = 0;
    for strategy in Strategy::ALL {
        for ranks in 2..=4 {
            for seed in [3u64, 4] {
                let ga = 1 + seed as usize % 2;
                let data = Arc::new(traceable(seed, 61 + 7 * ranks, 48));
                let one = Loader::new(
                    Arc::clone(&data),
                    rank_opts(strategy, ranks * ga, 1, 0, seed),
                )
                .unwrap();
                let spe = one.steps_per_epoch();
                let total = 2 * spe + 1;
                let one: Vec<Step> = one.take(total).collect();
                let shares: Vec<Vec<Step>> = (0..ranks)
                    .map(|r| run(&data, rank_opts(strategy, ga, ranks, r, seed), total))
                    .collect();
                let case = format!("{strategy} ranks {ranks} ga {ga} seed {seed}");
                for (k, want) in one.iter().enumerate() {
                    let mine: Vec<&Step> = shares.iter().map(|s| &s[k]).collect();
                    for (r, s) in mine.iter().enumerate() {
                        assert_eq!(s.batches.len(), ga, "{case} step {k} rank {r}");
                        assert_eq!(s.position_after, want.position_after, "{case} step {k}");
                        assert_eq!(s.epoch, want.epoch, "{case} step {k}");
                        assert_eq!(s.rank_costs, mine[0].rank_costs, "{case} step {k}");
                        assert_eq!(s.global, mine[0].global, "{case} step {k}");
                        assert_eq!(s.rank_costs[r], RankCost::of(&s.stats()), "{case} {k} {r}");
                        for b in &s.batches {
                            assert!(units(b, strategy) <= 3, "{case} step {k}: too many");
                            empty_micro_batches += usize::from(b.is_empty());
                        }
                    }
                    // Alone, the step is its own global step.
                    assert_eq!(want.global, want.stats(), "{case} step {k}");
                    assert_eq!(want.rank_costs, [RankCost::of(&want.stats())]);
                    assert_eq!(want.imbalance(), 1.0);
                    let g = mine[0].global;
                    assert_eq!(g.target_tokens, want.target_tokens(), "{case} step {k}");
                    assert_eq!(g.real_tokens, want.stats().real_tokens, "{case} step {k}");
                    assert_eq!(g.examples, want.stats().examples, "{case} step {k}");
                    if matches!(strategy, Strategy::Concat | Strategy::Offline) {
                        assert_eq!(g.rows, want.stats().rows, "{case} step {k}");
                    }
                    assert!(
                        segments(mine.iter().flat_map(|s| &s.batches)) == segments(&want.batches),
                        "{case} step {k}: the ranks' union is not the one-rank step"
                    );
                }
            }
        }
    }
    // The epochs' short last steps left some ranks without work: those paths ran.
    assert!(empty_micro_batches > 0, "no rank ever ran short");
}

#[test]
fn every_rank_counts_the_same_steps_and_the_memory_plan_covers_them_all() {
    for strategy in Strategy::ALL {
        let seed = 8;
        let data = Arc::new(traceable(seed, 95, 48));
        let ranks = 3;
        let spe = nopad_data::steps_per_epoch(
            Arc::clone(&data),
            &rank_opts(strategy, ranks * 2, 1, 0, seed),
        )
        .unwrap();
        let steps = 2 * spe + 1;
        let mut largest = 0;
        for r in 0..ranks {
            let opts = rank_opts(strategy, 2, ranks, r, seed);
            let loader = Loader::new(Arc::clone(&data), opts.clone()).unwrap();
            assert_eq!(loader.steps_per_epoch(), spe, "{strategy} rank {r}");
            let lens = loader.take(steps).flat_map(|s| s.batches).map(|b| b.len());
            largest = lens.fold(largest, usize::max);
        }
        for r in 0..ranks {
            let opts = rank_opts(strategy, 2, ranks, r, seed);
            let got = nopad_data::largest_micro_batch(Arc::clone(&data), &opts, steps as u64);
            assert_eq!(
                got.unwrap(),
                largest,
                "{strategy} rank {r}: the max over ranks"
            );
        }
    }
}

#[test]
fn a_rank_resumed_mid_epoch_gets_the_same_shares() {
    for strategy in Strategy::ALL {
        let seed = 12;
        let data = Arc::new(traceable(seed, 80, 48));
        for rank in 0..3 {
            let opts = rank_opts(strategy, 2, 3, rank, seed);
            let total = 2 * Loader::new(Arc::clone(&data), opts.clone())
                .unwrap()
                .steps_per_epoch()
                + 2;
            let whole = run(&data, opts.clone(), total);
            for k in [0, total / 3, total / 2] {
                let mut o = opts.clone();
                o.start = whole[k].position_after.clone();
                let resumed = run(&data, o, total - k - 1);
                assert!(
                    resumed == whole[k + 1..],
                    "{strategy} rank {rank}: resume after step {k} diverges"
                );
            }
        }
    }
}

/// Round-robin is what a split that ignores lengths gives: the one-rank step's micro-batches
/// dealt to ranks in turn.
fn round_robin(one: &Step, ranks: usize) -> Vec<RankCost> {
    (0..ranks)
        .map(|r| {
            let mut st = nopad_data::BatchStats::default();
            for b in one.batches.iter().skip(r).step_by(ranks) {
                st += b.stats;
            }
            RankCost::of(&st)
        })
        .collect()
}

/// Measured on this seeded set (per full step, max/mean of `tokens + Σlen²/4096`):
/// flatten: round-robin mean 1.516, worst 1.968; balanced mean 1.015, worst 1.066.
/// pad: round-robin mean 1.633; balanced mean 1.268 (each rank's micro-batches pad to their
/// longest example, which no split with equal counts can even out).
/// offline: round-robin mean 1.020; balanced mean 1.004, worst 1.015 (rows are nearly full).
#[test]
fn balancing_beats_round_robin_on_skewed_lengths() {
    let seed = 31;
    let c = nopad_data::DEFAULT_ATTENTION_LEN;
    // A quarter of the examples up to 2048 tokens, the rest up to 512.
    let data = Arc::new(traceable(seed, 1000, 2048));
    let (ranks, ga, bs) = (4, 2, 4);
    // (strategy, round-robin mean at least, balanced mean at most, balanced worst at most)
    let bounds = [
        (Strategy::Flatten, 1.4, 1.05, 1.10),
        (Strategy::Pad, 1.5, 1.32, 1.7),
        (Strategy::Offline, 1.01, 1.01, 1.03),
    ];
    for (strategy, rr_min, mean_max, worst_max) in bounds {
        let opts = |ga, ranks, rank| LoaderOptions {
            parallel: DataParallel::new(ranks, rank),
            ..loader_opts(strategy, bs, ga, 2048, seed)
        };
        // Full steps only: an epoch's short last step is balanced as well as it can be.
        let one = crate::props::one_epoch(&data, opts(ranks * ga, 1, 0), seed);
        let full = one.len() - 1;
        let rr: Vec<f64> = one[..full]
            .iter()
            .map(|s| imbalance(&round_robin(s, ranks), c))
            .collect();
        let bal: Vec<f64> = run(&data, opts(ga, ranks, 0), full)
            .iter()
            .map(Step::imbalance)
            .collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let worst = bal.iter().copied().fold(0.0, f64::max);
        let what = format!(
            "seed {seed} {strategy}: round-robin mean {:.3}; balanced mean {:.3} worst {worst:.3}",
            mean(&rr),
            mean(&bal),
        );
        assert!(
            mean(&rr) >= rr_min,
            "{what}: round-robin is balanced already"
        );
        assert!(mean(&bal) <= mean_max && worst <= worst_max, "{what}");
    }
}

#[test]
fn a_rank_outside_the_world_is_refused() {
    let data = Arc::new(traceable(1, 10, 48));
    for (ranks, rank) in [(2, 2), (0, 0), (3, 7)] {
        let err = Loader::new(
            Arc::clone(&data),
            rank_opts(Strategy::Flatten, 1, ranks, rank, 1),
        )
        .err()
        .expect("an error")
        .to_string();
        assert!(
            err.contains(&format!("rank {rank} of {ranks} ranks")),
            "{err}"
        );
    }
    let mut o = rank_opts(Strategy::Flatten, 1, 2, 0, 1);
    o.parallel.attention_len = 0;
    assert!(Loader::new(Arc::clone(&data), o).is_err());
}
