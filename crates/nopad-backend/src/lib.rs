//! nopad-backend: the small set of operations a Llama-family decoder needs, each with an explicit
//! forward and backward, behind one trait ([`Backend`]) that is implemented twice: [`cpu::Cpu`]
//! (f32 or f64, rayon, the `gemm` crate; the reference) and `cuda` (bf16 activations, fp32
//! master weights, cuBLASLt and NVRTC kernels).
//!
//! Legend used in every shape comment: N tokens, S sequences, D hidden, H query heads, Hkv key/value
//! heads, Dh head dim, F MLP width, V vocabulary.
//!
//! Rules every implementation follows (the model relies on them):
//! - Parameter gradients (`d_w`, `d_b`, `d_weight`) are written as the op's [`GradWrite`] says:
//!   overwritten by the first micro-batch of an optimizer step (so no zeroing pass is needed, and
//!   the buffer may hold anything before), accumulated (`+=`) by the others. `d_table` of the
//!   embedding backward is always accumulated (tied embeddings add to the output head's gradient).
//! - Activation gradients are *overwritten*, except the residual-stream gradient written by
//!   [`Backend::rmsnorm_backward`], which is accumulated (the residual stream's gradient arrives from
//!   the skip connection and from the norm).
//! - Boundaries come only from `cu_seqlens`; no op derives them from position ids.
//! - Buffers may be longer than an op needs: ops read and write only the first elements their
//!   dimensions name.

#![deny(missing_docs)]

pub mod cpu;
pub mod cuda;
mod error;

pub use error::{BackendError, Result};

use std::ops::Range;

/// Storage class of a buffer. The backend decides the element type of each class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Weights as the forward pass reads them, activations and activation gradients:
    /// bf16 on CUDA in mixed precision, the scalar type on the CPU.
    Compute,
    /// Optimizer moments, master weights, statistics: fp32 on CUDA, the scalar type on the CPU.
    Master,
    /// Parameter gradients: fp32 on CUDA unless `CudaOptions::bf16_grads` (bf16, each GEMM still
    /// accumulating in fp32 and rounding once per write), the scalar type on the CPU.
    Grad,
}

/// Checks the parts of [`Backend::alloc_parts`]: aligned offsets, inside the allocation.
pub(crate) fn check_parts(
    bytes: usize,
    parts: &[(usize, usize, Kind)],
    size: impl Fn(Kind) -> usize,
) -> Result<()> {
    for (i, &(off, len, kind)) in parts.iter().enumerate() {
        let end = len.checked_mul(size(kind)).and_then(|b| b.checked_add(off));
        if off % 256 != 0 || end.is_none_or(|e| e > bytes) {
            return Err(BackendError::Shape {
                op: "alloc_parts",
                what: format!(
                    "part {i} ({len} x {kind:?} at byte {off}) is unaligned or outside the {bytes} bytes"
                ),
            });
        }
    }
    Ok(())
}

/// How an op writes a parameter gradient.
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

/// Shape of varlen attention over a packed `qkv` buffer.
///
/// `qkv: [N, (H + 2·Hkv)·Dh]`: each row holds the H query heads, then the Hkv key heads, then the
/// Hkv value heads. Query head `h` reads key/value head `h / (H / Hkv)` (grouped-query attention).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnDims {
    /// Tokens N (= `cu_seqlens[S]`).
    pub n: usize,
    /// Sequences S (`cu_seqlens` has S + 1 entries).
    pub n_seqs: usize,
    /// Longest sequence, computed on the host by the packer.
    pub max_seqlen: usize,
    /// Query heads H.
    pub n_heads: usize,
    /// Key/value heads Hkv; divides H.
    pub n_kv_heads: usize,
    /// Head dimension Dh.
    pub head_dim: usize,
    /// Softmax scale, usually `1/√Dh`.
    pub scale: f32,
}

impl AttnDims {
    /// Width of one `qkv` row.
    pub fn qkv_width(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }
    /// Width of one output row, `H·Dh`.
    pub fn out_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
}

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

/// Hyper-parameters of one AdamW update (decoupled weight decay, bias correction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Learning rate of this step.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay (0 for norms and biases).
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u64,
    /// Factor applied to every gradient before the update (gradient-norm clipping).
    pub grad_scale: f32,
}

/// One backend: device memory plus the forward and backward of every op.
///
/// Buffers are owned by [`Backend::Buf`]; ops take borrowed views ([`Backend::Ref`],
/// [`Backend::Mut`]) so that one tensor of a flat parameter buffer can be passed without a copy.
pub trait Backend {
    /// An owned buffer of one [`Kind`].
    type Buf;
    /// A read-only view of (part of) a buffer.
    type Ref<'a>: Copy
    where
        Self: 'a;
    /// A writable view of (part of) a buffer.
    type Mut<'a>
    where
        Self: 'a;
    /// An `i32` array on the device (token ids, position ids, targets, `cu_seqlens`).
    type Ints;

