"""Dataset CLI.

    python -m spmc_jax.data fetch {mnist,fashion_mnist,cifar10} [--data-dir DIR] [--force]
    python -m spmc_jax.data info NAME [--data-dir DIR]

`fetch` reports where the dataset already is, or gets it (see `sources.fetch`) and prints where
it wrote it. `info` loads it (never fetching) and prints its source, shapes and label counts.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from spmc_jax.data import sources
from spmc_jax.data.types import DATASETS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spmc_jax.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="make a dataset available locally and say where it is")
    f.add_argument("name", choices=DATASETS)
    f.add_argument(
        "--data-dir", default=None, help="write here (default: $SPMC_JAX_DATA_DIR or the cache)"
    )
    f.add_argument("--force", action="store_true", help="fetch again even if found locally")
    i = sub.add_parser("info", help="load a local dataset and describe it")
    i.add_argument("name", choices=DATASETS)
    i.add_argument("--data-dir", default=None, help="search here first")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (`info`: 1 if not found, 2 if --data-dir is bad)."""
    args = _parser().parse_args(argv)
    if args.command == "fetch":
        hit = None if args.force else sources.locate(args.name, args.data_dir)
        if hit is not None:
            print(f"dataset {args.name}: already available ({hit[0]}) at {hit[1]}")
            return 0
        t = time.perf_counter()
        path = sources.fetch(args.name, data_dir=args.data_dir, force=args.force)
        print(f"dataset {args.name}: {path}  ({time.perf_counter() - t:.1f} s)")
        return 0
    t = time.perf_counter()
    try:
        ds = sources.load_dataset(
            args.name, data_dir=args.data_dir, fetch=False, log=lambda s: None
        )
    except sources.DatasetNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:  # unusable --data-dir
        print(e, file=sys.stderr)
        return 2
    print(f"dataset {ds.name}: {ds.source}  (loaded in {time.perf_counter() - t:.2f} s)")
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        counts = np.bincount(y, minlength=ds.num_classes).tolist()
        print(f"  {split}: x {x.dtype}{list(x.shape)}  y {y.dtype}{list(y.shape)}  counts {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
