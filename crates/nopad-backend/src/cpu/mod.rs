//! The CPU backend: every op in plain Rust over `Vec<T>`, `T` = f32 (the reference the CUDA
//! backend is checked against) or f64 (exact finite-difference gradient checks).
//!
//! Work is spread over threads with rayon, GEMMs go through the `gemm` crate (SIMD, multi-threaded).
//! Every reduction runs in a fixed order that does not depend on the number of threads or on
//! work stealing, so two runs with the same inputs give bit-identical results (exact resume needs
//! this).

mod attention;
mod layers;
mod linear;

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::check;
use crate::{AdamW, AttnDims, Backend, GradWrite, Kind, LinearDims, Result, RopeDims};

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
    /// Host clock readings of `Backend::timestamp` (ops run synchronously, so the host clock at
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

impl<T: Scalar> Backend for Cpu<T> {
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
    fn sum_squares(&self, x: &[T], n: usize) -> Result<f64> {
        check_len("sum_squares", "x", x.len(), n)?;
        Ok(layers::sum_squares(&x[..n]))
    }

    fn embedding_forward(
        &self,
        x: &mut [T],
        table: &[T],
        tokens: &Vec<i32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        layers::embedding_forward(x, table, tokens, n, d)
    }
    fn embedding_backward(
        &self,
        d_table: &mut [T],
        dx: &[T],
        tokens: &Vec<i32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        layers::embedding_backward(d_table, dx, tokens, n, d)
    }
    fn linear_forward(
        &self,
        y: &mut [T],
        x: &[T],
        w: &[T],
        b: Option<&[T]>,
        dims: LinearDims,
    ) -> Result<()> {
        linear::linear_forward(y, x, w, b, dims)
    }
    fn linear_backward(
        &self,
        dx: Option<&mut [T]>,
        d_w: &mut [T],
        d_b: Option<&mut [T]>,
        dy: &[T],
        x: &[T],
        w: &[T],
        dims: LinearDims,
        acc: GradWrite,
    ) -> Result<()> {
        let (d_in, d_out) = (dims.d_in, dims.d_out);
        clear(Some(&mut *d_w), d_out * d_in, acc);
        let mut d_b = d_b;
        clear(d_b.as_deref_mut(), d_out, acc);
        linear::linear_backward(dx, d_w, d_b, dy, x, w, dims)
    }
    fn rmsnorm_forward(
        &self,
        y: &mut [T],
        rstd: &mut [T],
        x: &[T],
        weight: &[T],
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        layers::rmsnorm_forward(y, rstd, x, weight, n, d, eps)
    }
    fn add_rmsnorm_forward(
        &self,
        y: &mut [T],
        rstd: &mut [T],
        x: &mut [T],
        r: &[T],
        weight: &[T],
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        self.add_assign(x, r, n * d)?;
        layers::rmsnorm_forward(y, rstd, x, weight, n, d, eps)
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut [T],
        d_weight: &mut [T],
        dy: &[T],
        x: &[T],
        weight: &[T],
        rstd: &[T],
        n: usize,
        d: usize,
        acc: GradWrite,
    ) -> Result<()> {
        clear(Some(&mut *d_weight), d, acc);
        layers::rmsnorm_backward(dx, d_weight, dy, x, weight, rstd, n, d)
    }
    fn rope_forward(
        &self,
        x: &mut [T],
        inv_freq: &[T],
        positions: &Vec<i32>,
        dims: RopeDims,
    ) -> Result<()> {
        layers::rope(x, inv_freq, positions, dims, false)
    }
    fn rope_backward(
        &self,
        dx: &mut [T],
        inv_freq: &[T],
        positions: &Vec<i32>,
        dims: RopeDims,
    ) -> Result<()> {
        layers::rope(dx, inv_freq, positions, dims, true)
    }
    fn attention_forward(
        &self,
        out: &mut [T],
        lse: &mut [T],
        qkv: &[T],
        cu_seqlens: &Vec<i32>,
        dims: AttnDims,
    ) -> Result<()> {
        attention::forward(out, lse, qkv, cu_seqlens, dims)
    }
    fn attention_backward(
        &self,
        d_qkv: &mut [T],
        d_out: &[T],
        qkv: &[T],
        out: &[T],
        lse: &[T],
        cu_seqlens: &Vec<i32>,
        dims: AttnDims,
    ) -> Result<()> {
        attention::backward(d_qkv, d_out, qkv, out, lse, cu_seqlens, dims)
    }
    fn swiglu_forward(&self, a: &mut [T], gu: &[T], n: usize, f: usize) -> Result<()> {
        layers::swiglu_forward(a, gu, n, f)
    }
    fn swiglu_backward(&self, gu: &mut [T], d_a: &[T], n: usize, f: usize) -> Result<()> {
        layers::swiglu_backward(gu, d_a, n, f)
    }
    fn lm_head_loss(
        &self,
        loss_sum: &mut [T],
        dx: Option<&mut [T]>,
        d_w: Option<&mut [T]>,
        x: &[T],
        w: &[T],
        targets: &Vec<i32>,
        dims: LinearDims,
        grad_scale: f32,
        acc: GradWrite,
    ) -> Result<()> {
        let mut d_w = d_w;
        clear(d_w.as_deref_mut(), dims.d_out * dims.d_in, acc);
        linear::lm_head_loss(loss_sum, dx, d_w, x, w, targets, dims, grad_scale)
    }
    fn adamw(
        &self,
        param: &mut [T],
        master: Option<&mut [T]>,
        grad: &[T],
        m: &mut [T],
        v: &mut [T],
        n: usize,
        hp: AdamW,
    ) -> Result<()> {
        check(master.is_none(), "adamw", || {
            "the CPU backend keeps no master copy".into()
        })?;
        layers::adamw(param, grad, m, v, n, hp)
    }
    fn needs_master(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests;
