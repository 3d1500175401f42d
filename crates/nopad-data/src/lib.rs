//! nopad-data: turns what users bring (JSONL files, built-in synthetic sets) into [`Example`]s, and
//! examples into [`Batch`]es with a packing [`Strategy`].
//!
//! This crate knows nothing of models or devices. Its output, [`Batch`], carries every boundary
//! the model needs (`cu_seqlens`, `position_ids`, shifted `targets`), computed once on the host.

#![deny(missing_docs)]

mod batch;

pub use batch::{Batch, BatchStats, Example, Strategy, IGNORE_INDEX};
