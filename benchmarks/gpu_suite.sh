#!/usr/bin/env bash
# Every GPU benchmark and the GPU tests in one go, each step under its own time limit so that one
# failure leaves the others' results.  Run from the repository root on a machine with 4 GPUs:
#     OUT=/some/dir bash benchmarks/gpu_suite.sh
# $OUT/suite.tar.gz holds results/ (markdown + JSON per benchmark, the end-to-end trace) and logs/;
# it is rewritten after every step.  Copy results/* into benchmarks/results/ to keep them.
set -u
OUT=${OUT:-/tmp/gpu_suite}
WORK=${WORK:-/tmp/gpu_suite_work}
STEPS=${STEPS:-"env expert power front front_kernels exchange sharing e2e e2e_mps tests"}   # also: exchange_lean
mkdir -p "$OUT" "$WORK/results" "$WORK/logs"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# NVLink multicast off (it can wedge GPUs that others share); Open MPI's mpiexec as root
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PY=${PY:-python3}
MPIEXEC=${MPIEXEC:-mpiexec}
NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())')

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0))s"
    tail -n "${TAIL:-12}" "$WORK/logs/$name.log"
    for d in e2e e2e_mps; do
        mkdir -p "$WORK/logs/$d" && cp "$WORK"/$d/*.log "$WORK"/$d/mps_log/*.log "$WORK/logs/$d/" 2>/dev/null
    done
    tar -C "$WORK" -czf "$OUT/suite.tar.gz" results logs
}

step env 20 bash -c "nvidia-smi; nvidia-smi topo -m; $PY -c 'import torch, mpi4py; from mpi4py import MPI; \
print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version(), mpi4py.__version__, MPI.Get_library_version().splitlines()[0])'; nproc; free -g"
step expert ${EXPERT_LIMIT:-200} $PY benchmarks/gpu_expert_mlp.py --out "$WORK/results"
step power 120 $PY benchmarks/gpu_expert_power.py --out "$WORK/results"
step front 150 $PY benchmarks/gpu_front_host.py --out "$WORK/results"
step front_kernels 150 $PY benchmarks/gpu_front_kernels.py --out "$WORK/results"
if [ "$NGPU" -ge 4 ]; then
    step exchange 300 $MPIEXEC -n 4 $PY -m mpi4py benchmarks/gpu_exchange.py --out "$WORK/results"
    # the same with torch's flight recorder off (it records every NCCL operation as it is posted)
    step exchange_lean 300 env TORCH_FR_BUFFER_SIZE=0 TORCH_NCCL_TRACE_BUFFER_SIZE=0 \
        $MPIEXEC -n 4 $PY -m mpi4py benchmarks/gpu_exchange.py --tag lean --out "$WORK/results"
elif [ "$NGPU" -ge 2 ]; then
    # one front and one expert, one GPU each: the 4-GPU layout's NCCL baselines need a GPU per rank
    step exchange 300 $MPIEXEC -n 2 $PY -m mpi4py benchmarks/gpu_exchange.py --fronts 1 --experts 1 --tag 2gpus \
        --out "$WORK/results"
else
    echo "=== exchange: skipped, needs 2 GPUs (have $NGPU)"
fi
if [ "$NGPU" -ge 2 ]; then
    step sharing ${SHARING_LIMIT:-240} $PY benchmarks/gpu_sharing.py --out "$WORK/results" ${SHARING_ARGS:-}
fi
step e2e ${E2E_LIMIT:-200} $PY benchmarks/gpu_end_to_end.py --out "$WORK/results" --work "$WORK/e2e" --timeout 90 ${E2E_ARGS:-}
# the same under CUDA MPS (a daemon of the benchmark's own): kernels of ranks that share a GPU side by side
step e2e_mps ${E2E_LIMIT:-200} $PY benchmarks/gpu_end_to_end.py --mps --out "$WORK/results" --work "$WORK/e2e_mps" --timeout 90 ${E2E_ARGS:-}
step tests ${TESTS_LIMIT:-240} $PY -m pytest -q tests/test_gpu.py tests/test_gpu_kernels.py tests/test_ipc.py -k "${TESTS_K:-not on_cpu}" -p no:cacheprovider
ls -la "$WORK/results" "$OUT"
