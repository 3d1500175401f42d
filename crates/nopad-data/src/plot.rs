//! The length histogram of a [`StatsReport`] as an SVG chart (plotters' SVG backend, which needs
//! no font files). PNG is not offered: text in a bitmap needs a font source this build lacks.

use std::path::Path;

use plotters::prelude::*;

use crate::error::DataError;
use crate::stats::StatsReport;

impl StatsReport {
    /// Draws the length histogram to `path` (SVG), with `max_len` marked.
    pub fn write_svg(&self, path: &Path) -> Result<(), DataError> {
        if path.extension().is_none_or(|e| e != "svg") {
            return Err(DataError::file(
                path,
                "only SVG charts are supported: give the plot a .svg name",
            ));
        }
        let fail = |e: &dyn std::fmt::Display| DataError::file(path, format!("cannot draw: {e}"));
        let h = &self.histogram;
        let x_max = (h.counts.len() * h.bin_width).max(self.max_len + h.bin_width) as u32;
        let y_max = h.counts.iter().copied().max().unwrap_or(0).max(1) as u32;
        let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let caption = format!(
            "{} examples: median {}, p90 {}, max {} tokens",
            self.n_examples, h.median, h.p90, h.max
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0u32..x_max, 0u32..y_max + y_max / 10 + 1)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc("example length (tokens)")
            .y_desc("examples")
            .draw()
            .map_err(|e| fail(&e))?;
        let w = h.bin_width as u32;
        chart
            .draw_series(h.counts.iter().enumerate().map(|(i, &c)| {
                let x = i as u32 * w;
                Rectangle::new([(x, 0), (x + w, c as u32)], BLUE.mix(0.6).filled())
            }))
            .map_err(|e| fail(&e))?;
        let m = self.max_len as u32;
        chart
            .draw_series(LineSeries::new([(m, 0), (m, y_max)], RED.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(format!("max_len {m}"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(&e))?;
        root.present().map_err(|e| fail(&e))
    }
}

#[cfg(test)]
mod tests {
    use crate::{strategy_stats, Example, PackOptions, Strategy};

    #[test]
    fn writes_an_svg_histogram() {
        let data: Vec<Example> = (1..200)
            .map(|l| Example {
                input_ids: vec![4; l],
                labels: vec![4; l],
            })
            .collect();
        let r = strategy_stats(&data, &PackOptions::new(Strategy::Pad, 4, 256), 1);
        let dir = std::env::temp_dir().join(format!("nopad-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("lengths.svg");
        r.write_svg(&p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<rect") && svg.contains("max_len 256"));
        assert!(r.write_svg(&dir.join("lengths.png")).is_err());
    }
}
