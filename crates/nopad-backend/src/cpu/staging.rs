//! [`Staging`] on the CPU: a host buffer is a plain vector of the scalar type and every copy is
//! done when the call returns, so the fences are no-ops. It exists so that the offloaded
//! optimizer's path (host state, copies through the trait) runs, and is tested, on the CPU.

use super::{check_len, Cpu, Scalar};
use crate::error::check;
use crate::{Kind, Result, Staging};

/// A CPU "pinned" buffer: elements of the scalar type, like any CPU buffer.
#[derive(Clone, Debug)]
pub struct CpuHost<T> {
    data: Vec<T>,
}

impl<T: Scalar> Staging for Cpu<T> {
    type Host = CpuHost<T>;

    fn host_alloc(&self, len: usize, _kind: Kind) -> Result<CpuHost<T>> {
        Ok(CpuHost {
            data: vec![T::ZERO; len],
        })
    }
    fn host_len(&self, host: &CpuHost<T>) -> usize {
        host.data.len()
    }
    fn copy_to_host(&self, src: &[T], host: &mut CpuHost<T>) -> Result<()> {
        check_len("copy_to_host", "host buffer", host.data.len(), src.len())?;
        host.data[..src.len()].copy_from_slice(src);
        Ok(())
    }
    fn copy_to_host_unfenced(&self, src: &[T], host: &mut CpuHost<T>) -> Result<()> {
        self.copy_to_host(src, host)
    }
    fn copy_from_host(&self, host: &mut CpuHost<T>, dst: &mut [T]) -> Result<()> {
        check_len("copy_from_host", "host buffer", host.data.len(), dst.len())?;
        dst.copy_from_slice(&host.data[..dst.len()]);
        Ok(())
    }
    fn host_fence(&self, _host: &CpuHost<T>) -> Result<()> {
        Ok(())
    }
    fn host_read(&self, host: &CpuHost<T>, out: &mut [f32]) -> Result<()> {
        check_len("host_read", "host buffer", host.data.len(), out.len())?;
        for (o, &x) in out.iter_mut().zip(&host.data) {
            *o = x.to_f32();
        }
        Ok(())
    }
    fn host_write(&self, host: &mut CpuHost<T>, vals: &[f32]) -> Result<()> {
        check(vals.len() <= host.data.len(), "host_write", || {
            format!(
                "{} values into a host buffer of {}",
                vals.len(),
                host.data.len()
            )
        })?;
        for (d, &x) in host.data.iter_mut().zip(vals) {
            *d = T::from_f32(x);
        }
        Ok(())
    }
}
