//! The [`Ops`] half of a backend: the math, each op with an explicit forward and backward. The
//! element-wise ops take their few arguments directly; every layer op takes one argument struct
//! from [`crate::args`], where its shapes and write rules are documented.

use crate::args::{
    AddRmsNormFwd, AttnBwd, AttnFwd, ColumnsLinearBwd, ColumnsLinearFwd, DequantNf4, Dropout,
    EmbeddingBwd, EmbeddingFwd, HeadRmsNormBwd, HeadRmsNormFwd, LinearBwd, LinearFwd, LmHeadLoss,
    RmsNormBwd, RmsNormFwd, Rope, SwigluBwd, SwigluFwd,
};
use crate::{Device, Result};

/// How an op writes a gradient it does not own alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWrite {
    /// `d_w = …`: the gradient's previous contents are ignored (they may be anything, even NaN).
    Overwrite,
    /// `d_w += …`.
    Accumulate,
}

/// Shape of a GEMM `y[N, out] = x[N, in] · w[out, in]ᵀ (+ b[out])`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    /// Rows (tokens).
    pub n: usize,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
}

/// Shape of varlen attention over a packed `qkv` buffer: the one struct shared with the
/// FlashAttention crate, whose kernels the CUDA backend calls with it.
pub use nopad_flash::FlashDims as AttnDims;

/// Rotary embedding over the first `n_rot_heads` heads of each row of a strided buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeDims {
    /// Tokens N.
    pub n: usize,
    /// Elements between the starts of consecutive rows.
    pub row_stride: usize,
    /// Heads to rotate, starting at the beginning of the row (H + Hkv: queries and keys).
    pub n_rot_heads: usize,
    /// Head dimension Dh (even); `inv_freq` has Dh/2 entries.
    pub head_dim: usize,
}

/// The query and key heads of a packed `qkv` buffer `[N, (H + 2·Hkv)·Dh]`: each row holds H
/// query heads, then Hkv key heads, then Hkv value heads, Dh values each. The per-head norm
/// (Qwen3's `q_norm`/`k_norm`) normalises the first H + Hkv heads of every row and leaves the
/// values alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadNormDims {
    /// Tokens N.
    pub n: usize,
    /// Query heads H (normalised with the first Dh weights).
    pub heads: usize,
    /// Key/value heads Hkv (keys normalised with the last Dh weights).
    pub kv_heads: usize,
    /// Head dimension Dh.
    pub head_dim: usize,
}

impl HeadNormDims {
    /// Elements of one `qkv` row, `(H + 2·Hkv)·Dh`.
    pub fn row_stride(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
    /// Normalised heads of one row, H + Hkv: the saved inputs are `[N, H + Hkv, Dh]`, the
    /// reciprocal RMS values `[N, H + Hkv]`.
    pub fn normed_heads(&self) -> usize {
        self.heads + self.kv_heads
    }
}

/// The forward and backward of every op a Llama-family decoder needs.
pub trait Ops: Device {
    // ---- element-wise ---------------------------------------------------------------------

