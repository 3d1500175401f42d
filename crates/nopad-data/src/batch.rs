//! The two types every layer agrees on: [`Example`] (what a user's record becomes) and [`Batch`]
//! (what the model consumes).

use std::fmt;
use std::str::FromStr;

/// Label value that marks a token as "not a target" (HF's `-100`).
pub const IGNORE_INDEX: i32 = -100;

/// One training example in HF causal-LM convention: `labels` is aligned with `input_ids`
/// (`labels[t]` is the token expected *at* position t, predicted from positions < t), and
/// [`IGNORE_INDEX`] marks tokens that are not trained (prompts, role headers). The first label of
/// an example is never a target, whatever it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids, `[len]`.
    pub input_ids: Vec<i32>,
    /// Labels aligned with `input_ids`, `[len]`.
    pub labels: Vec<i32>,
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    /// Whether the example has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Number of tokens that are targets: positions t ≥ 1 whose label is not ignored.
    pub fn target_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// How examples are laid out in a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Each micro-batch padded to its longest example; one attention segment per row.
    Pad,
    /// Examples concatenated with continuing position ids and one attention segment per row:
    /// attention crosses examples (for comparison only; training is not equivalent).
    Concat,
    /// The micro-batch's examples in one row without padding, position ids restarting at 0 and
    /// one attention segment per example (the paper's mini-batch packing).
    Flatten,
    /// Fixed rows of `max_len` filled by best-fit decreasing over a shuffled window; isolation
    /// kept; fewer optimizer steps per epoch.
    Offline,
}

impl Strategy {
    /// Every strategy, in the order reports list them.
    pub const ALL: [Strategy; 4] = [
        Strategy::Pad,
        Strategy::Concat,
        Strategy::Flatten,
        Strategy::Offline,
    ];
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Pad => "pad",
            Strategy::Concat => "concat",
            Strategy::Flatten => "flatten",
            Strategy::Offline => "offline",
        }
    }
    /// Whether attention stays within examples.
    pub fn isolates(self) -> bool {
        !matches!(self, Strategy::Concat)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                format!("unknown strategy `{s}` (expected one of: pad, concat, flatten, offline)")
            })
    }
}

/// Token accounting of one batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Examples (or pieces of split examples) in the batch.
    pub examples: usize,
    /// Rows the strategy laid out (1 for flatten).
    pub rows: usize,
    /// Tokens that belong to examples.
    pub real_tokens: usize,
    /// Padding tokens.
    pub pad_tokens: usize,
    /// Tokens with a target (`targets[t] != IGNORE_INDEX`).
    pub target_tokens: usize,
    /// Σ over attention segments of len² (the attention cost the kernel actually pays).
    pub sum_len_sq: u64,
}

impl std::ops::AddAssign for BatchStats {
    fn add_assign(&mut self, o: Self) {
        self.examples += o.examples;
        self.rows += o.rows;
        self.real_tokens += o.real_tokens;
        self.pad_tokens += o.pad_tokens;
        self.target_tokens += o.target_tokens;
        self.sum_len_sq += o.sum_len_sq;
    }
}

/// A packed micro-batch, ready for the model. N = `tokens.len()`, S = `cu_seqlens.len() - 1`.
///
/// Invariants (checked by [`Batch::validate`]): `cu_seqlens` starts at 0, never decreases and ends
/// at N; `max_seqlen` is its largest step; `targets[t]` is the token the model must predict from
/// position t (HF labels shifted by one *within* an attention segment), so the last token of every
/// segment has no target; pad tokens have no target; `position_ids` count 0, 1, 2, ... within
/// every segment (every strategy restarts them at a segment start).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, `[N]`.
    pub tokens: Vec<i32>,
    /// Next-token targets, `[N]`, [`IGNORE_INDEX`] where none.
    pub targets: Vec<i32>,
    /// Position ids for RoPE, `[N]`.
    pub position_ids: Vec<i32>,
    /// Attention segment boundaries, `[S + 1]`.
    pub cu_seqlens: Vec<i32>,
    /// Longest attention segment.
    pub max_seqlen: usize,
    /// Token accounting.
    pub stats: BatchStats,
}

impl Batch {
    /// Number of tokens N.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    /// Whether the batch holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Number of attention segments S.
    pub fn n_seqs(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }
    /// Checks the invariants listed on the type; an error names the first one broken.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.tokens.len();
        if self.targets.len() != n || self.position_ids.len() != n {
            return Err(format!(
                "tokens {n}, targets {}, position_ids {}: lengths differ",
                self.targets.len(),
                self.position_ids.len()
            ));
        }
        if self.cu_seqlens.first() != Some(&0) {
            return Err("cu_seqlens must start at 0".into());
        }
        if *self.cu_seqlens.last().unwrap_or(&0) as usize != n {
            return Err(format!(
                "cu_seqlens ends at {:?}, expected {n}",
                self.cu_seqlens.last()
            ));
        }
        let mut max = 0;
        for w in self.cu_seqlens.windows(2) {
            if w[1] < w[0] {
                return Err(format!("cu_seqlens decreases: {} then {}", w[0], w[1]));
            }
            max = max.max((w[1] - w[0]) as usize);
            if w[1] > w[0] && self.targets[w[1] as usize - 1] != IGNORE_INDEX {
                return Err(format!(
                    "segment ending at {} has a target on its last token",
                    w[1]
                ));
            }
        }
        for w in self.cu_seqlens.windows(2) {
            let (start, end) = (w[0] as usize, w[1] as usize);
            if let Some(t) = (start..end).find(|&t| self.position_ids[t] != (t - start) as i32) {
                return Err(format!(
                    "position_ids[{t}] = {} but the segment starting at {start} expects {}",
                    self.position_ids[t],
                    t - start
                ));
            }
        }
        if max != self.max_seqlen {
            return Err(format!(
                "max_seqlen {} but the longest segment is {max}",
                self.max_seqlen
            ));
        }
        Ok(())
    }
}
