//! The trait impls of [`Cuda`]: [`Device`] (memory, transfers, queue, instrumentation) here;
//! [`Ops`] and [`OptimizerOps`] delegate each op to its launcher (`elementwise.rs`,
//! `embedding.rs`, `linear.rs`, `rmsnorm.rs`, `head_norm.rs`, `rope.rs`, `swiglu.rs`,
//! `attention.rs`, `lm_head.rs`, `adamw.rs`, `decode.rs`).

use std::ops::Range;

use cudarc::driver::result as cu;

use super::memory::{sub_mut, sub_ref};
use super::{Cuda, CudaBuf, CudaInts, CudaMut, CudaRef, Dtype};
use crate::args::{
    AddRmsNormFwd, AttnBwd, AttnFwd, ColumnsLinearBwd, ColumnsLinearFwd, DequantNf4, Dropout,
    EmbeddingBwd, EmbeddingFwd, HeadRmsNormBwd, HeadRmsNormFwd, LinearBwd, LinearFwd, LmHeadLoss,
    RmsNormBwd, RmsNormFwd, Rope, SwigluBwd, SwigluFwd,
};
use crate::error::check;
use crate::{AdamWStates, AdamWStep, BackendError, Device, Kind, Ops, OptimizerOps, Result};

/// 8-bit codes given as f32 numbers (`Device::write` takes f32): each must be an integer
/// 0..=255.
fn codes_from_f32(data: &[f32]) -> Result<Vec<u8>> {
    data.iter()
        .enumerate()
        .map(|(i, &x)| {
            if (0.0..=255.0).contains(&x) && x.fract() == 0.0 {
                Ok(x as u8)
            } else {
                Err(BackendError::Shape {
                    op: "write",
                    what: format!("value {i} ({x}) is not an 8-bit code (an integer 0..=255)"),
                })
            }
        })
        .collect()
}

impl Cuda {
    pub(super) fn dtype_of(&self, kind: Kind) -> Dtype {
        match kind {
            Kind::Compute => self.compute,
            Kind::Master => Dtype::F32,
            Kind::Grad => self.grad,
            Kind::Moment16 => Dtype::Bf16,
            Kind::Code8 => Dtype::U8,
        }
    }
}

impl Device for Cuda {
    type Buf = CudaBuf;
    type Ref<'a> = CudaRef<'a>;
    type Mut<'a> = CudaMut<'a>;
    type Ints = CudaInts;

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn alloc(&self, len: usize, kind: Kind) -> Result<CudaBuf> {
        let mut buf = self.scratch(len, self.dtype_of(kind))?;
        self.zero(buf.as_mut())?;
        Ok(buf)
    }

    fn kind_size(&self, kind: Kind) -> usize {
        self.dtype_of(kind).size()
    }

    fn alloc_parts(&self, bytes: usize, parts: &[(usize, usize, Kind)]) -> Result<Vec<CudaBuf>> {
        crate::check_parts(bytes, parts, |k| self.kind_size(k))?;
        // One block of 16-bit words (any dtype's alignment holds at 256-byte offsets), zeroed.
        let mut base = self.scratch(bytes.div_ceil(2), Dtype::U16)?;
        self.zero(base.as_mut())?;
        let base = std::sync::Arc::new(base);
        Ok(parts
            .iter()
            .map(|&(off, len, kind)| CudaBuf::part(&base, off, len, self.dtype_of(kind)))
            .collect())
    }

    fn buf_len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn view<'a>(&'a self, buf: &'a CudaBuf, range: Range<usize>) -> CudaRef<'a> {
        assert!(
            range.start <= range.end && range.end <= buf.len,
            "view {range:?} out of a buffer of {} elements",
            buf.len
        );
        sub_ref(buf, range.start, range.end - range.start)
    }

    fn view_mut<'a>(&'a self, buf: &'a mut CudaBuf, range: Range<usize>) -> CudaMut<'a> {
        assert!(
            range.start <= range.end && range.end <= buf.len,
            "view_mut {range:?} out of a buffer of {} elements",
            buf.len
        );
        sub_mut(buf, range.start, range.end - range.start)
    }

