//! The training data loader: steps built ahead on a background thread, and evaluation batches.
//!
//! [`Loader`] validates the dataset against the options once, then runs the deterministic
//! `sampler` on its own thread and hands finished [`Step`]s through a bounded channel, so packing
//! overlaps with the model's work and memory stays bounded by `prefetch` steps. The iterator is
//! endless over epochs; the caller decides when to stop (dropping the loader stops the thread).
//! In a data-parallel run each rank runs its own loader with its own `rank`; all of them plan
//! the same global steps and keep their own share (see `ranks`).

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::DataError;
use crate::pack::{pack_micro_batch, PackOptions, CONCAT_WARNING};
use crate::ranks::DataParallel;
use crate::sampler::{DataPosition, Planner, Step};
use crate::{Batch, Example, Strategy};

/// How the loader samples and packs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Packing of each micro-batch.
    pub pack: PackOptions,
    /// Micro-batches per optimizer step on each rank.
    pub grad_accum: usize,
    /// Seed of the per-epoch shuffle.
    pub seed: u64,
    /// Shuffle each epoch (otherwise file order every epoch).
    pub shuffle: bool,
    /// Where to start (a checkpoint's `position_after`, or the default for a fresh run).
    pub start: DataPosition,
    /// Steps built ahead of the consumer (at least 1).
    pub prefetch: usize,
    /// This loader's rank in a data-parallel run ([`DataParallel::ALONE`] for one process).
    pub parallel: DataParallel,
}

/// Endless iterator over optimizer steps, built on a background thread.
pub struct Loader {
    rx: Option<Receiver<Step>>,
    worker: Option<JoinHandle<()>>,
    steps_per_epoch: usize,
    warnings: Vec<String>,
}

impl Loader {
    /// Checks the dataset against the options and starts the background thread.
    ///
    /// Errors: no examples, an empty example, an example longer than `max_len` (load with a long
    /// policy first), zero sizes, a rank not below `ranks`, or a start position that does not fit
    /// this dataset.
    pub fn new(examples: Arc<Vec<Example>>, opts: LoaderOptions) -> Result<Loader, DataError> {
        let mut planner = checked_planner(examples, &opts)?;
        let mut warnings = vec![];
        if opts.pack.strategy == Strategy::Concat {
            eprintln!("warning: {CONCAT_WARNING}");
            warnings.push(CONCAT_WARNING.to_string());
        }
        let steps_per_epoch = planner.steps_in_epoch(opts.start.epoch);
        let (tx, rx) = sync_channel(opts.prefetch.max(1));
        let mut pos = opts.start;
        let worker = std::thread::Builder::new()
            .name("nopad-data".into())
            .spawn(move || loop {
                let step = planner.next_step(&pos);
                pos = step.position_after.clone();
                if tx.send(step).is_err() {
                    break; // the loader was dropped
                }
            })
            .map_err(|e| DataError::msg(format!("cannot start the data thread: {e}")))?;
        Ok(Loader {
            rx: Some(rx),
            worker: Some(worker),
            steps_per_epoch,
            warnings,
        })
    }

    /// Optimizer steps per epoch (for `offline`, that of the start epoch: its packing, and so its
    /// count, can differ slightly between epochs).
    pub fn steps_per_epoch(&self) -> usize {
        self.steps_per_epoch
    }

    /// Warnings the user must see (e.g. that `concat` does not train like `pad`).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

impl Iterator for Loader {
    type Item = Step;
    fn next(&mut self) -> Option<Step> {
        match self.rx.as_ref()?.recv() {
            Ok(step) => Some(step),
            Err(_) => {
                // The worker only stops early by panicking: surface its panic here.
                self.rx = None;
                if let Some(Err(panic)) = self.worker.take().map(JoinHandle::join) {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.rx = None; // unblocks the worker's send, which then fails and ends the loop
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn check_options(examples: &[Example], opts: &LoaderOptions) -> Result<(), DataError> {
    let p = &opts.pack;
    if p.batch_size == 0 || opts.grad_accum == 0 || p.max_len == 0 {
        return Err(DataError::msg(format!(
            "batch_size ({}), grad_accum ({}) and max_len ({}) must all be at least 1",
            p.batch_size, opts.grad_accum, p.max_len
        )));
    }
    opts.parallel.check()?;
    if examples.is_empty() {
        return Err(DataError::msg("no examples to train on"));
    }
    for (i, e) in examples.iter().enumerate() {
        if e.is_empty() || e.labels.len() != e.len() {
            return Err(DataError::msg(format!(
                "example {i} is empty or its labels are not aligned with its input_ids"
            )));
        }
        if e.len() > p.max_len {
            return Err(DataError::msg(format!(
                "example {i} has {} tokens, more than max_len {}: load the data with a long \
                 policy (truncate, split or drop) or raise max_len",
                e.len(),
                p.max_len
            )));
        }
    }
    Ok(())
}

/// Evaluation batches: every example exactly once, in file order, `batch_size` examples per
/// batch, no shuffling.
pub fn eval_batches(examples: &[Example], opts: &PackOptions) -> Vec<Batch> {
    examples
        .chunks(opts.batch_size.max(1))
        .map(|chunk| {
            let refs: Vec<&Example> = chunk.iter().collect();
            pack_micro_batch(&refs, opts)
        })
        .collect()
}

/// The most tokens any micro-batch of the `steps` steps from `opts.start` holds, padding
/// included, over every rank's share (balancing moves examples between ranks, so the largest
/// over all of them is the number that fits every rank): the number a memory plan sizes the
/// activations by. Exact, because it plans and packs those very steps in the same order as the
/// [`Loader`] (on this thread, without keeping them), at the cost of one pass over their tokens
/// on the host.
pub fn largest_micro_batch(
    examples: Arc<Vec<Example>>,
    opts: &LoaderOptions,
    steps: u64,
) -> Result<usize, DataError> {
    let mut planner = checked_planner(examples, opts)?;
    let mut pos = opts.start.clone();
    let mut most = 0;
    for _ in 0..steps {
        let (shares, after) = planner.shares(&pos);
        most = shares
            .iter()
            .flatten()
            .map(|b| b.tokens.len())
            .fold(most, usize::max);
        pos = after;
    }
    Ok(most)
}

/// Optimizer steps in the epoch of `opts.start` (what [`Loader::steps_per_epoch`] reports, the
/// same on every rank), without starting a loader.
pub fn steps_per_epoch(
    examples: Arc<Vec<Example>>,
    opts: &LoaderOptions,
) -> Result<usize, DataError> {
    Ok(checked_planner(examples, opts)?.steps_in_epoch(opts.start.epoch))
}

/// The planner a [`Loader`] with `opts` runs, after its checks (the start position included).
fn checked_planner(
    examples: Arc<Vec<Example>>,
    opts: &LoaderOptions,
) -> Result<Planner, DataError> {
    check_options(&examples, opts)?;
    let n_examples = examples.len();
    let mut planner = Planner::new(
        examples,
        opts.pack.clone(),
        opts.grad_accum,
        opts.seed,
        opts.shuffle,
    )
    .for_ranks(opts.parallel);
    if !planner.fits(&opts.start) {
        return Err(DataError::msg(format!(
            "the resume position {:?} does not fit {} examples packed with `{}`: was the \
             checkpoint made with other data or another strategy?",
            opts.start, n_examples, opts.pack.strategy
        )));
    }
    Ok(planner)
}
