//! The flag values of the optimizer's modes (`--optim-states`, `--master-weights`,
//! `--offload`, which also names activations) and their parsers, one name per mode both ways.

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

/// What `--offload` moves to the host, a comma-separated list: `optimizer` (the fp32 weights
/// and AdamW's moments, updated on the host's cores) and `activations:K` (the gate/up
/// projections of K layers between their forward and backward).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offload {
    /// Where the optimizer's state lives.
    pub optimizer: Placement,
    /// Layers whose gate/up projections are offloaded (0: none).
    pub activations: usize,
}

/// The parts `--offload` names (see [`Offload`]).
pub fn parse_offload(s: &str) -> Result<Offload> {
    let mut o = Offload::default();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item {
            "optimizer" => o.optimizer = Placement::Host,
            "activations" => {
                return Err(TrainError::Config(
                    "`offload`: `activations` needs the number of layers, `activations:K` \
                     (e.g. `activations:16`: every other layer of a 32-layer model)"
                        .into(),
                ))
            }
            _ => match item.strip_prefix("activations:").map(str::parse::<usize>) {
                Some(Ok(k)) => o.activations = k,
                _ => {
                    return Err(TrainError::Config(format!(
                        "`offload`: `{item}` is not `optimizer` or `activations:K` (K layers, \
                         a number)"
                    )))
                }
            },
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_lists_parse() {
        let o = parse_offload("optimizer").unwrap();
        assert_eq!((o.optimizer, o.activations), (Placement::Host, 0));
        let o = parse_offload("activations:16, optimizer").unwrap();
        assert_eq!((o.optimizer, o.activations), (Placement::Host, 16));
        let o = parse_offload("activations:3").unwrap();
        assert_eq!((o.optimizer, o.activations), (Placement::Device, 3));
        for bad in ["activations", "activations:x", "gradients"] {
            let e = parse_offload(bad).unwrap_err().to_string();
            assert!(e.contains("activations:K"), "{bad}: {e}");
        }
    }
}
