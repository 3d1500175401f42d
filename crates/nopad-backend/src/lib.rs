//! nopad-backend: the small set of operations a Llama-family decoder needs, each with an explicit
//! forward and backward, behind one trait ([`Backend`]) that is implemented twice: [`cpu::Cpu`]
//! (f32 or f64, rayon, the `gemm` crate; the reference) and `cuda` (bf16 activations, fp32
//! master weights, cuBLASLt and NVRTC kernels).
//!
//! [`Backend`] is four traits by concern: [`Device`] (buffers, views, transfers, queue,
//! instrumentation), [`Ops`] (the math; each layer op takes one argument struct from [`args`]),
//! [`OptimizerOps`] (master weights and the AdamW update) and [`Staging`] (pinned host buffers
//! and asynchronous copies, for an optimizer offloaded to the host). Code that holds a concrete
//! backend brings the methods into scope with `use nopad_backend::prelude::*`.
//!
//! Legend used in every shape comment: N tokens, S sequences, D hidden, H query heads, Hkv key/value
//! heads, Dh head dim, F MLP width, V vocabulary.
//!
//! Rules every implementation follows (the model relies on them):
//! - Parameter gradients (`d_w`, `d_b`, `d_weight`) are written as the op's [`GradWrite`] says:
//!   overwritten by the first micro-batch of an optimizer step (so no zeroing pass is needed, and
//!   the buffer may hold anything before), accumulated (`+=`) by the others. `d_table` of the
//!   embedding backward is always accumulated (tied embeddings add to the output head's gradient).
//!   A parameter gradient passed as `None` is not computed at all (a frozen weight).
//! - Activation gradients are *overwritten*, except the residual-stream gradient written by
//!   [`Ops::rmsnorm_backward`], which is accumulated (the residual stream's gradient arrives from
//!   the skip connection and from the norm), and a linear layer's `dx` when the caller asks to
//!   accumulate (an adapter path adding onto its base layer's).
//! - Boundaries come only from `cu_seqlens`; no op derives them from position ids.
//! - Buffers may be longer than an op needs: ops read and write only the first elements their
//!   dimensions name.

#![deny(missing_docs)]

pub mod args;
pub mod cpu;
pub mod cuda;
mod device;
mod dropout;
mod error;
pub mod nf4;
mod ops;
mod optim;
mod staging;

pub(crate) use device::check_parts;
pub use device::{Accounting, Device, Kind};
pub use dropout::{dropout_keep, dropout_scale, dropout_threshold, mix64};
pub use error::{BackendError, Result};
pub use ops::{AttnDims, GradWrite, HeadNormDims, LinearDims, Ops, RopeDims};
pub use optim::codes;
pub use optim::{
    AdamW, AdamWState, AdamWStates, AdamWStep, MasterPrecision, Moment, MomentMut, OptimizerOps,
    ParamRounding, StateData, StatePrecision,
};
pub use staging::Staging;

/// One backend: a [`Device`] with the [`Ops`] and the [`OptimizerOps`]. Downstream code is
/// generic over `B: Backend`; every type that implements the three traits is one.
pub trait Backend: Device + Ops + OptimizerOps + Staging {}

impl<B: Device + Ops + OptimizerOps + Staging + ?Sized> Backend for B {}

/// The traits and argument structs, for code that calls ops on a concrete backend.
pub mod prelude {
    pub use crate::args::*;
    pub use crate::{
        AdamW, AdamWState, AdamWStates, AdamWStep, AttnDims, Backend, Device, GradWrite,
        HeadNormDims, Kind, LinearDims, MasterPrecision, Moment, MomentMut, Ops, OptimizerOps,
        ParamRounding, RopeDims, Staging, StateData, StatePrecision,
    };
}
