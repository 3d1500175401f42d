//! nopad-flash: varlen causal FlashAttention forward and backward for packed, padding-free
//! batches (bf16 in and out, fp32 accumulation) on NVIDIA tensor cores: `mma.sync.m16n8k16`
//! kernels on every sm_80+ device and warpgroup-MMA (`wgmma`) kernels on compute capability 9.0.
//!
//! The caller owns device memory and compilation: it passes raw device pointers in the
//! backend's packed layout (`qkv: [N, (H + 2 Hkv) * Dh]`, q heads then k heads then v heads per
//! token row), one scratch workspace sized by [`FlashAttention::workspace_bytes`], and an NVRTC
//! loader with its own disk cache ([`ModuleLoader`]). The crate allocates no device memory; it
//! keeps a small pool of page-locked host buffers for the tile-list uploads (`staging`).
//! Sequences are given by `cu_seqlens`; attention is causal within a sequence and never crosses
//! one. A [`Plan`] (host tile lists, longest first) is built once per batch.
//!
//! Modules by role: `choice` (the one pure function from head dim and device to the kernels and
//! tile lists: [`route`]), `module` (sources, loading, shared-memory sizes), `forward` and
//! `backward` (one named launch function per kernel family), `attention` ([`FlashAttention`]),
//! `plan` (tile lists and workspace layout), `staging` (page-locked upload buffers), `wgmma`
//! (operand-layout self-test), `reference` (the f64 CPU reference), `error`.
//!
//! Kernels (`src/kernels/`): `common.cuh` (bf16, mma.sync, ldmatrix, cp.async, swizzle),
//! `wgmma.cuh` (sm_90a descriptors and wrappers), `fwd.cu` (64- and 128-row forward),
//! `fwd_wgmma.cu`, `bwd_dq.cu` (dQ by recompute, D fused), `bwd_dkdv.cu` (dK, dV),
//! `bwd_wgmma_short.cu` (both on one warpgroup) and `bwd_wgmma_long.cu` (dK, dV of long
//! sequences on two warpgroups, Dh 128). The design (fragment layouts, tiles, data flow, test
//! shapes) is `docs/FLASH.md`.

#![deny(missing_docs)]

mod attention;
mod backward;
pub mod choice;
mod error;
mod forward;
mod module;
pub mod plan;
pub mod reference;
mod staging;
mod wgmma;

pub use attention::{FlashAttention, PACK_SHORT};
pub use choice::{arch_for, has_wgmma, route, Capability, Kernel, Route, Step, Tiles};
pub use error::FlashError;
pub use module::{ptx_loader, ModuleLoader, SOURCES};
pub use plan::Plan;

/// Shape of one varlen attention call over a packed `qkv` buffer: `n` tokens in `n_seqs`
/// sequences. The backend re-exports it as `nopad_backend::AttnDims`, so the CPU reference, the
/// backend's own kernels and this crate share one struct.
///
/// `qkv: [N, (H + 2·Hkv)·Dh]`: each row holds the H query heads, then the Hkv key heads, then the
/// Hkv value heads. Query head `h` reads key/value head `h / (H / Hkv)` (grouped-query attention).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlashDims {
    /// Tokens N (rows of qkv), equal to `cu_seqlens[n_seqs]`.
    pub n: usize,
    /// Sequences S (`cu_seqlens` has S + 1 entries).
    pub n_seqs: usize,
    /// Upper bound on any sequence length, computed on the host by the packer.
    pub max_seqlen: usize,
    /// Query heads H.
    pub n_heads: usize,
    /// Key/value heads Hkv; divides H.
    pub n_kv_heads: usize,
    /// Head dimension Dh (these kernels take 64 or 128; the backend's own kernels take others).
    pub head_dim: usize,
    /// Softmax scale, usually `1/√Dh`.
    pub scale: f32,
}

impl FlashDims {
    /// Width of one `qkv` row.
    pub fn qkv_width(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }
    /// Width of one output row, `H·Dh`.
    pub fn out_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
}

/// Causal FLOPs of one call (the convention of `docs/FLASH.md` section 11): forward `4 Dh H sum L^2 / 2`,
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
