#!/usr/bin/env bash
# The exchange benchmark of this tree against another setting, the two alternated in one call on one
# machine, so that a change to a transport is judged on the same GPUs.  OTHER is either a directory
# holding another tree (a checkout of an earlier commit) or an environment setting VAR=VALUE under
# which this tree runs again:
#     git archive <commit> moe_mpi benchmarks | (mkdir -p ab_old && tar -x -C ab_old)
#     OUT=/some/dir ROUNDS=3 RANKS=4 bash benchmarks/gpu_ab_exchange.sh ab_old --transports ipc --repeats 5
#     OUT=/some/dir bash benchmarks/gpu_ab_exchange.sh MOE_MPI_IPC_SM_COPY_MB=8 --transports ipc --repeats 5
# Each run writes gpu_exchange_ab_<this|other><round>_<card>.{md,json} to $OUT; a table of every run's
# IPC transport against the best NCCL all-to-all, per token count, ends the output (and $OUT/ab.md).
set -u
OTHER=$1; shift
OUT=${OUT:-/tmp/gpu_ab}
ROUNDS=${ROUNDS:-3}
RANKS=${RANKS:-4}
PY=${PY:-python3}
MPIEXEC=${MPIEXEC:-mpiexec}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
HERE=$(pwd)
for i in $(seq "$ROUNDS"); do
    for side in this other; do
        dir=$HERE setting=
        if [ "$side" = other ]; then
            case "$OTHER" in *=*) setting=$OTHER ;; *) dir=$(cd "$OTHER" && pwd) ;; esac
        fi
        echo "=== round $i, $side ($dir${setting:+, $setting})"
        (cd "$dir" && env ${setting:+"$setting"} PYTHONPATH=. timeout -k 10 "${LIMIT:-150}" $MPIEXEC -n "$RANKS" \
            $PY -m mpi4py benchmarks/gpu_exchange.py --tag "ab_$side$i" --out "$OUT" "$@" 2>&1 | tail -n 3)
    done
done
$PY - "$OUT" "$OTHER" <<'PYEOF' | tee "$OUT/ab.md"
import glob, json, re, sys
rows = {}
for path in sorted(glob.glob(f"{sys.argv[1]}/gpu_exchange_ab_*.json")):
    run = re.search(r"gpu_exchange_ab_(this|other)(\d+)_", path)
    for r in json.load(open(path))["results"]:
        if r["transport"] == "ipc":
            rows.setdefault((run[1], int(run[2])), {})[r["tokens"]] = r["vs_best_a2a"]
sizes = sorted({t for v in rows.values() for t in v})
print(f"IPC against the best NCCL all-to-all; other: {sys.argv[2]}\n")
print("| run | round | " + " | ".join(f"{t} tokens" for t in sizes) + " |")
print("|---|---:|" + "---:|" * len(sizes))
for (side, i), v in sorted(rows.items()):
    print(f"| {side} | {i} | " + " | ".join(f"{v[t]:.2f}" if t in v else "-" for t in sizes) + " |")
PYEOF
