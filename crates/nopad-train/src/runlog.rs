//! The JSON-lines log (`--log`): one line per logged step and one per evaluation, flushed as it
//! is written so a crash loses nothing logged. A resumed run first drops the lines of steps after
//! its checkpoint (the interrupted session logged them, but the resumed one redoes those steps),
//! so the log of a resumed run reads like that of an uninterrupted one. With `--report-to
//! tensorboard` the same scalars also go to TensorBoard event files (`crate::tensorboard`).

use std::fs;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use serde::Serialize;

use crate::error::{io, Result};
use crate::records::{EvalRecord, StepRecord};
use crate::tensorboard::EventWriter;

/// An open log, or nothing when no `--log` was asked for.
pub(crate) struct RunLog {
    path: PathBuf,
    w: Option<BufWriter<fs::File>>,
    tb: Option<EventWriter>,
}

impl RunLog {
    /// Opens `path` for a run that starts after step `resumed_at` (0 for a fresh run, which
    /// truncates the file).
    /// With `tensorboard`, event files are written in that folder too.
    pub(crate) fn open(
        path: &Option<PathBuf>,
        tensorboard: Option<&std::path::Path>,
        resumed_at: u64,
    ) -> Result<RunLog> {
        let tb = match tensorboard {
            Some(dir) => Some(EventWriter::create(dir, resumed_at)?),
            None => None,
        };
        let Some(p) = path else {
            return Ok(RunLog {
                path: PathBuf::new(),
                w: None,
                tb,
            });
        };
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let f = if resumed_at > 0 && p.exists() {
            let text = fs::read_to_string(p).map_err(io(p))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    // A torn last line (a crash mid-write) does not parse and goes too.
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step")?.as_u64())
                        .is_some_and(|s| s <= resumed_at)
                })
                .flat_map(|l| [l, "\n"])
                .collect();
            nopad_model::weights::atomic_write(p, kept.as_bytes())?;
            fs::OpenOptions::new().append(true).open(p).map_err(io(p))?
        } else {
            fs::File::create(p).map_err(io(p))?
        };
        Ok(RunLog {
            path: p.clone(),
            w: Some(BufWriter::new(f)),
            tb,
        })
    }

    /// Appends one JSON line and flushes it.
    pub(crate) fn line<T: Serialize>(&mut self, value: &T) -> Result<()> {
        if let Some(w) = self.w.as_mut() {
            let line = serde_json::to_string(value).expect("log records serialise");
            writeln!(w, "{line}")
                .and_then(|_| w.flush())
                .map_err(io(&self.path))?;
        }
        Ok(())
    }

    /// Logs a step: its JSON line, and its scalars to TensorBoard.
    pub(crate) fn step(&mut self, rec: &StepRecord) -> Result<()> {
        self.line(rec)?;
        if let Some(tb) = self.tb.as_mut() {
            tb.scalars(
                rec.step,
                &[
                    ("train/loss", rec.loss),
                    ("train/learning_rate", rec.lr),
                    ("train/grad_norm", rec.grad_norm),
                    ("train/tokens_per_s", rec.tokens_per_s),
                    ("train/padding_fraction", rec.padding_fraction),
                ],
            )?;
        }
        Ok(())
    }

    /// Logs an evaluation: its JSON line, and its loss to TensorBoard.
    pub(crate) fn eval(&mut self, rec: &EvalRecord) -> Result<()> {
        self.line(rec)?;
        if let Some(tb) = self.tb.as_mut() {
            tb.scalars(rec.step, &[("eval/loss", rec.eval_loss)])?;
        }
        Ok(())
    }
}
