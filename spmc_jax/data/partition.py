"""Client partitions of the training set (host NumPy), reproducing the reference exactly.

The reference (spmc_reference.md §1.2, `single_domain_dataset.py:72-122`) gives the first
``int(0.9 * N)`` training images (original order) to the clients and keeps the last 10 % as the
server's clean proxy set. The client pool is split by a Dirichlet label skew drawn with NumPy's
legacy RNG after ``np.random.seed(seed)``. We draw from a local ``np.random.RandomState(seed)``,
which produces the same stream as the seeded legacy global RNG without touching global state, and
we consume it in exactly the reference's order, so the shards are identical index for index.

Everything here is host-side and runs once per experiment; `pad_partition` turns the ragged
client lists into one static-shape ``(n_clients, max_samples)`` index matrix plus a mask for the
jitted engine.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "PaddedPartition",
    "dirichlet_partition",
    "iid_partition",
    "label_histograms",
    "pad_partition",
    "proxy_split",
    "stratified_subsample",
]


def _check_ratio(train_ratio: float) -> None:
    if not 0.0 < train_ratio <= 1.0:
        raise ValueError(f"train_ratio={train_ratio!r} must lie in (0, 1]")


def _pool_size(n_train: int, train_ratio: float) -> int:
    """Client-pool size ``int(train_ratio * n_train)``, the reference's (float) expression."""
    _check_ratio(train_ratio)
    if int(n_train) != n_train or n_train < 1:
        raise ValueError(f"n_train={n_train!r} must be a positive integer")
    n_pool = int(train_ratio * n_train)
    if n_pool < 1:
        raise ValueError(
            f"train_ratio={train_ratio!r} leaves no client data out of n_train={n_train}"
        )
    return n_pool


