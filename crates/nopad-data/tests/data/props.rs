//! Property tests over random length sets: what each strategy must preserve, epoch after epoch,
//! and exact resume. Every assertion names its seed.

use std::sync::Arc;

use nopad_data::{
    eval_batches, Batch, DataPosition, Example, Loader, LoaderOptions, PackOptions, Step, Strategy,
    IGNORE_INDEX,
};

use crate::util::{trace, traceable};

const PAD: i32 = 0;

pub(crate) fn loader_opts(
    strategy: Strategy,
    bs: usize,
    ga: usize,
    max_len: usize,
    seed: u64,
) -> LoaderOptions {
    LoaderOptions {
        pack: PackOptions {
            strategy,
            batch_size: bs,
            max_len,
            pad_token_id: PAD,
            group_by_length: false,
        },
        grad_accum: ga,
        seed,
        shuffle: true,
        start: DataPosition::default(),
        prefetch: 2,
        parallel: nopad_data::DataParallel::ALONE,
    }
}

fn segments(b: &Batch) -> impl Iterator<Item = (usize, usize)> + '_ {
    b.cu_seqlens
        .windows(2)
        .map(|w| (w[0] as usize, w[1] as usize))
}

/// Checks one isolating batch segment by segment against the examples it came from; returns the
/// example index of each segment.
fn check_isolated(b: &Batch, data: &[Example], strategy: Strategy, seed: u64) -> Vec<usize> {
    b.validate().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let mut ids = vec![];
    for (start, end) in segments(b) {
        let (i, t0) = trace(b.tokens[start]);
        assert_eq!(
            t0, 0,
            "seed {seed}: segment at {start} does not start an example"
        );
        let e = &data[i];
        let len = e.len();
        match strategy {
            Strategy::Pad => {
                assert!(
                    end - start >= len,
                    "seed {seed}: row shorter than its example"
                );
                assert!(b.tokens[start + len..end].iter().all(|&t| t == PAD));
            }
            _ => assert_eq!(end - start, len, "seed {seed}: segment is not one example"),
        }
        assert_eq!(
            &b.tokens[start..start + len],
            &e.input_ids[..],
            "seed {seed}"
        );
        assert_eq!(
            &b.targets[start..start + len - 1],
            &e.labels[1..],
            "seed {seed}"
        );
        assert!(b.targets[start + len - 1..end]
            .iter()
            .all(|&t| t == IGNORE_INDEX));
        let want: Vec<i32> = (0..(end - start) as i32).collect();
        assert_eq!(
            &b.position_ids[start..end],
            &want[..],
            "seed {seed}: positions"
        );
        ids.push(i);
    }
    assert_eq!(b.stats.examples, ids.len(), "seed {seed}");
    assert_eq!(
        b.stats.real_tokens + b.stats.pad_tokens,
        b.len(),
        "seed {seed}"
    );
    let targets = b.targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    assert_eq!(b.stats.target_tokens, targets, "seed {seed}");
    let sq: u64 = segments(b).map(|(s, e)| ((e - s) * (e - s)) as u64).sum();
    assert_eq!(b.stats.sum_len_sq, sq, "seed {seed}");
    ids
}

/// The steps of epoch 0 (and checks that the next step starts epoch 1).
pub(crate) fn one_epoch(data: &Arc<Vec<Example>>, opts: LoaderOptions, seed: u64) -> Vec<Step> {
    let mut loader = Loader::new(Arc::clone(data), opts).expect("loader");
    let spe = loader.steps_per_epoch();
    let steps: Vec<Step> = loader.by_ref().take(spe).collect();
    assert!(
        steps.iter().all(|s| s.epoch == 0),
        "seed {seed}: epoch 0 has more steps"
    );
    let next = loader.next().expect("endless");
    assert_eq!(
        next.epoch, 1,
        "seed {seed}: steps_per_epoch {spe} is too large"
    );
    steps
}

