//! What a run prints before its first step: the resolved settings in one short block (so a
//! log of a run says what it trained with), and the warnings about settings that do not do what
//! they seem to (a warm-up longer than the run).

use crate::config::{DataSource, TrainConfig};
use crate::optimizer::{master_name, states_name};
use crate::schedule::Schedule;

/// What the session knows once it is open, for [`block`].
pub(crate) struct Facts<'a> {
    /// How the model is named.
    pub model: &'a str,
    /// Examples loaded.
    pub examples: usize,
    /// Examples truncated to `max_len` while loading (None for synthetic data).
    pub truncated: Option<usize>,
    /// The schedule (its `total` is the run's length).
    pub schedule: &'a Schedule,
    /// Steps per epoch.
    pub steps_per_epoch: usize,
    /// Ranks training together.
    pub world: usize,
}

/// The settings block, one `key  value` line each.
pub(crate) fn block(tc: &TrainConfig, f: &Facts) -> String {
    let data = match &tc.data {
        DataSource::File(p) => p.display().to_string(),
        DataSource::Synthetic { dist, .. } => format!("synthetic ({dist:?})"),
    };
    let truncated = f
        .truncated
        .map(|n| format!(", {n} truncated to max-len"))
        .unwrap_or_default();
    let s = f.schedule;
    let epochs = s.total as f64 / f.steps_per_epoch.max(1) as f64;
    let a = &tc.adamw;
    let clip = a.max_grad_norm.map_or("off".to_string(), |g| g.to_string());
    let mut modes = vec![
        format!("states {}", states_name(a.states)),
        format!("master {}", master_name(a.master)),
        format!("weight decay {}", a.weight_decay),
        format!("clip {clip}"),
    ];
    if tc.optim_in_backward {
        modes.push("in backward".into());
    }
    if tc.offload == crate::Placement::Host {
        modes.push("offloaded to the host".into());
    }
    if tc.lora.is_some() {
        modes.push("LoRA adapters only".into());
    }
    let ranks = match f.world {
        1 => String::new(),
        n => {
            // Without --shard the plan picks the stage after this block is printed (its note
            // says which).
            match tc.shard {
                Some(s) => modes.push(format!("ZeRO stage {} over {n} ranks", s.number())),
                None => modes.push(format!("ZeRO stage: the lowest that fits, over {n} ranks")),
            }
            format!(" × {n} ranks")
        }
    };
    [
        format!("model      {}", f.model),
        format!("data       {data}: {} examples{truncated}", f.examples),
        format!(
            "packing    {}, batch {} × accum {}{ranks}, max-len {}",
            tc.strategy.name(),
            tc.batch_size,
            tc.grad_accum,
            tc.max_len
        ),
        format!(
            "length     {} steps ({epochs:.2} epochs of {})",
            s.total, f.steps_per_epoch
        ),
        format!(
            "lr         {:e} → {:e}, {} warm-up steps, then {}",
            s.lr,
            s.min_lr,
            s.warmup,
            s.decay.name()
        ),
        format!("optimizer  AdamW: {}", modes.join(", ")),
    ]
    .iter()
    .map(|l| format!("  {l}"))
    .collect::<Vec<_>>()
    .join("\n")
}

/// The warning for a warm-up longer than the run (the schedule cuts it to the run's length, so
/// the peak learning rate comes only at the last step), if there is one.
pub(crate) fn warmup_warning(tc: &TrainConfig, total: u64) -> Option<String> {
    (tc.warmup_ratio.is_none() && tc.warmup > total).then(|| {
        format!(
            "warm-up of {} steps is longer than the run's {total}: it is cut to {total}, so the \
             learning rate reaches its peak {:e} only at the last step (lower --warmup)",
            tc.warmup, tc.lr
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names_the_settings_and_warmup_warns() {
        let tc = TrainConfig::default_cpu();
        let s = Schedule {
            lr: tc.lr,
            min_lr: tc.min_lr,
            warmup: 10,
            total: 150,
            decay: tc.decay,
            restart: None,
        };
        let f = Facts {
            model: "preset small",
            examples: 4096,
            truncated: Some(3),
            schedule: &s,
            steps_per_epoch: 100,
            world: 1,
        };
        let b = block(&tc, &f);
        for want in [
            "preset small",
            "4096 examples, 3 truncated",
            "batch 16 × accum 1, max-len 512",
            "150 steps (1.50 epochs of 100)",
            "3e-3 → 3e-4, 10 warm-up steps, then cosine",
            "states f32",
        ] {
            assert!(b.contains(want), "{want} not in\n{b}");
        }
        assert!(warmup_warning(&tc, 150).is_none());
        let w = warmup_warning(&tc, 4).unwrap();
        assert!(w.contains("10 steps is longer than the run's 4"), "{w}");
    }
}