def proxy_split(n_train: int, train_ratio: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices into the client pool and the server's proxy (validation) set.

    Reference: the first ``int(train_ratio * n_train)`` indices (original order) go to clients,
    the rest form the server's clean proxy set (spmc_reference.md §1.2).

    Args:
      n_train: size of the full training split (e.g. 60 000 for MNIST).
      train_ratio: fraction given to clients, in (0, 1].

    Returns:
      ``(client_pool_indices, proxy_indices)``, both int64 and ascending.
    """
    n_pool = _pool_size(n_train, train_ratio)
    return np.arange(n_pool, dtype=np.int64), np.arange(n_pool, n_train, dtype=np.int64)


def _check_labels(labels: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, int]:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("labels is empty; need at least one sample")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(f"labels must lie in [0, num_classes), got a negative label {lo}")
    if num_classes is None:
        num_classes = hi + 1
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be >= 1")
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (num_classes={num_classes}), "
            f"got range [{lo}, {hi}]"
        )
    return labels, int(num_classes)


def dirichlet_partition(
    labels: np.ndarray,
    n_clients: int,
    beta: float = 0.5,
    seed: int = 0,
    train_ratio: float = 0.9,
    min_size: int = 10,
    num_classes: int | None = None,
    *,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Dirichlet label-skew partition of the client pool, bit-identical to the reference.

    With ``N = int(train_ratio * len(labels))`` and a RNG equal to ``np.random.seed(seed)``:

    1. shuffle the proxy (validation) index list ``[N, len(labels))`` — only to consume the RNG
       exactly as the reference does before anything else;
    2. repeat, rebuilding every client list from scratch, until the smallest client holds at
       least ``min_size`` samples: for each class ``k = 0 .. num_classes-1``, shuffle the
       ascending pool indices of class ``k``, draw ``p ~ Dir(beta * 1_n)``, zero ``p_j`` for
       every client whose list already holds ``>= N / n_clients`` samples (the cap is checked
       before each class only, so a client may overshoot it), renormalise, cut at
       ``floor(cumsum(p) * n_k)[:-1]`` and append piece ``j`` to client ``j``;
    3. shuffle each client's list, clients in order.

    Reference: spmc_reference.md §1.2 (`single_domain_dataset.py:86-107`); the scheme is the
    common label-skew split of Hsu et al. 2019 / Li et al. 2022 ("Federated Learning on Non-IID
    Data Silos").

    Args:
      labels: (n_train,) integer labels of the *whole* training split, canonical order.
      n_clients: number of clients, >= 2.
      beta: Dirichlet concentration, > 0 (smaller = more skew).
      seed: the reference's `np.random.seed` value.
      train_ratio: client-pool fraction (the rest is the proxy set).
      min_size: minimum samples per client, 0 <= min_size <= N / n_clients.
      num_classes: classes iterated over (default ``labels.max() + 1``). Every class in
        ``range(num_classes)`` draws a Dirichlet vector even when it has no samples, as in the
        reference, so this value changes the RNG stream.
      max_tries: retries of step 2 before giving up.

    Returns:
      ``n_clients`` int64 arrays of pool indices (each < N), disjoint, covering the pool.

    Raises:
      ValueError: on invalid arguments, or if ``min_size`` is not reached in ``max_tries``.
    """
    labels, num_classes = _check_labels(labels, num_classes)
    if int(n_clients) != n_clients or n_clients < 2:
        raise ValueError(f"n_clients={n_clients!r} must be an integer >= 2")
    if not (np.isfinite(beta) and beta > 0):
        raise ValueError(f"beta={beta!r} must be a finite number > 0")
    if int(seed) != seed or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
    if max_tries < 1:
        raise ValueError(f"max_tries={max_tries!r} must be >= 1")
    n_total = labels.shape[0]
    n_pool = _pool_size(n_total, train_ratio)
    if int(min_size) != min_size or min_size < 0 or min_size * n_clients > n_pool:
        raise ValueError(
            f"min_size={min_size!r} must be an integer in [0, {n_pool // n_clients}] "
            f"(pool of {n_pool} samples over {n_clients} clients)"
        )

    rng = np.random.RandomState(int(seed))
    # Step 1: the reference shuffles its validation index list first. Only the list length
    # matters for the RNG consumption; the proxy order itself is not used (its loader samples
    # randomly), so `proxy_split` returns it in original order.
    rng.shuffle(np.arange(n_pool, n_total, dtype=np.int64))

    pool_labels = labels[:n_pool]
    class_indices = [np.flatnonzero(pool_labels == k) for k in range(num_classes)]
    # The reference compares `len(idx_j) < N / n_parties` with true division.
    cap = n_pool / n_clients

    for _ in range(max_tries):
        chunks: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        sizes = np.zeros(n_clients, dtype=np.int64)
        for k in range(num_classes):
            idx_k = class_indices[k].copy()
            rng.shuffle(idx_k)
            p = rng.dirichlet(np.repeat(beta, n_clients))
            # p * bool reproduces the reference's `p * (len(idx_j) < N / n_parties)` exactly.
            p = p * (sizes < cap)
            total = p.sum()
            if not (np.isfinite(total) and total > 0):
                raise ValueError(
                    f"degenerate Dirichlet draw for class {k} with beta={beta!r}: every client "
                    "below the cap got weight 0 (float underflow); use a larger beta"
                )
            p = p / total
            cuts = (np.cumsum(p) * len(idx_k)).astype(int)[:-1]
            for j, piece in enumerate(np.split(idx_k, cuts)):
                chunks[j].append(piece)
                sizes[j] += len(piece)
        if sizes.min() >= min_size:
            break
    else:
        raise ValueError(
            f"no partition with min_size={min_size} found in {max_tries} tries "
            f"(n_clients={n_clients}, beta={beta}, pool={n_pool}); lower min_size or n_clients, "
            "or raise beta"
        )

    parts = []
    for j in range(n_clients):
        part = np.concatenate(chunks[j]).astype(np.int64)
        rng.shuffle(part)  # step 3, clients in order
        parts.append(part)
    return parts


def iid_partition(
    n_train: int, n_clients: int, seed: int = 0, train_ratio: float = 0.9
) -> list[np.ndarray]:
    """IID partition: shuffle the client pool and split it into near-equal parts.

    The pool is the first ``int(train_ratio * n_train)`` indices (see `proxy_split`); it is
    permuted with ``np.random.RandomState(seed)`` and cut with ``np.array_split`` (sizes differ
    by at most one, larger parts first).

    Args:
      n_train: size of the full training split.
      n_clients: number of clients, in [1, pool size].
      seed: RNG seed.
      train_ratio: client-pool fraction.

    Returns:
      ``n_clients`` int64 arrays of pool indices, disjoint, covering the pool.
    """
    n_pool = _pool_size(n_train, train_ratio)
    if int(n_clients) != n_clients or not 1 <= n_clients <= n_pool:
        raise ValueError(f"n_clients={n_clients!r} must be an integer in [1, {n_pool}]")
    if int(seed) != seed or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
    perm = np.random.RandomState(int(seed)).permutation(n_pool).astype(np.int64)
    return [np.ascontiguousarray(p) for p in np.array_split(perm, int(n_clients))]


def stratified_subsample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-stratified subset of size ``n``.

    Class ``k`` with ``c_k`` of the ``M`` samples gets ``floor(n c_k / M)`` slots; the
    ``n - sum floor(.)`` remaining slots go to the classes with the largest remainders
    ``n c_k mod M`` (ties: lower class first) — Hamilton's largest-remainder method, in exact
    integer arithmetic. Within a class the members are a uniform random subset. The result is
    sorted so the subset keeps the original order (the 90/10 client/proxy split then applies to
    the subset as it would to the full set). A class whose proportional share is below one may
    get no sample.

    Args:
      labels: (M,) integer labels.
      n: subset size, ``number of distinct classes <= n <= M``.
      seed: RNG seed (``np.random.RandomState``).

    Returns:
      (n,) int64 ascending indices into ``labels``.
    """
    labels, _ = _check_labels(labels, None)
    classes, counts = np.unique(labels, return_counts=True)
    m = labels.shape[0]
    if int(n) != n or not len(classes) <= n <= m:
        raise ValueError(
            f"n={n!r} must be an integer in [{len(classes)}, {m}] "
            "(number of classes present .. number of labels)"
        )
    n = int(n)
    share = n * counts.astype(np.int64)
    quota, remainder = share // m, share % m
    left = n - int(quota.sum())
    # Stable sort on -remainder: ties go to the lower class.
    quota[np.argsort(-remainder, kind="stable")[:left]] += 1
    rng = np.random.RandomState(int(seed))
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:q]
        for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class PaddedPartition:
    """Ragged client index lists as one static-shape matrix (for the jitted engine).

    Attributes:
      indices: (n_clients, max_samples) int32; row ``j`` holds client ``j``'s indices in order,
        then zeros (padding points at sample 0, so a gather stays in bounds; mask it out).
      mask: (n_clients, max_samples) bool, True on real entries.
      sizes: (n_clients,) int32 real sizes ``n_j`` (``mask.sum(1)``).
    """

    indices: np.ndarray
    mask: np.ndarray
    sizes: np.ndarray

    @property
    def n_clients(self) -> int:
        return int(self.indices.shape[0])

    @property
    def max_samples(self) -> int:
        return int(self.indices.shape[1])


def pad_partition(
    parts: list[np.ndarray], pad_to: int | None = None, multiple: int = 1
) -> PaddedPartition:
    """Pad client index lists to a common length.

    Args:
      parts: one 1-D integer index array per client (at least one client).
      pad_to: if given, the padded length; must be >= the largest client size.
      multiple: otherwise the padded length is the largest size (at least 1) rounded up to a
        multiple of this (e.g. the batch size, so every padded row is whole batches).

    Returns:
      A `PaddedPartition`; entries beyond each client's size are 0 with mask False.
    """
    if len(parts) == 0:
        raise ValueError("parts is empty; need at least one client")
    if int(multiple) != multiple or multiple < 1:
        raise ValueError(f"multiple={multiple!r} must be an integer >= 1")
    arrays = [np.asarray(p) for p in parts]
    for j, a in enumerate(arrays):
        if a.ndim != 1 or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"parts[{j}] must be a 1-D integer array, got {a.dtype} {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= 2**31):
            raise ValueError(f"parts[{j}] has indices outside [0, 2**31) (int32 storage)")
    sizes = np.array([a.size for a in arrays], dtype=np.int32)
    longest = int(sizes.max())
    if pad_to is None:
        width = -(-max(longest, 1) // multiple) * multiple
    else:
        if int(pad_to) != pad_to or pad_to < max(longest, 1):
            raise ValueError(
                f"pad_to={pad_to!r} must be an integer >= the largest client size {max(longest, 1)}"
            )
        width = int(pad_to)
    indices = np.zeros((len(arrays), width), dtype=np.int32)
    for j, a in enumerate(arrays):
        indices[j, : a.size] = a
    mask = np.arange(width)[None, :] < sizes[:, None]
    return PaddedPartition(indices=indices, mask=mask, sizes=sizes)


def label_histograms(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-client label counts.

    Args:
      parts: client index arrays into ``labels``.
      labels: (N,) integer labels in [0, num_classes).
      num_classes: number of classes.

    Returns:
      (n_clients, num_classes) int64 counts.
    """
    labels, num_classes = _check_labels(labels, num_classes)
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for j, part in enumerate(parts):
        out[j] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return out
