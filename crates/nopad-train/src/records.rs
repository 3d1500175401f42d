//! What a run reports: one [`StepRecord`] per step and one [`EvalRecord`] per evaluation (both
//! also lines of the JSON log), the run's [`History`] (carried in checkpoints) and the
//! [`Summary`] at the end.

use std::path::PathBuf;

use nopad_data::BatchStats;
use serde::{Deserialize, Serialize};

/// One logged step (also one line of the `--log` file).
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    /// 1-based optimizer step.
    pub step: u64,
    /// Epoch the step's data came from.
    pub epoch: u64,
    /// Token-weighted loss of the step.
    pub loss: f64,
    /// Learning rate of the update.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-pad) tokens per second of this step.
    pub tokens_per_s: f64,
    /// Target tokens per second of this step.
    pub target_tokens_per_s: f64,
    /// Pad tokens / all tokens laid out.
    pub padding_fraction: f64,
    /// Examples in the step.
    pub examples: usize,
    /// Real tokens in the step.
    pub real_tokens: usize,
    /// Target tokens in the step.
    pub target_tokens: usize,
    /// Seconds since training started.
    pub elapsed_s: f64,
    /// Peak device memory so far.
    pub peak_memory_bytes: usize,
    /// Whether the update was skipped (non-finite loss or gradient norm).
    pub skipped: bool,
    /// Steps skipped so far in the run, this one included.
    pub skipped_steps: u64,
    /// How unevenly the step's work was shared between the ranks (absent with one rank).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank_imbalance: Option<RankImbalance>,
    /// The evaluation run after this step, if any (logged as its own line).
    #[serde(skip)]
    pub eval: Option<EvalRecord>,
}

/// How unevenly one step's work fell on the ranks: for each cost, the busiest rank's over the
/// mean, minus one (0: even; 1: the busiest rank did twice the mean, the others waited).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankImbalance {
    /// Real tokens (the linear layers' cost).
    pub tokens: f64,
    /// Σ segment length² (attention's cost).
    pub attention: f64,
}

/// One evaluation of the held-out data (a line `{"step", "eval_loss", "eval_tokens"}` of the log).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Optimizer steps done when it ran.
    pub step: u64,
    /// Token-weighted mean cross-entropy over every target token of the held-out data.
    pub eval_loss: f64,
    /// Target tokens it counted.
    pub eval_tokens: usize,
}

/// Why a run stopped before its last step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum StopReason {
    /// A signal (its number: 2 = SIGINT, 15 = SIGTERM) asked it to stop.
    Signal(i32),
    /// `stop_after` was reached.
    StopAfter(u64),
}

/// Running totals of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Steps whose update was skipped (non-finite loss or gradient norm).
    pub skipped_steps: u64,
    /// Of those, how many in a row up to now.
    pub bad_in_a_row: u64,
    /// Real tokens trained on.
    pub real_tokens: usize,
    /// Pad tokens laid out.
    pub pad_tokens: usize,
    /// Target tokens.
    pub target_tokens: usize,
    /// Seconds spent in steps.
    pub train_seconds: f64,
}

/// What a run has done so far, over every session of a resumed run.
#[derive(Clone, Debug, Default)]
pub(crate) struct History {
    /// Running totals.
    pub counters: Counters,
    /// The finite losses so far, in order.
    pub losses: Vec<f64>,
    /// Evaluations so far.
    pub evals: Vec<EvalRecord>,
}

impl History {
    /// Counts one step that took `dt` seconds.
    pub fn record(&mut self, st: &BatchStats, dt: f64, loss: f64, applied: bool) {
        let c = &mut self.counters;
        c.train_seconds += dt;
        c.real_tokens += st.real_tokens;
        c.pad_tokens += st.pad_tokens;
        c.target_tokens += st.target_tokens;
        if applied {
            c.bad_in_a_row = 0;
        } else {
            c.skipped_steps += 1;
            c.bad_in_a_row += 1;
        }
        if loss.is_finite() {
            self.losses.push(loss);
        }
    }
}

/// Mean of the last 10% (at least one) of the finite losses.
fn tail_mean(losses: &[f64]) -> f64 {
    if losses.is_empty() {
        return f64::NAN;
    }
    let tail = (losses.len() / 10).max(1);
    losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64
}

impl Summary {
    /// The parts of a summary a run's history gives, for a run of `total` steps (the final
    /// evaluation counts only when the run reached its last step); the caller fills the rest.
    pub(crate) fn from(h: History, total: u64, stopped: Option<StopReason>) -> Summary {
        let c = &h.counters;
        let final_eval = h
            .evals
            .last()
            .filter(|e| e.step == total && stopped.is_none())
            .copied();
        Summary {
            steps: total,
            real_tokens: c.real_tokens,
            pad_tokens: c.pad_tokens,
            target_tokens: c.target_tokens,
            train_seconds: c.train_seconds,
            tokens_per_s: c.real_tokens as f64 / c.train_seconds.max(1e-9),
            first_loss: h.losses.first().copied().unwrap_or(f64::NAN),
            last_loss: tail_mean(&h.losses),
            eval_loss: final_eval.map(|e| e.eval_loss),
            eval_tokens: final_eval.map(|e| e.eval_tokens),
            skipped_steps: c.skipped_steps,
            stopped,
            evals: h.evals,
            ..Summary::default()
        }
    }
}

