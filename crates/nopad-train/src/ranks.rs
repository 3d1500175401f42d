//! What the ranks of a data-parallel run agree on around the step: how unevenly the work fell
//! ([`imbalance`], logged per step and summed up at the end), whether to stop
//! ([`agree_on_stop`]); and [`train_threads`], a run of N ranks as threads of this process over
//! the CPU backend (`--device cpu --ranks N`).
//!
//! The data order is one global order (nopad-data's `ranks`): each step holds the examples of
//! the one-rank step of `grad_accum × N` micro-batches, dealt to the ranks by cost, each rank
//! exactly `grad_accum` micro-batches (empty ones at an epoch's end, so every rank makes the
//! same collective calls). A run of N ranks therefore trains on exactly the examples of one rank
//! with N times the accumulation, in other micro-batches (the same gradient summed in another
//! order), and resumes from the same data position.

use std::thread;

use nopad_backend::cpu::{Cpu, Scalar};
use nopad_backend::Backend;
use nopad_data::RankCost;

use crate::collective::{Collective, ThreadGroup};
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::records::{RankImbalance, StepRecord, StopReason, Summary};
use crate::trainer::train_rank;

/// How unevenly a step's work fell on the ranks (None for one rank): the busiest rank's real
/// tokens and Σ segment length² over the mean, minus 1, from the loader's per-rank costs.
pub(crate) fn imbalance(costs: &[RankCost]) -> Option<RankImbalance> {
    if costs.len() < 2 {
        return None;
    }
    let excess = |f: fn(&RankCost) -> f64| {
        let max = costs.iter().map(f).fold(0.0, f64::max);
        let mean = costs.iter().map(f).sum::<f64>() / costs.len() as f64;
        if mean > 0.0 {
            max / mean - 1.0
        } else {
            0.0
        }
    };
    Some(RankImbalance {
        tokens: excess(|c| c.tokens as f64),
        attention: excess(|c| c.sum_len_sq as f64),
    })
}

/// The summary's line on the steps' imbalance, when there were several ranks.
pub(crate) fn imbalance_note(steps: &[RankImbalance]) -> Option<String> {
    if steps.is_empty() {
        return None;
    }
    let n = steps.len() as f64;
    let mean = |f: fn(&RankImbalance) -> f64| steps.iter().map(f).sum::<f64>() / n;
    let max = |f: fn(&RankImbalance) -> f64| steps.iter().map(f).fold(0.0, f64::max);
    Some(format!(
        "rank imbalance (busiest rank over the mean, minus 1) over {} steps: tokens mean {:.3}, max {:.3}; attention mean {:.3}, max {:.3}",
        steps.len(),
        mean(|i| i.tokens),
        max(|i| i.tokens),
        mean(|i| i.attention),
        max(|i| i.attention)
    ))
}

/// The stop every rank makes after a step: its own request, or one a peer received (a signal
/// may reach the ranks at different steps; all must stop after the same one, or the ones that
/// go on would wait for the others).
pub(crate) fn agree_on_stop<B: Backend>(
    coll: &dyn Collective<B>,
    mine: Option<StopReason>,
) -> Result<Option<StopReason>> {
    if coll.world_size() == 1 {
        return Ok(mine);
    }
    let sig = match mine {
        Some(StopReason::Signal(s)) => s as f64,
        _ => 0.0,
    };
    let mut v = [mine.is_some() as u8 as f64, sig, (sig > 0.0) as u8 as f64];
    coll.all_reduce_host(&mut v)?;
    Ok(match (mine, v) {
        (Some(r), _) => Some(r),
        (None, [0.0, _, _]) => None,
        // The mean of the signal numbers the peers caught (one signal: its number).
        (None, [_, s, k]) if k > 0.0 => Some(StopReason::Signal((s / k).round() as i32)),
        (None, _) => None,
    })
}

/// Runs `tc` as `tc.ranks` ranks, each a thread of this process with its own CPU backend,
/// model and optimizer share, over a [`ThreadGroup`]; `on_step` sees rank 0's records. Returns
/// rank 0's summary, or the first error of any rank, naming it (its peers' errors, which only
/// say that it failed, are dropped).
pub fn train_threads<T: Scalar>(
    tc: &TrainConfig,
    on_step: impl FnMut(&StepRecord) + Send,
) -> Result<Summary> {
    let ranks = ThreadGroup::new(tc.ranks);
    let mut on_step = Some(on_step);
    let results: Vec<(usize, Result<Summary>)> = thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|coll| {
                let mut f = on_step.take().filter(|_| coll.rank() == 0);
                s.spawn(move || {
                    let b = Cpu::<T>::new();
                    let r = train_rank(&b, &coll, tc, |rec| {
                        if let Some(f) = f.as_mut() {
                            f(rec)
                        }
                    });
                    if let Err(e) = &r {
                        coll.fail(&e.to_string());
                    }
                    (coll.rank(), r)
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|_| {
                    (
                        rank,
                        Err(TrainError::Collective(format!("rank {rank} panicked"))),
                    )
                })
            })
            .collect()
    });
    first_error(results)
}

/// Rank 0's summary, or the error that started the failure: a rank whose own work failed
/// before the ones that only saw a peer fail.
fn first_error(results: Vec<(usize, Result<Summary>)>) -> Result<Summary> {
    let mut rank0 = None;
    let mut errors = vec![];
    for (rank, r) in results {
        match r {
            Ok(s) if rank == 0 => rank0 = Some(s),
            Ok(_) => {}
            Err(e) => errors.push((rank, e)),
        }
    }
    // A peer's failure reaches the others as a collective error naming it.
    let own = errors
        .iter()
        .position(|(_, e)| !matches!(e, TrainError::Collective(m) if m.contains("abandoned")));
    match own.or((!errors.is_empty()).then_some(0)) {
        Some(i) => {
            let (rank, e) = errors.swap_remove(i);
            Err(TrainError::Rank {
                rank,
                source: Box::new(e),
            })
        }
        None => rank0.ok_or_else(|| TrainError::Collective("rank 0 returned no summary".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::SingleProcess;

    fn cost(tokens: usize, sum_len_sq: u64) -> RankCost {
        RankCost {
            tokens,
            sum_len_sq,
            target_tokens: 0,
        }
    }

    #[test]
    fn imbalance_is_the_busiest_rank_over_the_mean() {
        // Rank 0: 4 tokens in one segment (16); rank 1: 4 tokens in two (8).
        let i = imbalance(&[cost(4, 16), cost(4, 8)]).unwrap();
        assert_eq!(i.tokens, 0.0);
        assert!((i.attention - (16.0 / 12.0 - 1.0)).abs() < 1e-12);
        assert_eq!(imbalance(&[cost(4, 16)]), None);
        let note = imbalance_note(&[
            i,
            RankImbalance {
                tokens: 0.5,
                attention: 0.0,
            },
        ])
        .unwrap();
        assert!(note.contains("tokens mean 0.250, max 0.500"), "{note}");
    }

    #[test]
    fn the_ranks_stop_after_the_same_step() {
        let none = agree_on_stop::<Cpu<f32>>(&SingleProcess, None).unwrap();
        assert_eq!(none, None);
        let ranks = ThreadGroup::new(3);
        let got: Vec<Option<StopReason>> = thread::scope(|s| {
            let hs: Vec<_> = ranks
                .into_iter()
                .map(|r| {
                    s.spawn(move || {
                        let mine = (r.rank() == 1).then_some(StopReason::Signal(15));
                        agree_on_stop::<Cpu<f32>>(&r, mine).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got, vec![Some(StopReason::Signal(15)); 3]);
    }
}
