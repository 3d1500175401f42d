//! The runtime around the ops: the caching allocator reaches a steady state, and compiled kernels
//! are cached on disk.

use super::{cuda_present, envs, say, Env};
use nopad_backend::cuda::{Cuda, CudaOptions};
use nopad_backend::prelude::*;
use nopad_backend::{GradWrite, Kind, LinearDims};

#[test]
fn steady_state_allocates_nothing_new() {
    let Some(envs) = envs("memory") else { return };
    for mut e in envs {
        let dims = LinearDims {
            n: 300,
            d_in: 64,
            d_out: 96,
        };
        let (x, w) = (e.randn(300 * 64, 1.0), e.randn(96 * 64, 1.0));
        let step = |e: &Env| {
            let (gx, gw) = (e.up(&x, Kind::Compute), e.up(&w, Kind::Compute));
            let mut gy = e.gpu.alloc(300 * 96, Kind::Compute).unwrap();
            let mut gdw = e.gpu.alloc(96 * 64, Kind::Grad).unwrap();
            e.gpu
                .linear_forward(LinearFwd {
                    y: gy.as_mut(),
                    x: gx.as_ref(),
                    w: gw.as_ref(),
                    b: None,
                    dims,
                })
                .unwrap();
            e.gpu
                .linear_backward(LinearBwd {
                    dx: None,
                    dx_write: GradWrite::Overwrite,
                    d_w: Some(gdw.as_mut()),
                    d_b: None,
                    dy: gy.as_ref(),
                    x: gx.as_ref(),
                    w: gw.as_ref(),
                    dims,
                    write: GradWrite::Accumulate,
                })
                .unwrap();
            e.gpu.synchronize().unwrap();
        };
        step(&e);
        let peak = e.gpu.peak_memory();
        for _ in 0..3 {
            step(&e);
        }
        say(&format!(
            "memory {:?}: peak {} bytes after 1 and 4 steps",
            e.mode, peak
        ));
        assert_eq!(
            e.gpu.peak_memory(),
            peak,
            "a repeated step allocated new device memory"
        );
    }
}

#[test]
fn kernel_cache_on_disk() {
    if !cuda_present("kernel_cache") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("nopad-kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let open = || {
        let t = std::time::Instant::now();
        let g = Cuda::new(CudaOptions {
            cache_dir: Some(dir.clone()),
            ..CudaOptions::default()
        })
        .expect("device present");
        g.warm_up().expect("every kernel compiles");
        t.elapsed().as_secs_f64()
    };
    let cold = open();
    let files = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    let warm = open();
    say(&format!(
        "kernel cache: cold start {cold:.2} s, warm {warm:.3} s, {files} cubins"
    ));
    assert!(
        files >= 11,
        "expected cached cubins in {dir:?}, found {files}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
