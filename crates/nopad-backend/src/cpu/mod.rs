//! The CPU backend: every op in plain Rust over `Vec<T>`, `T` = f32 (the reference the CUDA
//! backend is checked against) or f64 (exact finite-difference gradient checks).
//!
//! Work is spread over threads with rayon, GEMMs go through the `gemm` crate (SIMD, multi-threaded).
//! Every reduction runs in a fixed order that does not depend on the number of threads or on
//! work stealing, so two runs with the same inputs give bit-identical results (exact resume needs
//! this).

mod adapter;
mod attention;
mod decode;
mod head_norm;
mod layers;
mod linear;
mod optim;
mod staging;

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::args::{
    AddRmsNormFwd, AttnBwd, AttnFwd, ColumnsLinearBwd, ColumnsLinearFwd, DequantNf4, Dropout,
    EmbeddingBwd, EmbeddingFwd, HeadRmsNormBwd, HeadRmsNormFwd, LinearBwd, LinearFwd, LmHeadLoss,
    RmsNormBwd, RmsNormFwd, Rope, SwigluBwd, SwigluFwd,
};
use crate::error::check;
use crate::{AdamWStates, AdamWStep, Device, GradWrite, Kind, Ops, OptimizerOps, Result};
pub use staging::CpuHost;

/// Rows handled by one task in row-parallel loops; fixed so that results never depend on the
/// thread count.
pub(crate) const ROW_CHUNK: usize = 64;

/// The floating-point types the CPU backend computes in.
pub trait Scalar:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Converts from f64 (rounding for f32).
    fn from_f64(x: f64) -> Self;
    /// Converts to f64 (exact).
    fn to_f64(self) -> f64;
    /// Converts from f32 (exact).
    fn from_f32(x: f32) -> Self;
    /// Converts to f32 (rounding for f64).
    fn to_f32(self) -> f32;
    /// e^x.
    fn exp(self) -> Self;
    /// ln x.
    fn ln(self) -> Self;
    /// √x.
    fn sqrt(self) -> Self;
    /// The larger of two values.
    fn max(self, o: Self) -> Self;
    /// Negative infinity.
    fn neg_infinity() -> Self;
}

macro_rules! impl_scalar {
    ($t:ty) => {
        impl Scalar for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f32(x: f32) -> Self {
                x as $t
            }
            fn to_f32(self) -> f32 {
                self as f32
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            fn neg_infinity() -> Self {
                <$t>::NEG_INFINITY
            }
        }
    };
}
impl_scalar!(f32);
impl_scalar!(f64);

/// Under [`GradWrite::Overwrite`], zeroes the first `n` elements of a gradient the op then
/// accumulates into (exact: `0 + x = x`). A buffer shorter than `n` is left for the op's own
/// length check to report.
fn clear<T: Scalar>(g: Option<&mut [T]>, n: usize, acc: GradWrite) {
    if let (Some(g), GradWrite::Overwrite) = (g, acc) {
        let n = n.min(g.len());
        g[..n].fill(T::ZERO);
    }
}

/// Bytes held by live buffers, and the most ever held at once.
#[derive(Default)]
struct MemCounter {
    current: AtomicUsize,
    peak: AtomicUsize,
}

impl MemCounter {
    fn add(&self, bytes: usize) {
        let now = self.current.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
}

/// A CPU buffer: a `Vec<T>` (reached through `Deref`) whose bytes count towards the backend's
/// memory statistics until it is dropped.
pub struct CpuBuf<T> {
    data: Vec<T>,
    mem: Arc<MemCounter>,
}

impl<T> std::ops::Deref for CpuBuf<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.data
    }
}

impl<T> std::ops::DerefMut for CpuBuf<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.data
    }
}

impl<T: Clone> Clone for CpuBuf<T> {
    fn clone(&self) -> Self {
        self.mem.add(self.data.len() * std::mem::size_of::<T>());
        CpuBuf {
            data: self.data.clone(),
            mem: self.mem.clone(),
        }
    }
}

impl<T> Drop for CpuBuf<T> {
    fn drop(&mut self) {
        self.mem.current.fetch_sub(
            self.data.len() * std::mem::size_of::<T>(),
            Ordering::Relaxed,
        );
    }
}

/// The CPU backend over scalar type `T`.
pub struct Cpu<T> {
    mem: Arc<MemCounter>,
    /// Host clock readings of `Device::timestamp` (ops run synchronously, so the host clock at
    /// an op boundary is the device's).
    stamps: std::sync::Mutex<Vec<std::time::Instant>>,
    _t: PhantomData<T>,
}