    fn view_mut2<'a>(
        &'a self,
        buf: &'a mut CudaBuf,
        a: Range<usize>,
        b: Range<usize>,
    ) -> (CudaMut<'a>, CudaMut<'a>) {
        assert!(
            a.start <= a.end && b.start <= b.end && a.end <= buf.len && b.end <= buf.len,
            "view_mut2 {a:?}, {b:?} out of a buffer of {} elements",
            buf.len
        );
        assert!(
            a.end <= b.start || b.end <= a.start,
            "view_mut2: ranges {a:?} and {b:?} overlap"
        );
        // Disjoint ranges of one allocation: two writable views that never alias.
        let va = sub_mut(buf, a.start, a.end - a.start).detach();
        let vb = sub_mut(buf, b.start, b.end - b.start).detach();
        (va, vb)
    }

    fn write(&self, buf: &mut CudaBuf, offset: usize, data: &[f32]) -> Result<()> {
        check(offset + data.len() <= buf.len, "write", || {
            format!(
                "{} values at offset {offset} into a buffer of {}",
                data.len(),
                buf.len
            )
        })?;
        if data.is_empty() {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(self.device_err("write"))?;
        let dst = buf.ptr + (offset * buf.dtype.size()) as u64;
        let s = self.raw_stream();
        // SAFETY: `dst` has room for `data.len()` elements (checked above); pageable sources are
        // staged before the call returns, so the temporary may be dropped right after.
        unsafe {
            match buf.dtype {
                Dtype::Bf16 => {
                    let host: Vec<u16> = data
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_bits())
                        .collect();
                    cu::memcpy_htod_async(dst, &host, s)
                }
                Dtype::F32 => cu::memcpy_htod_async(dst, data, s),
                Dtype::U8 => {
                    let host = codes_from_f32(data)?;
                    cu::memcpy_htod_async(dst, &host, s)
                }
                Dtype::I32 | Dtype::U16 => {
                    return Err(BackendError::Unsupported(format!(
                        "write: {:?} buffers hold no f32 values",
                        buf.dtype
                    )))
                }
            }
        }
        .map_err(self.device_err("write (cuMemcpyHtoDAsync)"))
    }

    fn read(&self, buf: &CudaBuf, range: Range<usize>) -> Result<Vec<f32>> {
        check(
            range.start <= range.end && range.end <= buf.len,
            "read",
            || format!("range {range:?} of a buffer of {}", buf.len),
        )?;
        let n = range.end - range.start;
        if n == 0 {
            return Ok(Vec::new());
        }
        self.ctx.bind_to_thread().map_err(self.device_err("read"))?;
        let src = buf.ptr + (range.start * buf.dtype.size()) as u64;
        let s = self.raw_stream();
        let err = self.device_err("read (cuMemcpyDtoHAsync)");
        // SAFETY: `src` holds `n` elements of the buffer's type; the stream is synchronised
        // before the host vectors are read.
        unsafe {
            match buf.dtype {
                Dtype::Bf16 => {
                    let mut host = vec![0u16; n];
                    cu::memcpy_dtoh_async(&mut host, src, s).map_err(&err)?;
                    cu::stream::synchronize(s).map_err(&err)?;
                    Ok(host
                        .into_iter()
                        .map(|b| half::bf16::from_bits(b).to_f32())
                        .collect())
                }
                Dtype::F32 => {
                    let mut host = vec![0f32; n];
                    cu::memcpy_dtoh_async(&mut host, src, s).map_err(&err)?;
                    cu::stream::synchronize(s).map_err(&err)?;
                    Ok(host)
                }
                Dtype::I32 => {
                    let mut host = vec![0i32; n];
                    cu::memcpy_dtoh_async(&mut host, src, s).map_err(&err)?;
                    cu::stream::synchronize(s).map_err(&err)?;
                    Ok(host.into_iter().map(|v| v as f32).collect())
                }
                Dtype::U8 => {
                    let mut host = vec![0u8; n];
                    cu::memcpy_dtoh_async(&mut host, src, s).map_err(&err)?;
                    cu::stream::synchronize(s).map_err(&err)?;
                    Ok(host.into_iter().map(f32::from).collect())
                }
                Dtype::U16 => Err(BackendError::Unsupported(
                    "read: u16 buffers hold no f32 values (use master_read)".into(),
                )),
            }
        }
    }

    fn zero(&self, x: CudaMut<'_>) -> Result<()> {
        if x.len == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(self.device_err("zero"))?;
        // SAFETY: the view covers `len` elements of a live buffer.
        unsafe { cu::memset_d8_async(x.ptr, 0, x.len * x.dtype.size(), self.raw_stream()) }
            .map_err(self.device_err("zero (cuMemsetD8Async)"))
    }

    fn ints(&self, data: &[i32]) -> Result<CudaInts> {
        let mut dev = self.scratch(data.len(), Dtype::I32)?;
        if !data.is_empty() {
            self.ctx.bind_to_thread().map_err(self.device_err("ints"))?;
            // SAFETY: `dev` holds `data.len()` i32; pageable sources are staged before return.
            unsafe { cu::memcpy_htod_async(dev.as_mut().ptr, data, self.raw_stream()) }
                .map_err(self.device_err("ints (cuMemcpyHtoDAsync)"))?;
        }
        Ok(CudaInts {
            dev,
            host: data.to_vec(),
        })
    }

    fn synchronize(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(self.device_err("synchronize"))?;
        self.stream
            .synchronize()
            .map_err(self.device_err("cuStreamSynchronize"))
    }

    fn peak_memory(&self) -> usize {
        self.pool
            .lock()
            .expect("pool mutex poisoned by a panic in another thread")
            .peak()
    }

    fn timestamp(&self) -> Result<()> {
        let e = self
            .stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(self.device_err("timestamp (cuEventRecord)"))?;
        self.timestamps
            .lock()
            .expect("timestamp mutex poisoned by a panic in another thread")
            .push(e);
        Ok(())
    }

    fn take_timestamps(&self) -> Result<Vec<f64>> {
        let events = std::mem::take(
            &mut *self
                .timestamps
                .lock()
                .expect("timestamp mutex poisoned by a panic in another thread"),
        );
        events
            .windows(2)
            .map(|w| {
                w[0].elapsed_ms(&w[1])
                    .map(|ms| ms as f64 * 1e-3)
                    .map_err(self.device_err("take_timestamps (cuEventElapsedTime)"))
            })
            .collect()
    }

    fn release_cached(&self) -> Result<()> {
        self.pool
            .lock()
            .expect("pool mutex poisoned by a panic in another thread")
            .trim()
    }

    fn total_memory(&self) -> Option<usize> {
        // The context is current on this thread's device; a failed query plans against nothing.
        self.ctx.bind_to_thread().ok()?;
        cu::mem_get_info().ok().map(|(_, total)| total)
    }

    fn accounting(&self) -> crate::Accounting {
        crate::Accounting {
            round: super::memory::LIVE_ROUND,
            shares_parts: true,
            pooled_scratch: true,
        }
    }

    fn peak_reserved_memory(&self) -> usize {
        self.pool
            .lock()
            .expect("pool mutex poisoned by a panic in another thread")
            .peak_reserved()
    }
}

