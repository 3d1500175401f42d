//! One packed micro-batch built by hand (independently of nopad-data's packers), shared by the
//! unit tests (`src/tests.rs`) and the CUDA model test (`tests/cuda_model.rs`); each includes
//! this file as a module and brings `Inputs` into scope above it.

use super::Inputs;

pub(crate) struct Packed {
    pub tokens: Vec<i32>,
    pub targets: Vec<i32>,
    pub pos: Vec<i32>,
    pub cu: Vec<i32>,
    pub max: usize,
}

impl Packed {
    /// No sequences yet (`cu = [0]`); `max` is the longest sequence the caller will push.
    pub fn empty(max: usize) -> Self {
        Packed {
            tokens: vec![],
            targets: vec![],
            pos: vec![],
            cu: vec![0],
            max,
        }
    }

    pub fn inputs(&self) -> Inputs<'_> {
        Inputs {
            tokens: &self.tokens,
            targets: &self.targets,
            position_ids: &self.pos,
            cu_seqlens: &self.cu,
            max_seqlen: self.max,
        }
    }
}