/// What a run did, for the final report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Model description.
    pub model: String,
    /// Parameters.
    pub params: usize,
    /// Device description.
    pub device: String,
    /// Strategy.
    pub strategy: String,
    /// Optimizer steps the run spans (its schedule's length).
    pub steps: u64,
    /// Steps done when it ended (less than `steps` when it stopped early).
    pub steps_done: u64,
    /// Optimizer steps one epoch has with this strategy.
    pub steps_per_epoch: usize,
    /// Examples loaded.
    pub examples: usize,
    /// Totals over the run.
    pub real_tokens: usize,
    /// Pad tokens over the run.
    pub pad_tokens: usize,
    /// Target tokens over the run.
    pub target_tokens: usize,
    /// Training time (excluding loading and saving), over every session of a resumed run.
    pub train_seconds: f64,
    /// Real tokens per second over the run.
    pub tokens_per_s: f64,
    /// Loss of the first step (with a finite loss).
    pub first_loss: f64,
    /// Mean finite loss of the last 10% of steps (at least one).
    pub last_loss: f64,
    /// Held-out loss at the end, if `eval_data` was given.
    pub eval_loss: Option<f64>,
    /// Target tokens of that held-out evaluation.
    pub eval_tokens: Option<usize>,
    /// Every evaluation of the run, in order.
    pub evals: Vec<EvalRecord>,
    /// Steps skipped for a non-finite loss or gradient norm.
    pub skipped_steps: u64,
    /// Peak device memory.
    pub peak_memory_bytes: usize,
    /// Where the final weights went (written only when the run reached its last step).
    pub out: Option<PathBuf>,
    /// The checkpoint the run continued from.
    pub resumed_from: Option<PathBuf>,
    /// The newest checkpoint this session wrote.
    pub checkpoint: Option<PathBuf>,
    /// Set when the run stopped before its last step.
    pub stopped: Option<StopReason>,
    /// Notes from loading and packing (truncations, warnings).
    pub notes: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "trained {} ({:.2}M parameters) on {}",
            self.model,
            self.params as f64 / 1e6,
            self.device
        )?;
        if let Some(r) = &self.resumed_from {
            writeln!(f, "  resumed from {}", r.display())?;
        }
        writeln!(
            f,
            "  strategy {}: {} steps ({} per epoch), {} examples, {} real tokens, {} pad tokens, {} target tokens",
            self.strategy, self.steps, self.steps_per_epoch, self.examples, self.real_tokens, self.pad_tokens, self.target_tokens
        )?;
        writeln!(
            f,
            "  {:.1} s, {:.0} real tokens/s, peak memory {:.1} MiB",
            self.train_seconds,
            self.tokens_per_s,
            self.peak_memory_bytes as f64 / (1 << 20) as f64
        )?;
        write!(
            f,
            "  loss {:.4} (first step) -> {:.4} (mean of the last steps)",
            self.first_loss, self.last_loss
        )?;
        if let (Some(e), Some(t)) = (self.eval_loss, self.eval_tokens) {
            write!(f, "\n  held-out loss {e:.4} ({t} target tokens)")?;
        }
        if self.skipped_steps > 0 {
            write!(
                f,
                "\n  {} steps skipped (non-finite loss or gradient norm)",
                self.skipped_steps
            )?;
        }
        if let Some(why) = self.stopped {
            let why = match why {
                StopReason::Signal(2) => "by SIGINT".to_string(),
                StopReason::Signal(15) => "by SIGTERM".to_string(),
                StopReason::Signal(n) => format!("by signal {n}"),
                StopReason::StopAfter(n) => format!("as asked (--stop-after {n})"),
            };
            write!(
                f,
                "\n  stopped {why} after step {} of {}",
                self.steps_done, self.steps
            )?;
            match &self.checkpoint {
                Some(c) => write!(
                    f,
                    "; saved {}\n  continue with the same flags plus `--resume latest`",
                    c.display()
                )?,
                None => write!(f, "; nothing saved (no --out)")?,
            }
        } else {
            if let Some(c) = &self.checkpoint {
                write!(f, "\n  last checkpoint: {}", c.display())?;
            }
            if let Some(o) = &self.out {
                write!(f, "\n  final weights: {}", o.display())?;
            }
        }
        for n in &self.notes {
            write!(f, "\n  note: {n}")?;
        }
        Ok(())
    }
}