    /// Human-readable description of the device, for logs and summaries.
    fn describe(&self) -> String;

    // ---- memory ---------------------------------------------------------------------------

    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize, kind: Kind) -> Result<Self::Buf>;
    /// Bytes of one element of a [`Kind`].
    fn kind_size(&self, kind: Kind) -> usize;
    /// Zero-filled buffers carved out of one allocation of `bytes` bytes: part `i` is
    /// `parts[i] = (byte offset, elements, kind)`. Parts may overlap; the caller guarantees that
    /// overlapping parts never hold data it needs at the same time (the model places parameter
    /// gradients over activations that are dead by the time the gradients are written). Offsets
    /// must be multiples of 256 and parts must lie inside `bytes`. The default allocates every
    /// part on its own (no aliasing: the same results with more memory), which is what the CPU
    /// backend does.
    fn alloc_parts(&self, bytes: usize, parts: &[(usize, usize, Kind)]) -> Result<Vec<Self::Buf>> {
        check_parts(bytes, parts, |k| self.kind_size(k))?;
        parts
            .iter()
            .map(|&(_, len, kind)| self.alloc(len, kind))
            .collect()
    }
    /// Number of elements of a buffer.
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    /// A view of `range` of a buffer.
    fn view<'a>(&'a self, buf: &'a Self::Buf, range: Range<usize>) -> Self::Ref<'a>;
    /// A writable view of `range` of a buffer.
    fn view_mut<'a>(&'a self, buf: &'a mut Self::Buf, range: Range<usize>) -> Self::Mut<'a>;
    /// Two writable views of disjoint ranges of one buffer (a weight gradient and its bias
    /// gradient). Overlapping ranges are a caller bug and panic.
    fn view_mut2<'a>(
        &'a self,
        buf: &'a mut Self::Buf,
        a: Range<usize>,
        b: Range<usize>,
    ) -> (Self::Mut<'a>, Self::Mut<'a>);
    /// Copies host values into `buf[offset..offset + data.len()]` (converting to the buffer type).
    fn write(&self, buf: &mut Self::Buf, offset: usize, data: &[f32]) -> Result<()>;
    /// Copies `buf[range]` to the host as f32.
    fn read(&self, buf: &Self::Buf, range: Range<usize>) -> Result<Vec<f32>>;
    /// Copies `buf[range]` to the host as f64 (exact for f64 buffers; the default widens f32).
    fn read_f64(&self, buf: &Self::Buf, range: Range<usize>) -> Result<Vec<f64>> {
        Ok(self.read(buf, range)?.into_iter().map(f64::from).collect())
    }
    /// Sets a view to zero.
    fn zero(&self, x: Self::Mut<'_>) -> Result<()>;
    /// Uploads an i32 array.
    fn ints(&self, data: &[i32]) -> Result<Self::Ints>;
    /// Waits for all queued work (a no-op on the CPU).
    fn synchronize(&self) -> Result<()>;
    /// Most bytes held by live buffers at once so far (like `torch.cuda.max_memory_allocated`).
    fn peak_memory(&self) -> usize;
    /// Records a timestamp in the device's queue (an event on CUDA; the host clock on the CPU,
    /// whose ops run synchronously), for profiling without synchronising.
    fn timestamp(&self) -> Result<()>;
    /// Waits for the queued work, then returns the seconds between consecutive timestamps
    /// recorded since the last call (one fewer than there were) and forgets them.
    fn take_timestamps(&self) -> Result<Vec<f64>>;
    /// Gives the free blocks a caching allocator holds back to the device (after the queued
    /// work finishes). The model calls it when its activations grow: the old, smaller blocks
    /// would otherwise stay reserved, as no larger request can use them. A no-op by default.
    fn release_cached(&self) -> Result<()> {
        Ok(())
    }
    /// Most bytes reserved from the device at once, cached free blocks included (like
    /// `torch.cuda.max_memory_reserved`); backends without a cache report [`Backend::peak_memory`].
    fn peak_reserved_memory(&self) -> usize {
        self.peak_memory()
    }

    // ---- element-wise ---------------------------------------------------------------------

    /// `out[i] = a[i] + b[i]` for `i < n` (residual connections).
    fn add(&self, out: Self::Mut<'_>, a: Self::Ref<'_>, b: Self::Ref<'_>, n: usize) -> Result<()>;
    /// `out[i] += a[i]` for `i < n`.
    fn add_assign(&self, out: Self::Mut<'_>, a: Self::Ref<'_>, n: usize) -> Result<()>;
    /// `Σ x[i]²` over `i < n`, in f64 on the host (for gradient norms).
    fn sum_squares(&self, x: Self::Ref<'_>, n: usize) -> Result<f64>;

    // ---- layers -------------------------------------------------------------------------

    /// `x[N, D] = table[tokens[t], :]`.
    fn embedding_forward(
        &self,
        x: Self::Mut<'_>,
        table: Self::Ref<'_>,
        tokens: &Self::Ints,
        n: usize,
        d: usize,
    ) -> Result<()>;
    /// `d_table[tokens[t], :] += dx[t, :]` (accumulates; `d_table` is Master).
    fn embedding_backward(
        &self,
        d_table: Self::Mut<'_>,
        dx: Self::Ref<'_>,
        tokens: &Self::Ints,
        n: usize,
        d: usize,
    ) -> Result<()>;

    /// `y[N, out] = x[N, in] · w[out, in]ᵀ (+ b[out])`.
    fn linear_forward(
        &self,
        y: Self::Mut<'_>,
        x: Self::Ref<'_>,
        w: Self::Ref<'_>,
        b: Option<Self::Ref<'_>>,
        dims: LinearDims,
    ) -> Result<()>;
    /// `dx = dy · w` (overwrites, skipped when `dx` is None), `d_w (+)= dyᵀ · x`,
    /// `d_b (+)= Σ_rows dy` (`d_w`, `d_b` are Grad; `+=` or `=` as `acc` says, also when N = 0).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        dx: Option<Self::Mut<'_>>,
        d_w: Self::Mut<'_>,
        d_b: Option<Self::Mut<'_>>,
        dy: Self::Ref<'_>,
        x: Self::Ref<'_>,
        w: Self::Ref<'_>,
        dims: LinearDims,
        acc: GradWrite,
    ) -> Result<()>;

    /// RMSNorm: `rstd[t] = 1/√(mean(x[t]²) + eps)`, `y[t] = x[t] · rstd[t] · weight`.
    /// `rstd: [N]` is Master and saved for the backward.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        y: Self::Mut<'_>,
        rstd: Self::Mut<'_>,
        x: Self::Ref<'_>,
        weight: Self::Ref<'_>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()>;
    /// The residual add fused with the RMSNorm after it: `x += r` (`x, r: [N, D]` Compute), then
    /// `y = rmsnorm(x)` with `rstd` saved, exactly as `add_assign` followed by `rmsnorm_forward`.
    #[allow(clippy::too_many_arguments)]
    fn add_rmsnorm_forward(
        &self,
        y: Self::Mut<'_>,
        rstd: Self::Mut<'_>,
        x: Self::Mut<'_>,
        r: Self::Ref<'_>,
        weight: Self::Ref<'_>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()>;
    /// RMSNorm backward: `dx += ∂L/∂x` (accumulates into the residual-stream gradient),
    /// `d_weight (+)= Σ_t dy[t] · x[t] · rstd[t]` (as `acc` says).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: Self::Mut<'_>,
        d_weight: Self::Mut<'_>,
        dy: Self::Ref<'_>,
        x: Self::Ref<'_>,
        weight: Self::Ref<'_>,
        rstd: Self::Ref<'_>,
        n: usize,
        d: usize,
        acc: GradWrite,
    ) -> Result<()>;

    /// Rotary embedding in place, HF rotate-half convention: for head vector `x = [x1, x2]`
    /// (halves of Dh/2), angle `θ_i = pos · inv_freq[i]`:
    /// `x1' = x1·cos θ − x2·sin θ`, `x2' = x2·cos θ + x1·sin θ`.
    /// `inv_freq: [Dh/2]` (Master), `positions: [N]`.
    fn rope_forward(
        &self,
        x: Self::Mut<'_>,
        inv_freq: Self::Ref<'_>,
        positions: &Self::Ints,
        dims: RopeDims,
    ) -> Result<()>;
    /// The inverse rotation, in place on the gradient (RoPE is orthogonal, so its backward is
    /// the forward with `−θ`).
    fn rope_backward(
        &self,
        dx: Self::Mut<'_>,
        inv_freq: Self::Ref<'_>,
        positions: &Self::Ints,
        dims: RopeDims,
    ) -> Result<()>;

    /// Causal attention within each sequence of `cu_seqlens`, never across:
    /// `out: [N, H·Dh]`, `lse: [H, N]` (Master; natural-log log-sum-exp of the scaled scores,
    /// saved for the backward), `qkv` as described in [`AttnDims`], `cu_seqlens: [S + 1]`.
    fn attention_forward(
        &self,
        out: Self::Mut<'_>,
        lse: Self::Mut<'_>,
        qkv: Self::Ref<'_>,
        cu_seqlens: &Self::Ints,
        dims: AttnDims,
    ) -> Result<()>;
    /// Attention backward: overwrites all of `d_qkv` (`[N, (H + 2·Hkv)·Dh]`) from `d_out`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        d_qkv: Self::Mut<'_>,
        d_out: Self::Ref<'_>,
        qkv: Self::Ref<'_>,
        out: Self::Ref<'_>,
        lse: Self::Ref<'_>,
        cu_seqlens: &Self::Ints,
        dims: AttnDims,
    ) -> Result<()>;

    /// SwiGLU: `gu: [N, 2F]` holds gate then up per row; `a[N, F] = silu(gate) · up`.
    fn swiglu_forward(&self, a: Self::Mut<'_>, gu: Self::Ref<'_>, n: usize, f: usize)
        -> Result<()>;
    /// SwiGLU backward, in place: `gu: [N, 2F]` (the forward's input) is overwritten with its
    /// gradient `d_gu` from `d_a: [N, F]` (the backward is the last reader of `gu`, so no
    /// separate `[N, 2F]` buffer is needed).
    fn swiglu_backward(
        &self,
        gu: Self::Mut<'_>,
        d_a: Self::Ref<'_>,
        n: usize,
        f: usize,
    ) -> Result<()>;

    /// Fused output head and cross-entropy, forward and (optionally) backward in one pass, in
    /// chunks of rows so that the full `[N, V]` logits never exist at once.
    ///
    /// `logits[t] = x[t] · w[V, D]ᵀ`; for each row with `targets[t] != -100`,
    /// `loss += logsumexp(logits[t]) − logits[t][targets[t]]`. Adds the loss sum into
    /// `loss_sum[0]` (Master, one element). When `dx` is given: `dx[t] = grad_scale ·
    /// ∂loss_t/∂x[t]` (overwrites; zero for rows without a target) and
    /// `d_w (+)= grad_scale · Σ_t ∂loss_t/∂w` (as `acc` says; zero rows with a target and
    /// `Overwrite` leave `d_w` zero). `grad_scale` is 1 / (target tokens of the whole
    /// optimizer step), which makes the loss token-weighted across micro-batches.
    #[allow(clippy::too_many_arguments)]
    fn lm_head_loss(
        &self,
        loss_sum: Self::Mut<'_>,
        dx: Option<Self::Mut<'_>>,
        d_w: Option<Self::Mut<'_>>,
        x: Self::Ref<'_>,
        w: Self::Ref<'_>,
        targets: &Self::Ints,
        dims: LinearDims,
        grad_scale: f32,
        acc: GradWrite,
    ) -> Result<()>;

    /// One AdamW update over `n` parameters: `param` (Compute) is what the forward reads;
    /// `master` (from [`Backend::master_new`]) is the fp32 copy the update is applied to when the
    /// backend keeps one (see [`Backend::needs_master`]), after which `param` is refreshed from it.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        param: Self::Mut<'_>,
        master: Option<Self::Mut<'_>>,
        grad: Self::Ref<'_>,
        m: Self::Mut<'_>,
        v: Self::Mut<'_>,
        n: usize,
        hp: AdamW,
    ) -> Result<()>;
    /// Whether Compute and Master differ in type, so the optimizer needs a master copy.
    fn needs_master(&self) -> bool;
    /// A master copy of `params[..n]` (called only when [`Backend::needs_master`]): fp32 weights
    /// equal to the parameters, in whatever form [`Backend::adamw`] takes as `master`. The default
    /// is a full Master buffer; the CUDA backend keeps only the low 16 bits of each fp32 weight,
    /// whose high 16 bits are the bf16 parameter itself, so exact fp32 master weights cost 2 bytes
    /// per parameter instead of 4.
    fn master_new(&self, params: &Self::Buf, n: usize) -> Result<Self::Buf> {
        let mut master = self.alloc(n, Kind::Master)?;
        const CHUNK: usize = 1 << 24;
        let mut off = 0;
        while off < n {
            let end = (off + CHUNK).min(n);
            let vals = self.read(params, off..end)?;
            self.write(&mut master, off, &vals)?;
            off = end;
        }
        Ok(master)
    }
    /// The fp32 master weights of `range`.
    fn master_read(
        &self,
        params: &Self::Buf,
        master: &Self::Buf,
        range: Range<usize>,
    ) -> Result<Vec<f32>> {
        let _ = params;
        self.read(master, range)
    }
    /// Sets the master weights from `offset` on to `data`, and the parameters to their rounding.
    fn master_write(
        &self,
        params: &mut Self::Buf,
        master: &mut Self::Buf,
        offset: usize,
        data: &[f32],
    ) -> Result<()> {
        self.write(params, offset, data)?;
        self.write(master, offset, data)
    }
}