impl Ops for Cuda {
    fn add(&self, out: CudaMut<'_>, a: CudaRef<'_>, b: CudaRef<'_>, n: usize) -> Result<()> {
        self.add_impl(out, a, Some(b), n)
    }
    fn add_assign(&self, out: CudaMut<'_>, a: CudaRef<'_>, n: usize) -> Result<()> {
        self.add_impl(out, a, None, n)
    }
    fn scale(&self, x: CudaMut<'_>, s: f32, n: usize) -> Result<()> {
        self.scale_impl(x, s, n)
    }
    fn sum_squares(&self, x: CudaRef<'_>, n: usize) -> Result<f64> {
        self.sum_squares_impl(x, n)
    }
    fn columns_linear_forward(&self, a: ColumnsLinearFwd<'_, Self>) -> Result<()> {
        self.columns_linear_forward_impl(a)
    }
    fn columns_linear_backward(&self, a: ColumnsLinearBwd<'_, Self>) -> Result<()> {
        self.columns_linear_backward_impl(a)
    }
    fn dropout(&self, a: Dropout<'_, Self>) -> Result<()> {
        self.dropout_impl(a)
    }
    fn dequant_nf4(&self, a: DequantNf4<'_, Self>) -> Result<()> {
        self.dequant_nf4_impl(a)
    }
    fn embedding_forward(&self, a: EmbeddingFwd<'_, Self>) -> Result<()> {
        self.embedding_forward_impl(a)
    }
    fn embedding_backward(&self, a: EmbeddingBwd<'_, Self>) -> Result<()> {
        self.embedding_backward_impl(a)
    }
    fn linear_forward(&self, a: LinearFwd<'_, Self>) -> Result<()> {
        self.linear_forward_impl(a)
    }
    fn linear_backward(&self, a: LinearBwd<'_, Self>) -> Result<()> {
        self.linear_backward_impl(a)
    }
    fn rmsnorm_forward(&self, a: RmsNormFwd<'_, Self>) -> Result<()> {
        self.rmsnorm_forward_impl(a)
    }
    fn add_rmsnorm_forward(&self, a: AddRmsNormFwd<'_, Self>) -> Result<()> {
        self.add_rmsnorm_forward_impl(a)
    }
    fn rmsnorm_backward(&self, a: RmsNormBwd<'_, Self>) -> Result<()> {
        self.rmsnorm_backward_impl(a)
    }
    fn head_rmsnorm_forward(&self, a: HeadRmsNormFwd<'_, Self>) -> Result<()> {
        self.head_rmsnorm_forward_impl(a)
    }
    fn head_rmsnorm_backward(&self, a: HeadRmsNormBwd<'_, Self>) -> Result<()> {
        self.head_rmsnorm_backward_impl(a)
    }
    fn rope_forward(&self, a: Rope<'_, Self>) -> Result<()> {
        self.rope_impl(a, 1.0)
    }
    fn rope_backward(&self, a: Rope<'_, Self>) -> Result<()> {
        self.rope_impl(a, -1.0)
    }
    fn attention_forward(&self, a: AttnFwd<'_, Self>) -> Result<()> {
        self.attention_forward_impl(a)
    }
    fn attention_backward(&self, a: AttnBwd<'_, Self>) -> Result<()> {
        self.attention_backward_impl(a)
    }
    fn swiglu_forward(&self, a: SwigluFwd<'_, Self>) -> Result<()> {
        self.swiglu_forward_impl(a)
    }
    fn swiglu_backward(&self, a: SwigluBwd<'_, Self>) -> Result<()> {
        self.swiglu_backward_impl(a)
    }
    fn lm_head_loss(&self, a: LmHeadLoss<'_, Self>) -> Result<()> {
        self.lm_head_loss_impl(a)
    }
    fn copy_rows(&self, a: crate::args::CopyRows<'_, Self>) -> Result<()> {
        self.copy_rows_impl(a)
    }
    fn decode_attention(&self, a: crate::args::DecodeAttn<'_, Self>) -> Result<()> {
        self.decode_attention_impl(a)
    }
}

