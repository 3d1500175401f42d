//! The paper-style table of a benchmark, as text for the terminal and as Markdown for reports.

use crate::StrategyResult;

fn row(r: &StrategyResult, pad: Option<&StrategyResult>) -> Vec<String> {
    let speedup = pad.map_or("-".into(), |p| {
        format!("{:.2}x", r.tokens_per_s / p.tokens_per_s)
    });
    let last = r.losses.last().copied().unwrap_or(f64::NAN);
    vec![
        r.strategy.clone(),
        r.steps_per_epoch.to_string(),
        format!("{:.0}", r.tokens_per_s),
        format!("{:.0}", r.target_tokens_per_s),
        format!("{:.1}%", 100.0 * r.mfu),
        format!("{:.2}", r.peak_memory_bytes as f64 / (1u64 << 30) as f64),
        format!("{:.1}%", 100.0 * r.padding_fraction),
        format!(
            "{:.1} [{:.1}, {:.1}]",
            r.step_ms.0, r.step_ms.1, r.step_ms.2
        ),
        format!("{last:.4}"),
        format!("{:.4}", r.eval_loss),
        speedup,
    ]
}

const HEADER: [&str; 11] = [
    "strategy",
    "steps/epoch",
    "tokens/s",
    "target tok/s",
    "MFU",
    "peak GiB",
    "padding",
    "step ms [min, max]",
    "final loss",
    "held-out loss",
    "vs pad",
];

fn rows(results: &[StrategyResult]) -> Vec<Vec<String>> {
    let pad = results.iter().find(|r| r.strategy == "pad");
    results.iter().map(|r| row(r, pad)).collect()
}

/// Largest |loss difference| per step between two strategies' curves.
pub fn max_step_diff(a: &StrategyResult, b: &StrategyResult) -> f64 {
    a.losses
        .iter()
        .zip(&b.losses)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn findings(results: &[StrategyResult]) -> Vec<String> {
    let get = |s: &str| results.iter().find(|r| r.strategy == s);
    let mut v = Vec::new();
    if let (Some(p), Some(f)) = (get("pad"), get("flatten")) {
        v.push(format!(
            "flatten vs pad: same steps per epoch ({} vs {}), largest per-step loss difference {:.2e}, {:.2}x the tokens/s",
            f.steps_per_epoch,
            p.steps_per_epoch,
            max_step_diff(f, p),
            f.tokens_per_s / p.tokens_per_s
        ));
    }
    if let (Some(p), Some(c)) = (get("pad"), get("concat")) {
        v.push(format!(
            "concat vs pad: attention crosses examples; largest per-step loss difference {:.2e}, held-out loss {:.4} vs {:.4}",
            max_step_diff(c, p),
            c.eval_loss,
            p.eval_loss
        ));
    }
    if let (Some(p), Some(o)) = (get("pad"), get("offline")) {
        v.push(format!(
            "offline: {} optimizer steps per epoch instead of {} (each step sees more examples)",
            o.steps_per_epoch, p.steps_per_epoch
        ));
    }
    v
}

/// A fixed-width table plus the findings, for the terminal.
pub fn text(results: &[StrategyResult]) -> String {
    let rows = rows(results);
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([HEADER[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = vec![line(HEADER.to_vec())];
    for r in &rows {
        out.push(line(r.iter().map(String::as_str).collect()));
    }
    out.extend(findings(results));
    out.join("\n")
}

/// The per-op breakdown of each strategy that was profiled (ms per step, largest first).
pub fn profile_text(results: &[StrategyResult]) -> String {
    let mut out = Vec::new();
    for r in results.iter().filter(|r| !r.profile.is_empty()) {
        let total: f64 = r.profile.iter().map(|p| p.1).sum();
        out.push(format!(
            "{} (profiled: device time between op boundaries, optimizer synchronised): {total:.1} ms per step",
            r.strategy
        ));
        for (op, ms) in &r.profile {
            out.push(format!(
                "  {op:<26} {ms:>8.2} ms  {:>5.1}%",
                100.0 * ms / total
            ));
        }
    }
    out.join("\n")
}

/// The same table in Markdown, under a line naming the device and the recomputation mode.
pub fn markdown(results: &[StrategyResult]) -> String {
    let mut out = String::new();
    if let Some(r) = results.first() {
        out.push_str(&format!(
            "Device: {}; recompute: {}; gradients over dead activations: {}; optimizer: {}.\n\n",
            r.device,
            r.recompute,
            if r.grad_aliasing { "yes" } else { "no" },
            r.optimizer
        ));
    }
    out.push_str(&format!(
        "| {} |\n|{}\n",
        HEADER.join(" | "),
        "---|".repeat(HEADER.len())
    ));
    for r in rows(results) {
        out.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    for f in findings(results) {
        out.push_str(&format!("\n- {f}"));
    }
    out.push('\n');
    out
}
