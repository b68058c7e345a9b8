#!/usr/bin/env bash
# Reproduce the tables and plots of docs/benchmarks.md on a quiet machine.
#
#   bash docs/benchmarks/reproduce.sh [results.jsonl]
#
# Every configuration runs twice, each time next to the PyTorch peer in the same process: once with
# the environment as it is (on the CI machines OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are set), and
# once with both variables unset for that one command (env -u), so that OpenBLAS picks its kernels
# itself. They must be unset in the shell: OpenBLAS reads them once, when NumPy loads it.
# Needs torch==2.13.0 (CPU) next to minilora: pip install 'torch==2.13.0' --index-url https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${1:-docs/benchmarks/results.jsonl}
BENCH=${MINILORA_BENCH:-minilora bench}  # before the subcommand is registered: MINILORA_BENCH="python -m minilora.cli.bench_command"
COMMON=(--peer torch --peer-threads 2 --warmup 2 --steps 5 --repeats 5 --out "$OUT")
CONFIGS=("--preset tiny" "--preset small" "--preset medium" "--preset tiny --full" "--preset small --full" "--preset medium --full")

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
env | grep '^OPENBLAS' >&2 || echo "no OPENBLAS_* variables are set: both runs below use OpenBLAS's own kernel choice" >&2
for config in "${CONFIGS[@]}"; do
    # shellcheck disable=SC2086  # $config and $BENCH are word lists on purpose
    $BENCH $config "${COMMON[@]}"
    # shellcheck disable=SC2086
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $BENCH $config "${COMMON[@]}"
done
# gpt2s (86M parameters, B = 8, T = 1024) needs about 15 GB and minutes per step on two cores; run it by hand:
#   minilora bench --preset gpt2s --steps 2 --repeats 2 --peer torch --out "$OUT"
python docs/benchmarks/make_tables.py "$OUT"
