//! SVG charts of a benchmark (plotters' SVG backend needs no fonts): throughput and peak memory
//! per strategy as bars, and every strategy's loss curve on one plot.

use std::path::Path;

use plotters::prelude::*;

use crate::{BenchError, Result, StrategyResult};

const COLORS: [RGBColor; 4] = [
    RGBColor(76, 114, 176),
    RGBColor(221, 132, 82),
    RGBColor(85, 168, 104),
    RGBColor(196, 78, 82),
];

fn err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> BenchError + '_ {
    move |e| BenchError::Output {
        path: path.display().to_string(),
        msg: format!("cannot draw: {e}"),
    }
}

/// Bars of one value per strategy.
pub fn bars(
    path: &Path,
    title: &str,
    unit: &str,
    results: &[StrategyResult],
    value: impl Fn(&StrategyResult) -> f64,
) -> Result<()> {
    let e = err(path);
    let vals: Vec<f64> = results.iter().map(&value).collect();
    let top = vals.iter().cloned().fold(0.0, f64::max).max(1e-9) * 1.15;
    let root = SVGBackend::new(path, (700, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..results.len() as f64, 0f64..top)
        .map_err(|x| e(&x))?;
    let names: Vec<String> = results.iter().map(|r| r.strategy.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(results.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (*x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        })
        .y_desc(unit)
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .draw_series(vals.iter().enumerate().map(|(i, &v)| {
            Rectangle::new(
                [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, v)],
                COLORS[i % COLORS.len()].filled(),
            )
        }))
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Every strategy's per-step loss on one plot.
pub fn loss_curves(path: &Path, results: &[StrategyResult]) -> Result<()> {
    let e = err(path);
    let n = results
        .iter()
        .map(|r| r.losses.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let finite = results
        .iter()
        .flat_map(|r| r.losses.iter().copied())
        .filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    } else {
        (0.0, 1.0)
    };
    let root = SVGBackend::new(path, (800, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("training loss per optimizer step", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(1f64..n as f64, lo..hi)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()
        .map_err(|x| e(&x))?;
    for (i, r) in results.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                r.losses
                    .iter()
                    .enumerate()
                    .map(|(k, &l)| ((k + 1) as f64, l)),
                c.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(r.strategy.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Writes `throughput.svg`, `memory.svg` and `loss.svg` into `dir`.
pub fn write_all(dir: &Path, results: &[StrategyResult]) -> Result<()> {
    bars(
        &dir.join("throughput.svg"),
        "real tokens/s (median)",
        "tokens/s",
        results,
        |r| r.tokens_per_s,
    )?;
    bars(
        &dir.join("memory.svg"),
        "peak device memory",
        "GiB",
        results,
        |r| r.peak_memory_bytes as f64 / (1u64 << 30) as f64,
    )?;
    loss_curves(&dir.join("loss.svg"), results)
}