impl<T: Scalar> Default for Cpu<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Scalar> Cpu<T> {
    /// A CPU backend using rayon's global thread pool.
    pub fn new() -> Self {
        Cpu {
            mem: Arc::new(MemCounter::default()),
            stamps: std::sync::Mutex::new(Vec::new()),
            _t: PhantomData,
        }
    }
}

fn check_len(op: &'static str, what: &str, have: usize, need: usize) -> Result<()> {
    check(have >= need, op, || {
        format!("{what} has {have} elements, needs {need}")
    })
}

impl<T: Scalar> Device for Cpu<T> {
    type Buf = CpuBuf<T>;
    type Ref<'a> = &'a [T];
    type Mut<'a> = &'a mut [T];
    type Ints = Vec<i32>;

    fn describe(&self) -> String {
        format!(
            "cpu ({}, {} threads)",
            std::any::type_name::<T>(),
            rayon::current_num_threads()
        )
    }

    fn alloc(&self, len: usize, _kind: Kind) -> Result<CpuBuf<T>> {
        self.mem.add(len * std::mem::size_of::<T>());
        Ok(CpuBuf {
            data: vec![T::ZERO; len],
            mem: self.mem.clone(),
        })
    }
    fn kind_size(&self, _kind: Kind) -> usize {
        std::mem::size_of::<T>()
    }
    fn buf_len(&self, buf: &CpuBuf<T>) -> usize {
        buf.len()
    }
    fn view<'a>(&'a self, buf: &'a CpuBuf<T>, range: Range<usize>) -> &'a [T] {
        &buf[range]
    }
    fn view_mut<'a>(&'a self, buf: &'a mut CpuBuf<T>, range: Range<usize>) -> &'a mut [T] {
        &mut buf[range]
    }
    fn view_mut2<'a>(
        &'a self,
        buf: &'a mut CpuBuf<T>,
        a: Range<usize>,
        b: Range<usize>,
    ) -> (&'a mut [T], &'a mut [T]) {
        assert!(
            a.end <= b.start || b.end <= a.start,
            "view_mut2: ranges {a:?} and {b:?} overlap"
        );
        if a.start < b.start {
            let (lo, hi) = buf.split_at_mut(b.start);
            (&mut lo[a], &mut hi[..b.end - b.start])
        } else {
            let (lo, hi) = buf.split_at_mut(a.start);
            (&mut hi[..a.end - a.start], &mut lo[b])
        }
    }
    fn write(&self, buf: &mut CpuBuf<T>, offset: usize, data: &[f32]) -> Result<()> {
        check_len("write", "buffer", buf.len(), offset + data.len())?;
        for (d, &s) in buf[offset..offset + data.len()].iter_mut().zip(data) {
            *d = T::from_f32(s);
        }
        Ok(())
    }
    fn read(&self, buf: &CpuBuf<T>, range: Range<usize>) -> Result<Vec<f32>> {
        check_len("read", "buffer", buf.len(), range.end)?;
        Ok(buf[range].iter().map(|x| x.to_f32()).collect())
    }
    fn read_f64(&self, buf: &CpuBuf<T>, range: Range<usize>) -> Result<Vec<f64>> {
        check_len("read_f64", "buffer", buf.len(), range.end)?;
        Ok(buf[range].iter().map(|x| x.to_f64()).collect())
    }
    fn zero(&self, x: &mut [T]) -> Result<()> {
        x.fill(T::ZERO);
        Ok(())
    }
    fn ints(&self, data: &[i32]) -> Result<Vec<i32>> {
        Ok(data.to_vec())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn timestamp(&self) -> Result<()> {
        let now = std::time::Instant::now();
        self.stamps.lock().expect("stamps mutex poisoned").push(now);
        Ok(())
    }
    fn take_timestamps(&self) -> Result<Vec<f64>> {
        let s = std::mem::take(&mut *self.stamps.lock().expect("stamps mutex poisoned"));
        Ok(s.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect())
    }
    fn peak_memory(&self) -> usize {
        self.mem.peak.load(Ordering::Relaxed)
    }
}

