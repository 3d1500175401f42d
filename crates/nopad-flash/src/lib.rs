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
//! one, optionally limited to a sliding window ([`FlashDims::window`]). A [`Plan`] (host tile
//! lists, longest first) is built once per batch.
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
    /// Sliding window W (HF's `sliding_window`): query i of a sequence sees key j of the same
    /// sequence iff `i - W < j <= i`, itself and the W − 1 keys before it. `None`: plain causal.
    /// At least 1.
    pub window: Option<usize>,
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
    /// The window where it hides a key from some query of a batch whose longest sequence has
    /// `max_len` tokens (`W < max_len`); `None` where every sequence fits in it, which is plain
    /// causal attention.
    pub fn window_within(&self, max_len: usize) -> Option<usize> {
        self.window.filter(|&w| w < max_len)
    }
}

/// Causal FLOPs of one call (the convention of `docs/FLASH.md` section 11): forward `4 Dh H sum L^2 / 2`,
/// backward 2.5 x forward (5 matmuls against 2).
pub fn causal_flops(cu_seqlens_host: &[i32], n_heads: usize, head_dim: usize) -> (f64, f64) {
    attention_flops(cu_seqlens_host, n_heads, head_dim, None)
}

/// [`causal_flops`] under a sliding window W: a sequence of L > W tokens loses the triangle of
/// `(L - W)^2 / 2` query-key pairs beyond the window, so it counts `(L^2 - (L - W)^2) / 2`
/// pairs instead of `L^2 / 2` (the same convention, which counts the diagonal as half).
pub fn attention_flops(
    cu_seqlens_host: &[i32],
    n_heads: usize,
    head_dim: usize,
    window: Option<usize>,
) -> (f64, f64) {
    let pairs: f64 = cu_seqlens_host
        .windows(2)
        .map(|w| {
            let l = (w[1] - w[0]) as f64;
            match window.map(|w| w as f64) {
                Some(w) if w < l => (l * l - (l - w) * (l - w)) / 2.0,
                _ => l * l / 2.0,
            }
        })
        .sum();
    let fwd = 4.0 * head_dim as f64 * n_heads as f64 * pairs;
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

    #[test]
    fn windowed_flops_drop_the_triangle_beyond_the_window() {
        let cu = [0, 8192, 8192 + 100];
        let (causal, _) = super::causal_flops(&cu, 32, 128);
        // A window no sequence exceeds changes nothing.
        assert_eq!(super::attention_flops(&cu, 32, 128, Some(8192)).0, causal);
        // W = 4096: the 8192-token sequence keeps 8192^2/2 - 4096^2/2 pairs, the short one all.
        let (f, b) = super::attention_flops(&cu, 32, 128, Some(4096));
        let pairs = (8192.0f64.powi(2) - 4096.0f64.powi(2)) / 2.0 + 100.0f64.powi(2) / 2.0;
        assert_eq!(f, 4.0 * 128.0 * 32.0 * pairs);
        assert_eq!(b, 2.5 * f);
        // W = 1: one pair per token on the long sequence (8192^2 - 8191^2) / 2 = 8191.5.
        let (one, _) = super::attention_flops(&[0, 8192], 1, 1, Some(1));
        assert_eq!(one, 4.0 * 8191.5);
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
