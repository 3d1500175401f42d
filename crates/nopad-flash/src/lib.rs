//! nopad-flash: varlen causal FlashAttention forward and backward for packed, padding-free
//! batches (bf16 in and out, fp32 accumulation), on NVIDIA tensor cores through `mma.sync`.
//!
//! The caller owns memory and compilation: it passes raw device pointers in the backend's packed
//! layout (`qkv: [N, (H + 2 Hkv) * Dh]`, q heads then k heads then v heads per token row), one
//! scratch workspace sized by [`FlashAttention::workspace_bytes`], and an NVRTC loader with its
//! own disk cache. Sequences are given by `cu_seqlens`; attention is causal within a sequence and
//! never crosses one. A [`Plan`] (host tile lists, longest first) is built once per batch.
//!
//! Kernels: `fwd.cu` (forward, 64- or 128-row query tiles), `bwd_prep.cu` (D = rowsum(dO * O)),
//! `bwd_dkdv.cu` (dK, dV over key tiles, GQA group summed in registers; optionally dQ too,
//! through fp32 atomics), `bwd_dq.cu` (dQ over query tiles with recompute: the deterministic
//! backward; can compute D itself), `bwd_long.cu` (long sequences in FA2's layout: 128-key
//! tiles, 8 warps, P and dS through shared memory, dQ by atomics), `bwd_convert.cu` (atomic dQ
//! to bf16); `simple.cu` holds the scalar stage-1 kernels used as the GPU oracle
//! ([`KernelSet::Simple`]). Runs of short sequences share 64-row tiles (block-diagonal mask).
//! `reference` is the f64 CPU reference; `harness` checks and times everything (`flash-check`).

#![deny(missing_docs)]

mod attention;
pub mod harness;
pub mod plan;
pub mod reference;
mod staging;
mod wgmma;

pub use attention::{
    BackwardConfig, DqMode, FlashAttention, ForwardTiles, ForwardWgmma, KernelSet, LongKeys,
    ModuleLoader, PACK_SHORT,
};
pub use plan::Plan;

/// Sizes of one attention call. `n` tokens in `n_seqs` packed sequences.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlashDims {
    /// Total tokens N (rows of qkv), equal to `cu_seqlens[n_seqs]`.
    pub n: usize,
    /// Number of sequences S.
    pub n_seqs: usize,
    /// Upper bound on any sequence length.
    pub max_seqlen: usize,
    /// Query heads H.
    pub n_heads: usize,
    /// Key/value heads Hkv; H must be a multiple (query head h uses kv head h / (H / Hkv)).
    pub n_kv_heads: usize,
    /// Head dimension Dh: 64 or 128.
    pub head_dim: usize,
    /// Softmax scale, usually 1 / sqrt(Dh).
    pub scale: f32,
}

/// Errors of planning and launching; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    /// A shape the kernels do not support (head_dim other than 64/128, bad head ratio).
    #[error("unsupported attention shape: {0}")]
    Unsupported(String),
    /// `cu_seqlens` inconsistent with itself or with the dims.
    #[error("invalid cu_seqlens: {0}")]
    InvalidSeqlens(String),
    /// The caller's loader failed to compile or load a module.
    #[error("loading CUDA module {module}: {msg}")]
    Load {
        /// Module name (the .cu file).
        module: String,
        /// The loader's message (compile log included).
        msg: String,
    },
    /// A driver call (function lookup, attribute, copy, launch) failed.
    #[error("{what}: {source}")]
    Driver {
        /// What was being done, naming the kernel.
        what: String,
        /// The driver error.
        source: cudarc::driver::DriverError,
    },
}

/// Causal FLOPs of one call (flash-notes section 7 convention): forward `4 Dh H sum L^2 / 2`,
/// backward 2.5 x forward (5 matmuls against 2).
pub fn causal_flops(cu_seqlens_host: &[i32], n_heads: usize, head_dim: usize) -> (f64, f64) {
    let sum_sq: f64 = cu_seqlens_host
        .windows(2)
        .map(|w| ((w[1] - w[0]) as f64).powi(2))
        .sum();
    let fwd = 4.0 * head_dim as f64 * n_heads as f64 * sum_sq / 2.0;
    (fwd, 2.5 * fwd)
}

#[cfg(test)]
mod tests {
    #[test]
    fn causal_flops_convention() {
        let (f, b) = super::causal_flops(&[0, 4096, 8192], 32, 128);
        assert_eq!(f, 4.0 * 128.0 * 32.0 * 2.0 * 4096.0 * 4096.0 / 2.0);
        assert_eq!(b, 2.5 * f);
    }
}

#[cfg(test)]
mod thread_safety {
    // The backend keeps one FlashAttention and per-batch Plans in its device object.
    fn send_sync<T: Send + Sync>() {}
    #[test]
    fn handles_are_send_and_sync() {
        send_sync::<super::FlashAttention>();
        send_sync::<super::Plan>();
    }
}
