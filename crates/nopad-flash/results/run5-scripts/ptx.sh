#!/bin/bash
# Registers and spills of every nopad-flash kernel as the loader compiles them: NVRTC (compute_90a)
# to PTX, then ptxas -v for sm_90a. Usage: ptx.sh [KERNEL_DIR] [fwd|bwd ...]; cubins in /tmp/fa.
# SASS: /opt/pyhf/triton/backends/nvidia/bin/cuobjdump -sass -fun NAME /tmp/fa/bwd.cubin
H=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=/opt/cudalocal/nvidia/cu13/lib PATH=/opt/cudalocal/nvidia/cu13/bin:$PATH
K=${1:-$H/../../src/kernels}
mkdir -p /tmp/fa
cat $K/common.cuh $K/wgmma.cuh $K/fwd.cu $K/fwd_wg.cu > /tmp/fa/fwd_all.cu
cat $K/common.cuh $K/wgmma.cuh $K/bwd_prep.cu $K/bwd_dkdv.cu $K/bwd_dq.cu $K/bwd_long.cu $K/bwd_wg.cu $K/bwd_wgs.cu $K/bwd_convert.cu > /tmp/fa/bwd_all.cu
for m in ${2:-fwd bwd}; do
  python3 $H/../run4-scripts/nvrtc_ptx.py /tmp/fa/${m}_all.cu /tmp/fa/$m.ptx || exit 1
  ptxas -arch=sm_90a -v -o /tmp/fa/$m.cubin /tmp/fa/$m.ptx 2>&1 | grep -E "Compiling|registers|spill" | paste - - - | sed -E "s/ptxas info *: //g; s/Compiling entry function//; s/for 'sm_90a'//; s/Function properties for [a-z_0-9]*//; s/Used //"
done