#[test]
fn isolating_strategies_train_every_target_once_per_epoch() {
    for seed in 0..12u64 {
        let n = 1 + (seed as usize * 37) % 90;
        let max_len = [16, 64, 100][seed as usize % 3];
        let data = Arc::new(traceable(seed, n, max_len));
        let want_targets: usize = data.iter().map(|e| e.target_tokens()).sum();
        for strategy in [Strategy::Pad, Strategy::Flatten, Strategy::Offline] {
            let (bs, ga) = (1 + seed as usize % 5, 1 + seed as usize % 3);
            let steps = one_epoch(&data, loader_opts(strategy, bs, ga, max_len, seed), seed);
            let mut seen = vec![0usize; n];
            let mut targets = 0;
            for step in &steps {
                assert!(step.batches.len() <= ga && !step.batches.is_empty());
                targets += step.target_tokens();
                for b in &step.batches {
                    for i in check_isolated(b, &data, strategy, seed) {
                        seen[i] += 1;
                    }
                    if strategy == Strategy::Offline {
                        assert!(b.stats.rows <= bs, "seed {seed}: too many rows");
                        assert!(b.stats.real_tokens <= b.stats.rows * max_len);
                    } else {
                        assert!(b.stats.examples <= bs, "seed {seed}");
                    }
                    if strategy == Strategy::Flatten {
                        assert_eq!((b.stats.rows, b.stats.pad_tokens), (1, 0));
                    }
                }
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "seed {seed} {strategy}: {seen:?}"
            );
            assert_eq!(targets, want_targets, "seed {seed} {strategy}");
        }
    }
}

#[test]
fn pad_and_flatten_carry_the_same_examples_per_step() {
    for seed in 0..6u64 {
        let data = Arc::new(traceable(seed, 200, 128));
        for group in [false, true] {
            let per_step = |strategy| -> Vec<Vec<Vec<usize>>> {
                let mut o = loader_opts(strategy, 4, 2, 128, seed);
                o.pack.group_by_length = group;
                one_epoch(&data, o, seed)
                    .iter()
                    .map(|s| {
                        s.batches
                            .iter()
                            .map(|b| check_isolated(b, &data, strategy, seed))
                            .collect()
                    })
                    .collect()
            };
            let (pad, flat) = (per_step(Strategy::Pad), per_step(Strategy::Flatten));
            assert_eq!(pad.len(), 200usize.div_ceil(4).div_ceil(2));
            assert_eq!(pad, flat, "seed {seed}, group_by_length {group}");
        }
    }
}

#[test]
fn group_by_length_reduces_padding() {
    let data = Arc::new(traceable(3, 400, 200));
    let pads = |group| {
        let mut o = loader_opts(Strategy::Pad, 8, 1, 200, 3);
        o.pack.group_by_length = group;
        let steps = one_epoch(&data, o, 3);
        steps.iter().map(|s| s.stats().pad_tokens).sum::<usize>()
    };
    let (plain, grouped) = (pads(false), pads(true));
    assert!(grouped * 2 < plain, "grouped {grouped} vs plain {plain}");
}

