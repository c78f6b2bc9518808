#!/usr/bin/env bash
# Every GPU check and benchmark in one run, sized for a 15-minute device session (~8 min of
# work on an H100/H200). Writes JSON and logs under $OUT (default runs/device) and keeps going
# when one step fails, so a partial run still returns its figures.
#
#   OUT=/path bash benchmarks/device_suite.sh          # on the device machine, repo root
#
# Needs only jax (+ flax, optax, chex, numpy): synthetic data, no tensorflow-datasets.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/device}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() {  # step NAME CMD...: run, log, time; never abort the suite
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/suite.log"
  local t0=$SECONDS
  timeout "${STEP_TIMEOUT:-240}" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s" | tee -a "$OUT/suite.log"
  tail -n 25 "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null || true
python -c "import jax; print(jax.__version__, jax.devices())" | tee "$OUT/jax.txt"

# 1. The paper protocol's round: MNIST-sized clients (5,400 images each), 10 local epochs.
step paper_round python benchmarks/round_throughput.py --clients 10 --samples 5400 \
  --local-epochs 10 --defense spmc fedavg --repeats 3 --seq-max 2 --vmap-max 10 \
  --json "$OUT/paper_round.json"
# 2. Client-steps/s at scale, engine vs sequential loops (128 images per client).
step throughput python benchmarks/round_throughput.py --clients 100 1000 10000 \
  --defense fedavg spmc --repeats 3 --seq-max 20 --vmap-max 1000 --json "$OUT/throughput.json"
# 3. SPMC (and every rule's) aggregation at n up to 10^4, d up to 10^6.
step aggregators python benchmarks/aggregator_scaling.py --n 100 1000 10000 \
  --d 100000 1000000 --repeats 3 --json "$OUT/aggregators.json"
# 4. Achieved FLOP/s against the card's f32 / bf16 matmul peak.
step roofline python benchmarks/roofline.py --clients 1000 --bf16 --json "$OUT/roofline.json"
# 5. Vmapped client chunks grouped by local steps vs id order (Dirichlet sizes, 100 clients).
step chunk_grouping python benchmarks/chunk_grouping.py --clients 100 --client-chunk 20 \
  --defense fedavg spmc --repeats 3 --json "$OUT/chunk_grouping.json"
echo "suite done: $OUT"
