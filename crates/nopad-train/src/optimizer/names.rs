//! The flag values of the optimizer's modes (`--optim-states`, `--master-weights`,
//! `--offload`) and their parsers, one name per mode both ways.

use super::{MasterPrecision, Placement, StatePrecision};
use crate::error::{Result, TrainError};

/// The flag value of a state precision: `f32`, `bf16` or `8bit`.
pub fn states_name(p: StatePrecision) -> &'static str {
    match p {
        StatePrecision::F32 => "f32",
        StatePrecision::Bf16 => "bf16",
        StatePrecision::Block8 => "8bit",
    }
}

/// The state precision a flag value names ([`states_name`]'s inverse).
pub fn parse_states(s: &str) -> Option<StatePrecision> {
    [
        StatePrecision::F32,
        StatePrecision::Bf16,
        StatePrecision::Block8,
    ]
    .into_iter()
    .find(|&p| states_name(p) == s)
}

/// The flag value of a master-weights mode: `f32` or `none`.
pub fn master_name(p: MasterPrecision) -> &'static str {
    match p {
        MasterPrecision::F32 => "f32",
        MasterPrecision::None => "none",
    }
}

/// The master-weights mode a flag value names ([`master_name`]'s inverse).
pub fn parse_master(s: &str) -> Option<MasterPrecision> {
    [MasterPrecision::F32, MasterPrecision::None]
        .into_iter()
        .find(|&p| master_name(p) == s)
}

/// The placement `--offload` names: `optimizer` puts the optimizer's state on the host.
pub fn parse_offload(s: &str) -> Result<Placement> {
    match s {
        "optimizer" => Ok(Placement::Host),
        _ => Err(TrainError::Config(format!(
            "`offload`: {s} is not `optimizer` (the only part that can be offloaded: the fp32 \
             weights and AdamW's moments)"
        ))),
    }
}
