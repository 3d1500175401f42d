#!/bin/bash
export LD_LIBRARY_PATH=/opt/cudalocal/nvidia/cu13/lib
K=${1:-/work/wt-fa/crates/nopad-flash/src/kernels}
export PATH=/opt/cudalocal/nvidia/cu13/bin:$PATH
cat $K/common.cuh $K/fwd.cu > /tmp/fa/fwd_all.cu
cat $K/common.cuh $K/bwd_prep.cu $K/bwd_dkdv.cu $K/bwd_dq.cu $K/bwd_convert.cu > /tmp/fa/bwd_all.cu
for m in fwd bwd; do
  python3 /tmp/fa/nvrtc_ptx.py /tmp/fa/${m}_all.cu /tmp/fa/$m.ptx || exit 1
  ptxas -arch=sm_90a -v -o /tmp/fa/$m.cubin /tmp/fa/$m.ptx 2>&1 | grep -E "Compiling|registers|spill" | paste - - - | sed -E "s/ptxas info *: //g; s/Compiling entry function//; s/for 'sm_90a'//; s/Function properties for [a-z_0-9]*//; s/Used //" 
done