#[test]
fn concat_streams_every_token_once_and_warns() {
    for seed in 0..6u64 {
        let data = Arc::new(traceable(seed, 60, 32));
        let opts = loader_opts(Strategy::Concat, 3, 2, 32, seed);
        assert!(!Loader::new(Arc::clone(&data), opts.clone())
            .unwrap()
            .warnings()
            .is_empty());
        let steps = one_epoch(&data, opts, seed);
        let mut seen = vec![0usize; data.iter().map(|e| e.len()).sum()];
        let offsets: Vec<usize> = data
            .iter()
            .scan(0, |acc, e| {
                let o = *acc;
                *acc += e.len();
                Some(o)
            })
            .collect();
        for b in steps.iter().flat_map(|s| &s.batches) {
            b.validate().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert!(b.n_seqs() <= 3 && b.max_seqlen <= 32);
            for &t in &b.tokens {
                let (i, p) = trace(t);
                seen[offsets[i] + p] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "seed {seed}");
    }
}

#[test]
fn resuming_from_any_step_continues_the_same_run() {
    for strategy in Strategy::ALL {
        for seed in [1u64, 2] {
            let data = Arc::new(traceable(seed, 70, 48));
            let opts = loader_opts(strategy, 3, 2, 48, seed);
            let loader = Loader::new(Arc::clone(&data), opts.clone()).unwrap();
            let total = 3 * loader.steps_per_epoch() + 2;
            let run: Vec<Step> = loader.take(total).collect();
            assert!(
                run.last().unwrap().epoch >= 2,
                "{strategy} seed {seed}: 3 epochs"
            );
            for k in (0..total - 1).step_by(3) {
                let json = serde_json::to_string(&run[k].position_after).unwrap();
                let mut o = opts.clone();
                o.start = serde_json::from_str(&json).unwrap();
                let resumed: Vec<Step> = Loader::new(Arc::clone(&data), o)
                    .unwrap()
                    .take(total - k - 1)
                    .collect();
                assert!(
                    resumed == run[k + 1..],
                    "{strategy} seed {seed}: resume after step {k} diverges"
                );
            }
            // Different epochs shuffle differently.
            let first = |e: u64| {
                run.iter().find(|s| s.epoch == e).unwrap().batches[0]
                    .tokens
                    .clone()
            };
            assert_ne!(first(0), first(1), "{strategy} seed {seed}");
        }
    }
}

#[test]
fn eval_batches_cover_every_example_once_in_file_order() {
    let data = traceable(9, 23, 40);
    for strategy in [Strategy::Pad, Strategy::Flatten] {
        let batches = eval_batches(&data, &PackOptions::new(strategy, 4, 40));
        assert_eq!(batches.len(), 6);
        let order: Vec<usize> = batches
            .iter()
            .flat_map(|b| check_isolated(b, &data, strategy, 9))
            .collect();
        assert_eq!(order, (0..23).collect::<Vec<_>>());
    }
}

#[test]
fn loader_rejects_what_it_cannot_pack() {
    let data = Arc::new(traceable(4, 10, 40));
    let err = |o: LoaderOptions| {
        Loader::new(Arc::clone(&data), o)
            .err()
            .expect("an error")
            .to_string()
    };
    let long = data.iter().position(|e| e.len() > 8).unwrap();
    let msg = err(loader_opts(Strategy::Flatten, 2, 1, 8, 0));
    assert!(
        msg.contains(&format!("example {long}")) && msg.contains("max_len 8"),
        "{msg}"
    );
    let mut o = loader_opts(Strategy::Flatten, 2, 1, 40, 0);
    o.start.cursor = 11;
    assert!(err(o).contains("resume position"));
    let mut o = loader_opts(Strategy::Pad, 2, 1, 40, 0);
    o.start.carry = vec![1];
    assert!(err(o).contains("resume position"));
    assert!(err(loader_opts(Strategy::Pad, 0, 1, 40, 0)).contains("batch_size (0)"));
    assert!(Loader::new(Arc::new(vec![]), loader_opts(Strategy::Pad, 1, 1, 4, 0)).is_err());
}

#[test]
fn offline_resume_is_exact_while_examples_wait_between_windows() {
    let seed = 21;
    let data = Arc::new(traceable(seed, 3000, 40));
    let opts = loader_opts(Strategy::Offline, 4, 2, 40, seed);
    let loader = Loader::new(Arc::clone(&data), opts.clone()).unwrap();
    let spe = loader.steps_per_epoch();
    let run: Vec<Step> = loader.take(spe + 5).collect();
    assert_eq!(
        (run[spe - 1].epoch, run[spe].epoch),
        (0, 1),
        "steps_per_epoch {spe}"
    );
    // Positions in the middle of the order that carry examples to the next window.
    let mid: Vec<usize> = (0..spe - 1)
        .filter(|&k| {
            let p = &run[k].position_after;
            !p.carry.is_empty() && p.cursor > 0 && (p.cursor as usize) < data.len()
        })
        .collect();
    assert!(mid.len() > 3, "seed {seed}: no mid-order carry to test");
    for &k in mid.iter().step_by(mid.len() / 3) {
        let mut o = opts.clone();
        o.start = run[k].position_after.clone();
        let resumed: Vec<Step> = Loader::new(Arc::clone(&data), o).unwrap().take(8).collect();
        let want = &run[k + 1..(k + 9).min(run.len())];
        assert!(
            resumed[..want.len()] == *want,
            "seed {seed}: resume after step {k} diverges"
        );
    }
}

/// The memory plan's scan: the largest micro-batch of a run's steps, computed without a loader,
/// is the largest the loader then hands out, over two epochs, for every strategy; and the steps
/// per epoch are the loader's.
#[test]
fn the_largest_micro_batch_scan_matches_the_loader() {
    for seed in 0..6u64 {
        let n = 5 + (seed as usize * 29) % 70;
        let data = Arc::new(traceable(seed, n, 64));
        for strategy in [
            Strategy::Pad,
            Strategy::Flatten,
            Strategy::Offline,
            Strategy::Concat,
        ] {
            let opts = loader_opts(strategy, 3, 2, 64, seed);
            let loader = Loader::new(Arc::clone(&data), opts.clone()).unwrap();
            let spe = loader.steps_per_epoch();
            assert_eq!(
                nopad_data::steps_per_epoch(Arc::clone(&data), &opts).unwrap(),
                spe,
                "seed {seed} {strategy}"
            );
            let steps = 2 * spe as u64 + 1;
            let want = loader
                .take(steps as usize)
                .flat_map(|s| s.batches.into_iter().map(|b| b.tokens.len()))
                .max()
                .unwrap_or(0);
            let got = nopad_data::largest_micro_batch(Arc::clone(&data), &opts, steps).unwrap();
            assert_eq!(got, want, "seed {seed} {strategy}");
        }
    }
}
