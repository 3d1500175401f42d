//! nopad-data: turns what users bring (JSONL, Parquet and Arrow files, `datasets`
//! `save_to_disk` directories, built-in synthetic sets) into [`Example`]s, and
//! examples into [`Batch`]es with a packing [`Strategy`].
//!
//! This crate knows nothing of models or devices. Its output, [`Batch`], carries every boundary
//! the model needs (`cu_seqlens`, `position_ids`, shifted `targets`), computed once on the host.
//! The path of data: [`load_examples`] (or [`synthetic::instruction_dataset`]) gives examples;
//! [`Loader`] samples them into optimizer steps on a background thread, each micro-batch laid out
//! by [`pack_micro_batch`]; [`eval_batches`] does the same for evaluation, in file order;
//! [`inspect_records`] shows a file's first records as loading converts them. A
//! data-parallel run gives each rank's loader its `rank`: every rank plans the same global step
//! and keeps its balanced share ([`RankCost`] says what each rank runs).

#![deny(missing_docs)]

mod arrow;
mod batch;
mod cache;
mod error;
mod inspect;
mod load;
mod loader;
mod messages;
mod pack;
mod parquet;
mod plot;
mod ranks;
mod records;
mod sampler;
mod saved;
mod source;
mod stats;
mod stop;
pub mod synthetic;
mod table;
mod targets;
mod template;
mod tokenize;

pub use batch::{Batch, BatchStats, Example, Strategy, IGNORE_INDEX};
pub use error::DataError;
pub use inspect::{inspect_records, Inspected, Inspection};
pub use load::{load_examples, LoadOptions, LoadReport, LongPolicy};
pub use loader::{eval_batches, largest_micro_batch, steps_per_epoch, Loader, LoaderOptions};
pub use pack::{pack_micro_batch, PackOptions, CONCAT_WARNING};
pub use ranks::{imbalance, DataParallel, RankCost, DEFAULT_ATTENTION_LEN};
pub use records::{Format, LossOn};
pub use sampler::{DataPosition, Step, OFFLINE_WINDOW};
pub use source::data_files;
pub use stats::{strategy_stats, LengthHistogram, StatsReport, StrategyStats};
pub use stop::StopFlag;
pub use table::parse_columns;
pub use targets::Shown;
pub use tokenize::ModelTokenizer;