    /// `out[i] = a[i] + b[i]` for `i < n` (residual connections).
    fn add(&self, out: Self::Mut<'_>, a: Self::Ref<'_>, b: Self::Ref<'_>, n: usize) -> Result<()>;
    /// `out[i] += a[i]` for `i < n`.
    fn add_assign(&self, out: Self::Mut<'_>, a: Self::Ref<'_>, n: usize) -> Result<()>;
    /// `x[i] *= s` for `i < n` (an adapter's scale on its output or gradient).
    fn scale(&self, x: Self::Mut<'_>, s: f32, n: usize) -> Result<()>;
    /// `Σ x[i]²` over `i < n`, in f64 on the host (for gradient norms).
    fn sum_squares(&self, x: Self::Ref<'_>, n: usize) -> Result<f64>;
    /// An adapter's scaled up-projection added into its columns of a fused output (see
    /// [`ColumnsLinearFwd`]).
    fn columns_linear_forward(&self, a: ColumnsLinearFwd<'_, Self>) -> Result<()>;
    /// Its backward, reading the fused gradient's columns in place (see [`ColumnsLinearBwd`]).
    fn columns_linear_backward(&self, a: ColumnsLinearBwd<'_, Self>) -> Result<()>;
    /// Seeded dropout whose mask the backward regenerates (see [`Dropout`]).
    fn dropout(&self, a: Dropout<'_, Self>) -> Result<()>;
    /// An NF4 matrix (a 4-bit frozen base weight) read into Compute values just ahead of its
    /// GEMM (see [`DequantNf4`]).
    fn dequant_nf4(&self, a: DequantNf4<'_, Self>) -> Result<()>;

    // ---- layers -----------------------------------------------------------------------------

    /// Embedding lookup (see [`EmbeddingFwd`]).
    fn embedding_forward(&self, a: EmbeddingFwd<'_, Self>) -> Result<()>;
    /// Embedding gradient, scattered and accumulated (see [`EmbeddingBwd`]).
    fn embedding_backward(&self, a: EmbeddingBwd<'_, Self>) -> Result<()>;
    /// A linear layer (see [`LinearFwd`]).
    fn linear_forward(&self, a: LinearFwd<'_, Self>) -> Result<()>;
    /// A linear layer's gradients, each optional (see [`LinearBwd`]: the frozen-weight and
    /// adapter cases).
    fn linear_backward(&self, a: LinearBwd<'_, Self>) -> Result<()>;
    /// RMSNorm (see [`RmsNormFwd`]).
    fn rmsnorm_forward(&self, a: RmsNormFwd<'_, Self>) -> Result<()>;
    /// The residual add fused with the RMSNorm after it (see [`AddRmsNormFwd`]).
    fn add_rmsnorm_forward(&self, a: AddRmsNormFwd<'_, Self>) -> Result<()>;
    /// RMSNorm backward, accumulating into the residual-stream gradient (see [`RmsNormBwd`]).
    fn rmsnorm_backward(&self, a: RmsNormBwd<'_, Self>) -> Result<()>;
    /// RMSNorm of every query and key head of a packed `qkv` buffer, in place, saving the
    /// heads' inputs and reciprocal RMS (see [`HeadRmsNormFwd`]).
    fn head_rmsnorm_forward(&self, a: HeadRmsNormFwd<'_, Self>) -> Result<()>;
    /// Its backward, in place over the query and key heads' gradient (see [`HeadRmsNormBwd`]).
    fn head_rmsnorm_backward(&self, a: HeadRmsNormBwd<'_, Self>) -> Result<()>;
    /// Rotary embedding in place, HF rotate-half convention: for head vector `x = [x1, x2]`
    /// (halves of Dh/2), angle `θ_i = pos · inv_freq[i]`:
    /// `x1' = x1·cos θ − x2·sin θ`, `x2' = x2·cos θ + x1·sin θ`.
    fn rope_forward(&self, a: Rope<'_, Self>) -> Result<()>;
    /// The inverse rotation, in place on the gradient (RoPE is orthogonal, so its backward is
    /// the forward with `−θ`).
    fn rope_backward(&self, a: Rope<'_, Self>) -> Result<()>;
    /// Causal attention within each sequence of `cu_seqlens`, never across (see [`AttnFwd`]).
    fn attention_forward(&self, a: AttnFwd<'_, Self>) -> Result<()>;
    /// Attention backward: overwrites all of `d_qkv` (see [`AttnBwd`]).
    fn attention_backward(&self, a: AttnBwd<'_, Self>) -> Result<()>;
    /// SwiGLU (see [`SwigluFwd`]).
    fn swiglu_forward(&self, a: SwigluFwd<'_, Self>) -> Result<()>;
    /// SwiGLU backward, in place over the forward's input (see [`SwigluBwd`]).
    fn swiglu_backward(&self, a: SwigluBwd<'_, Self>) -> Result<()>;
    /// Fused output head and cross-entropy, forward and (optionally) backward in one pass, in
    /// chunks of rows so that the full `[N, V]` logits never exist at once (see [`LmHeadLoss`]).
    fn lm_head_loss(&self, a: LmHeadLoss<'_, Self>) -> Result<()>;

    // ---- generation -------------------------------------------------------------------------

    /// Rows (or a run of their columns) copied to chosen rows of another buffer: a KV cache's
    /// append, a gather of each prompt's last row (see [`crate::args::CopyRows`]).
    fn copy_rows(&self, a: crate::args::CopyRows<'_, Self>) -> Result<()>;
    /// One query row per sequence against that sequence's cached keys and values, GQA, one pass
    /// over the cache (see [`crate::args::DecodeAttn`]).
    fn decode_attention(&self, a: crate::args::DecodeAttn<'_, Self>) -> Result<()>;
}