impl<T: Scalar> Ops for Cpu<T> {
    fn add(&self, out: &mut [T], a: &[T], b: &[T], n: usize) -> Result<()> {
        check_len("add", "out", out.len(), n)?;
        check_len("add", "a", a.len(), n)?;
        check_len("add", "b", b.len(), n)?;
        for ((o, &x), &y) in out[..n].iter_mut().zip(&a[..n]).zip(&b[..n]) {
            *o = x + y;
        }
        Ok(())
    }
    fn add_assign(&self, out: &mut [T], a: &[T], n: usize) -> Result<()> {
        check_len("add_assign", "out", out.len(), n)?;
        check_len("add_assign", "a", a.len(), n)?;
        for (o, &x) in out[..n].iter_mut().zip(&a[..n]) {
            *o += x;
        }
        Ok(())
    }
    fn scale(&self, x: &mut [T], s: f32, n: usize) -> Result<()> {
        check_len("scale", "x", x.len(), n)?;
        let s = T::from_f32(s);
        x[..n].iter_mut().for_each(|v| *v *= s);
        Ok(())
    }
    fn sum_squares(&self, x: &[T], n: usize) -> Result<f64> {
        check_len("sum_squares", "x", x.len(), n)?;
        Ok(layers::sum_squares(&x[..n]))
    }
    fn columns_linear_forward(&self, a: ColumnsLinearFwd<'_, Self>) -> Result<()> {
        adapter::columns_linear_forward(a)
    }
    fn columns_linear_backward(&self, a: ColumnsLinearBwd<'_, Self>) -> Result<()> {
        adapter::columns_linear_backward(a)
    }
    fn dropout(&self, a: Dropout<'_, Self>) -> Result<()> {
        adapter::dropout(a)
    }
    fn dequant_nf4(&self, a: DequantNf4<'_, Self>) -> Result<()> {
        adapter::dequant_nf4(a)
    }
    fn embedding_forward(&self, a: EmbeddingFwd<'_, Self>) -> Result<()> {
        layers::embedding_forward(a)
    }
    fn embedding_backward(&self, a: EmbeddingBwd<'_, Self>) -> Result<()> {
        layers::embedding_backward(a)
    }
    fn linear_forward(&self, a: LinearFwd<'_, Self>) -> Result<()> {
        linear::linear_forward(a)
    }
    fn linear_backward(&self, a: LinearBwd<'_, Self>) -> Result<()> {
        linear::linear_backward(a)
    }
    fn rmsnorm_forward(&self, a: RmsNormFwd<'_, Self>) -> Result<()> {
        layers::rmsnorm_forward(a)
    }
    fn add_rmsnorm_forward(&self, a: AddRmsNormFwd<'_, Self>) -> Result<()> {
        let AddRmsNormFwd {
            y,
            rstd,
            x,
            r,
            weight,
            n,
            d,
            eps,
        } = a;
        self.add_assign(x, r, n * d)?;
        let (x, weight) = (&*x, weight);
        layers::rmsnorm_forward(RmsNormFwd {
            y,
            rstd,
            x,
            weight,
            n,
            d,
            eps,
        })
    }
    fn rmsnorm_backward(&self, a: RmsNormBwd<'_, Self>) -> Result<()> {
        layers::rmsnorm_backward(a)
    }
    fn head_rmsnorm_forward(&self, a: HeadRmsNormFwd<'_, Self>) -> Result<()> {
        head_norm::head_rmsnorm_forward(a)
    }
    fn head_rmsnorm_backward(&self, a: HeadRmsNormBwd<'_, Self>) -> Result<()> {
        head_norm::head_rmsnorm_backward(a)
    }
    fn rope_forward(&self, a: Rope<'_, Self>) -> Result<()> {
        layers::rope(a, false)
    }
    fn rope_backward(&self, a: Rope<'_, Self>) -> Result<()> {
        layers::rope(a, true)
    }
    fn attention_forward(&self, a: AttnFwd<'_, Self>) -> Result<()> {
        attention::forward(a)
    }
    fn attention_backward(&self, a: AttnBwd<'_, Self>) -> Result<()> {
        attention::backward(a)
    }
    fn swiglu_forward(&self, a: SwigluFwd<'_, Self>) -> Result<()> {
        layers::swiglu_forward(a)
    }
    fn swiglu_backward(&self, a: SwigluBwd<'_, Self>) -> Result<()> {
        layers::swiglu_backward(a)
    }
    fn lm_head_loss(&self, a: LmHeadLoss<'_, Self>) -> Result<()> {
        linear::lm_head_loss(a)
    }
    fn copy_rows(&self, a: crate::args::CopyRows<'_, Self>) -> Result<()> {
        decode::copy_rows(a)
    }
    fn decode_attention(&self, a: crate::args::DecodeAttn<'_, Self>) -> Result<()> {
        decode::decode_attention(a)
    }
}

impl<T: Scalar> OptimizerOps for Cpu<T> {
    fn adamw(&self, a: AdamWStep<'_, Self>) -> Result<()> {
        optim::adamw(a)
    }
    fn adamw_states(&self, a: AdamWStates<'_, Self>) -> Result<()> {
        optim::adamw_states(a)
    }
    fn needs_master(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests;
