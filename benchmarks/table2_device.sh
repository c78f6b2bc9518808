#!/usr/bin/env bash
# The paper's Table 2 (seed 0, paper protocol) on a lent accelerator, in calls of <= 10 min.
#
#   bash benchmarks/table2_device.sh pack DIR [DATASET...]   # here: data for the device
#   OUT=/path bash benchmarks/table2_device.sh [DATASET...]  # there: run (default: all three)
#
# pack writes DIR/<name>.npz (MNIST, FashionMNIST: compressed, ~10 + ~30 MB) and copies the
# CIFAR-10 JPEG tarball (~19 MB) as DIR/cifar10-jpeg.tar.gz, then prints the sizes: carry DIR
# with the run (64 MiB in all; over that, one dataset per call). The run needs only jax, flax,
# optax, chex, orbax, numpy, matplotlib and Pillow (no tensorflow-datasets, no registry): it
# decodes the tarball into $DATA_DIR/cifar10.npz once, then runs
# `python -m spmc_jax.sweep --preset $PRESET --seeds 0` into $OUT/sweep and copies table.md,
# results.jsonl and curves.png to $OUT. It stops before TIME_LIMIT_S (checkpointing the
# running batch; exit code 3 = unfinished): bring $OUT/sweep back, then the next call with
# RESUME=<that dir> continues where it stopped.
#
# Environment: OUT (default runs/table2), DATA_DIR (default device_data), TIME_LIMIT_S
# (default 540: whole call), SAFETY_S (default 30: left for copying results), RESUME,
# PRESET (default table2), SEEDS (default 0; e.g. "0 1 2": a batch holds a method's
# seeds x gammas, so more seeds cost little more time), CELL_BATCH (default auto),
# SWEEP_ARGS (extra sweep flags).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SPMC_JAX_NO_TFDS=1
start=$SECONDS

if [[ "${1:-}" == pack ]]; then
  dir=${2:?usage: table2_device.sh pack DIR [DATASET...]}
  shift 2
  [[ $# -gt 0 ]] || set -- mnist fashion_mnist cifar10
  mkdir -p "$dir"
  python - "$dir" "$@" <<'EOF'
import os, shutil, sys
from pathlib import Path

import numpy as np

from spmc_jax.data.sources import ENV_CIFAR10_TARBALL, CIFAR10_TARBALL_NAME, load_dataset

out, names = Path(sys.argv[1]), sys.argv[2:]
missing = False
tarball = os.environ.get(ENV_CIFAR10_TARBALL, "/work/shared/data/" + CIFAR10_TARBALL_NAME)
for name in names:
    if name == "cifar10" and Path(tarball).is_file():
        shutil.copyfile(tarball, out / CIFAR10_TARBALL_NAME)
        continue
    try:
        ds = load_dataset(name, fetch=False, log=lambda s: None)
    except FileNotFoundError as err:
        print(f"{name}: not packed ({err})".splitlines()[0], file=sys.stderr)
        missing = True
        continue
    np.savez_compressed(out / f"{name}.npz", x_train=ds.x_train, y_train=ds.y_train,
                        x_test=ds.x_test, y_test=ds.y_test, source=np.asarray(ds.source))
total = sum(p.stat().st_size for p in out.iterdir())
for p in sorted(out.iterdir()):
    print(f"{p.stat().st_size / 2**20:8.1f} MiB  {p}")
print(f"{total / 2**20:8.1f} MiB in all" + ("  (over 64 MiB: carry one dataset per call)"
                                           if total > 64 * 2**20 else ""))
sys.exit(1 if missing else 0)
EOF
  exit $?
fi

OUT="${OUT:-runs/table2}"
DATA_DIR="${DATA_DIR:-device_data}"
TIME_LIMIT_S="${TIME_LIMIT_S:-540}"
SAFETY_S="${SAFETY_S:-30}"
PRESET="${PRESET:-table2}"
[[ $# -gt 0 ]] || set -- mnist fashion_mnist cifar10
mkdir -p "$OUT" "$DATA_DIR"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/spmc_jax_cache}"
if [[ -n "${RESUME:-}" && ! -d "$OUT/sweep" ]]; then
  cp -r "$RESUME" "$OUT/sweep" && chmod -R u+w "$OUT/sweep"
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import jax; print('jax', jax.__version__, jax.devices())"; } > "$OUT/device.txt" 2>&1

# The JPEG tarball -> cifar10.npz once (Pillow; the loader reads npz without tfds).
if [[ " $* " == *" cifar10 "* && -f "$DATA_DIR/cifar10-jpeg.tar.gz" && ! -f "$DATA_DIR/cifar10.npz" ]]; then
  python - "$DATA_DIR" <<'EOF' || exit 2
import sys
from pathlib import Path

from spmc_jax.data.sources import CIFAR10_JPEG_LABEL, CIFAR10_TARBALL_NAME, _to_dataset
from spmc_jax.data.sources import load_image_tarball, save_npz

d = Path(sys.argv[1])
arrays = load_image_tarball(d / CIFAR10_TARBALL_NAME)
save_npz(_to_dataset("cifar10", arrays, f"{CIFAR10_JPEG_LABEL}: {CIFAR10_TARBALL_NAME}"),
         d / "cifar10.npz")
EOF
fi

left=$((TIME_LIMIT_S - (SECONDS - start) - SAFETY_S))
((left >= 1)) || left=1
# shellcheck disable=SC2086  # SEEDS and SWEEP_ARGS are lists
python -m spmc_jax.sweep --preset "$PRESET" --datasets "$@" --seeds ${SEEDS:-0} --out "$OUT/sweep" \
  --data-dir "$DATA_DIR" --no-fetch --cell-batch "${CELL_BATCH:-auto}" --time-limit "$left" \
  ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep.log"
rc=${PIPESTATUS[0]}
for f in table.md results.jsonl curves.png sweep.json; do
  [[ -f "$OUT/sweep/$f" ]] && cp "$OUT/sweep/$f" "$OUT/$f"
done
echo "wall $((SECONDS - start)) s, sweep exit code $rc" | tee -a "$OUT/device.txt"
if ((rc == 3)); then
  echo "UNFINISHED: bring back $OUT/sweep and rerun with RESUME=<that dir> to continue"
fi
exit "$rc"