impl OptimizerOps for Cuda {
    fn adamw(&self, a: AdamWStep<'_, Self>) -> Result<()> {
        self.adamw_impl(a)
    }

    fn adamw_states(&self, a: AdamWStates<'_, Self>) -> Result<()> {
        self.adamw_states_impl(a)
    }

    fn needs_master(&self) -> bool {
        self.compute != Dtype::F32
    }

    fn master_bytes(&self, n: usize) -> usize {
        // The low halves only (see `master_new`).
        if self.needs_master() {
            n * Dtype::U16.size()
        } else {
            0
        }
    }

    fn master_new(&self, _params: &CudaBuf, n: usize) -> Result<CudaBuf> {
        // The parameters are bf16 values, so the low halves of their fp32 masters are zero.
        let mut lo = self.scratch(n, Dtype::U16)?;
        self.zero(lo.as_mut())?;
        Ok(lo)
    }

    fn master_read(
        &self,
        params: &CudaBuf,
        master: &CudaBuf,
        range: Range<usize>,
    ) -> Result<Vec<f32>> {
        self.master_read_impl(params, master, range)
    }

    fn master_write(
        &self,
        params: &mut CudaBuf,
        master: &mut CudaBuf,
        offset: usize,
        data: &[f32],
    ) -> Result<()> {
        self.master_write_impl(params, master, offset, data)
    }
}
