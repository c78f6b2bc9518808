"""Data attacks: trigger placement and values, flagged-only changes, DBA geometry, label flips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.attacks import REGISTRY, AttackEnv, DataAttack, get_attack
from tests.reference import attacks_oracle as oracle

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2615)
ENV = AttackEnv(image_shape=(32, 32, 3), mean=MEAN, std=STD, num_malicious=3, n_clients=10)
# float32 round trip of an affine per-channel map on values of order 1-5.
F32_ATOL = 1e-5
SENTINEL = -7.0  # a batch value no trigger writes, to locate changed pixels
DATA_ATTACKS = [n for n, s in REGISTRY.items() if s.kind == "data"]


def _batch(b=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=b).astype(np.int32)
    flags = np.arange(b) % 2 == 0
    return jnp.asarray(x), jnp.asarray(y), jnp.asarray(flags)


def _apply(attack: DataAttack, x, y, flags, rank=0, key=0):
    """Run `apply` under jit with a traced rank and key."""
    fn = jax.jit(attack.apply)
    return fn(x, y, flags, jnp.int32(rank), jax.random.key(key))


def _changed_mask(attack: DataAttack, rank: int = 0) -> np.ndarray:
    """(H, W, C) pixels the attack writes on a flagged sentinel image."""
    x = jnp.full((1, 32, 32, 3), SENTINEL, jnp.float32)
    xo, _ = _apply(attack, x, jnp.zeros(1, jnp.int32), jnp.ones(1, bool), rank)
    return np.asarray(xo[0] != SENTINEL)


def _test_mask(attack: DataAttack) -> np.ndarray:
    x = jnp.full((1, 32, 32, 3), SENTINEL, jnp.float32)
    xo, _ = jax.jit(attack.test)(x, jnp.zeros(1, jnp.int32))
    return np.asarray(xo[0] != SENTINEL)


# ------------------------------------------------------------------------------ contracts


@pytest.mark.parametrize("name", DATA_ATTACKS)
def test_unflagged_samples_unchanged_and_deterministic(name):
    attack = get_attack(name, ENV)
    assert isinstance(attack, DataAttack)
    x, y, flags = _batch()
    for rank in range(4):
        xo, yo = _apply(attack, x, y, flags, rank=rank, key=rank)
        assert xo.shape == x.shape and xo.dtype == x.dtype
        assert yo.shape == y.shape and yo.dtype == y.dtype
        keep = ~np.asarray(flags)
        np.testing.assert_array_equal(np.asarray(xo)[keep], np.asarray(x)[keep])
        np.testing.assert_array_equal(np.asarray(yo)[keep], np.asarray(y)[keep])
        # Every flagged sample is changed (image or label); a targeted label flip changes
        # only the flagged samples of its source class.
        changed = np.any(np.asarray(xo != x).reshape(len(x), -1), axis=1) | np.asarray(yo != y)
        eligible = np.asarray(flags)
        if name == "label_flip_targeted":
            eligible = eligible & (np.asarray(y) == 5)
        assert changed[eligible].all() and not changed[np.asarray(flags) & ~eligible].any()
        xo2, yo2 = _apply(attack, x, y, flags, rank=rank, key=rank)
        np.testing.assert_array_equal(np.asarray(xo), np.asarray(xo2))
        np.testing.assert_array_equal(np.asarray(yo), np.asarray(yo2))
    # No flags: nothing changes.
    none = jnp.zeros_like(flags)
    xo, yo = _apply(attack, x, y, none)
    np.testing.assert_array_equal(np.asarray(xo), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(yo), np.asarray(y))


@pytest.mark.parametrize("name", DATA_ATTACKS)
def test_backdoor_test_set(name):
    attack = get_attack(name, ENV)
    x, y, _ = _batch()
    if name.startswith("label_flip"):
        assert attack.test is None and attack.target is None
        return
    if attack.test_set is not None:  # a standalone backdoor set (edge_case)
        xs = attack.test_set.transform(jnp.asarray(attack.test_set.x[:4]))
        assert xs.shape == (4, *ENV.image_shape)
        np.testing.assert_array_equal(attack.test_set.y, attack.target)
        return
    xt, yt = jax.jit(attack.test)(x, y)
    assert xt.shape == x.shape
    if name == "all2all":  # no single target: every image goes to its next label
        np.testing.assert_array_equal(np.asarray(yt), (np.asarray(y) + 1) % 10)
    else:
        np.testing.assert_array_equal(np.asarray(yt), attack.target)
    # Every test image carries the trigger.
    diff = np.asarray(xt != x).reshape(len(x), -1)
    assert diff.any(axis=1).all()


# -------------------------------------------------------------------------------- badnets


def test_badnets_default_square_white_bottom_right():
    attack = get_attack("badnets", ENV)
    assert (attack.target, attack.poison_rate) == (2, 0.3)
    expected = np.zeros((32, 32, 3), bool)
    expected[29:32, 29:32, :] = True
    np.testing.assert_array_equal(_changed_mask(attack), expected)
    x, y, flags = _batch()
    xo, yo = _apply(attack, x, y, flags)
    f = np.asarray(flags)
    patch = np.asarray(xo)[f][:, 29:, 29:, :]
    # White in pixel units, per channel.
    np.testing.assert_allclose(oracle.denormalize(patch, MEAN, STD), 1.0, atol=F32_ATOL)
    np.testing.assert_array_equal(np.asarray(yo)[f], 2)


@pytest.mark.parametrize(
    ("position", "size", "origin"),
    [
        ("top_left", 3, (0, 0)),
        ("top_right", 4, (0, 28)),
        ("bottom_left", 2, (30, 0)),
        ("center", 4, (14, 14)),
        ("5,7", 3, (5, 7)),
    ],
)
def test_badnets_positions(position, size, origin):
    attack = get_attack("badnets", ENV, position=position, size=size)
    expected = np.zeros((32, 32, 3), bool)
    r, c = origin
    expected[r : r + size, c : c + size, :] = True
    np.testing.assert_array_equal(_changed_mask(attack), expected)


def test_badnets_after_norm_value():
    attack = get_attack("badnets", ENV, value=2.5, after_norm=True, target=7)
    x, y, flags = _batch()
    xo, yo = _apply(attack, x, y, flags)
    f = np.asarray(flags)
    np.testing.assert_array_equal(np.asarray(xo)[f][:, 29:, 29:, :], 2.5)
    np.testing.assert_array_equal(np.asarray(yo)[f], 7)


@pytest.mark.parametrize(
    "opts",
    [
        {"size": 0},
        {"size": 33},
        {"position": "middle"},
        {"position": "31,31"},
        {"position": "1,2,3"},
        {"value": 2.0},
        {"target": 10},
        {"target": -1},
        {"poison_rate": 1.5},
        {"bogus": 1},
    ],
)
def test_badnets_rejects_bad_options(opts):
    with pytest.raises(ValueError):
        get_attack("badnets", ENV, **opts)


# -------------------------------------------------------------------------------- blended


def test_blended_matches_pixel_space_oracle():
    attack = get_attack("blended", ENV, alpha=0.3, seed=5)
    x, y, flags = _batch()
    xo, yo = _apply(attack, x, y, flags)
    pattern = np.random.default_rng(5).uniform(0.0, 1.0, (32, 32, 3))
    f = np.asarray(flags)
    want = oracle.blend(np.asarray(x)[f], pattern, 0.3, MEAN, STD)
    np.testing.assert_allclose(np.asarray(xo)[f], want, atol=F32_ATOL)
    np.testing.assert_array_equal(np.asarray(yo)[f], 2)
    xt, _ = attack.test(x, y)
    np.testing.assert_allclose(
        np.asarray(xt), oracle.blend(np.asarray(x), pattern, 0.3, MEAN, STD), atol=F32_ATOL
    )


def test_blended_pattern_fixed_by_seed():
    x, y, flags = _batch()
    a0 = _apply(get_attack("blended", ENV, seed=0), x, y, flags)[0]
    a0b = _apply(get_attack("blended", ENV, seed=0), x, y, flags, key=9)[0]
    a1 = _apply(get_attack("blended", ENV, seed=1), x, y, flags)[0]
    np.testing.assert_array_equal(np.asarray(a0), np.asarray(a0b))
    assert not np.array_equal(np.asarray(a0), np.asarray(a1))


@pytest.mark.parametrize("opts", [{"alpha": 0.0}, {"alpha": 1.5}, {"seed": -1}, {"target": 11}])
def test_blended_rejects_bad_options(opts):
    with pytest.raises(ValueError):
        get_attack("blended", ENV, **opts)


# -------------------------------------------------------------------------------------- dba


def _dba_expected(parts):
    masks = []
    for pixels in parts:
        m = np.zeros((32, 32, 3), bool)
        for r, c in pixels:
            m[r, c, :] = True
        masks.append(m)
    return masks


def test_dba_four_parts_match_dba_cifar_geometry():
    env = AttackEnv((32, 32, 3), MEAN, STD, num_malicious=5, n_clients=10)  # K = min(4, 5)
    attack = get_attack("dba", env)
    expected = _dba_expected(oracle.DBA_CIFAR_PARTS)
    for rank in range(8):  # ranks wrap around: part rank mod 4
        np.testing.assert_array_equal(_changed_mask(attack, rank), expected[rank % 4])
    np.testing.assert_array_equal(_test_mask(attack), np.any(expected, axis=0))


@pytest.mark.parametrize(
    ("m", "parts", "k"), [(1, 0, 1), (2, 0, 2), (3, 0, 3), (3, 4, 4), (2, 6, 6)]
)
def test_dba_parts_reassemble_into_full_trigger(m, parts, k):
    env = AttackEnv((32, 32, 3), MEAN, STD, num_malicious=m, n_clients=10)
    attack = get_attack("dba", env, parts=parts)
    masks = [_changed_mask(attack, r) for r in range(k)]
    assert all(mk.any() for mk in masks)
    # Disjoint parts whose union is exactly the test trigger.
    assert int(np.sum(masks, axis=0).max()) == 1
    np.testing.assert_array_equal(np.any(masks, axis=0), _test_mask(attack))
    np.testing.assert_array_equal(_changed_mask(attack, k), masks[0])


def test_dba_values_and_labels():
    attack = get_attack("dba", ENV)  # after_norm=True, value 1.0 like the DBA code
    x, y, flags = _batch()
    xo, yo = _apply(attack, x, y, flags, rank=1)
    f = np.asarray(flags)
    np.testing.assert_array_equal(np.asarray(xo)[f][:, 0, 9:15, :], 1.0)
    np.testing.assert_array_equal(np.asarray(yo)[f], 2)
    pix = get_attack("dba", ENV, after_norm=False, value=1.0)
    xo, _ = _apply(pix, x, y, flags, rank=0)
    np.testing.assert_allclose(
        oracle.denormalize(np.asarray(xo)[f][:, 0, 0:6, :], MEAN, STD), 1.0, atol=F32_ATOL
    )


@pytest.mark.parametrize(
    "opts",
    [
        {"parts": -1},
        {"size": 0},
        {"gap": -1},
        {"row_step": 0},
        {"parts": 20},
        {"col": 20},
        {"row": 32},
    ],
)
def test_dba_rejects_bad_geometry(opts):
    with pytest.raises(ValueError):
        get_attack("dba", ENV, **opts)


# ------------------------------------------------------------------------------ label flip


def test_label_flip_pair():
    attack = get_attack("label_flip_pair", ENV)
    x, _, flags = _batch(b=20)
    y = jnp.arange(20, dtype=jnp.int32) % 10
    xo, yo = _apply(attack, x, y, flags)
    np.testing.assert_array_equal(np.asarray(xo), np.asarray(x))
    f = np.asarray(flags)
    np.testing.assert_array_equal(np.asarray(yo)[f], (np.asarray(y)[f] + 1) % 10)


def test_label_flip_sym_uniform_over_other_classes():
    attack = get_attack("label_flip_sym", ENV)
    b = 45_000
    y = jnp.asarray(np.arange(b) % 10, jnp.int32)
    flags = jnp.ones(b, bool)
    x = jnp.zeros((b, 1, 1, 1), jnp.float32)  # images are ignored
    _, yo = _apply(attack, x, y, flags, key=3)
    yo, yn = np.asarray(yo), np.asarray(y)
    assert (yo != yn).all() and ((yo >= 0) & (yo < 10)).all()
    offsets = (yo - yn) % 10
    counts = np.bincount(offsets, minlength=10)[1:]
    # Each offset has probability 1/9: 5000 expected, binomial std ~ 67; 6 std margin.
    np.testing.assert_allclose(counts, b / 9, atol=6 * np.sqrt(b / 9 * 8 / 9))
    _, yo_again = _apply(attack, x, y, flags, key=3)
    _, yo_other = _apply(attack, x, y, flags, key=4)
    np.testing.assert_array_equal(np.asarray(yo_again), yo)
    assert not np.array_equal(np.asarray(yo_other), yo)


def test_label_flip_rejects_bad_rate():
    with pytest.raises(ValueError):
        get_attack("label_flip_sym", ENV, poison_rate=-0.1)
    with pytest.raises(ValueError):
        get_attack("label_flip_pair", ENV, poison_rate=2.0)


def test_dba_under_vmap_over_clients():
    # The engine vmaps the local step over clients, so `rank` arrives batched.
    attack = get_attack("dba", ENV)
    x, y, flags = _batch(b=4)
    ranks = jnp.arange(3, dtype=jnp.int32)
    keys = jax.random.split(jax.random.key(0), 3)
    xs, ys = jax.jit(jax.vmap(attack.apply, in_axes=(None, None, None, 0, 0)))(
        x, y, flags, ranks, keys
    )
    for r in range(3):
        xr, yr = _apply(attack, x, y, flags, rank=r)
        np.testing.assert_array_equal(np.asarray(xs[r]), np.asarray(xr))
        np.testing.assert_array_equal(np.asarray(ys[r]), np.asarray(yr))


def test_reference_trigger_placement_and_value():
    """`base`: exactly the 12 entries channel 0, rows {0, 2} x cols {0,1,2,4,5,6} become 1.0
    (normalised units), only on flagged samples, labels -> 2 (spmc_reference.md §1.6)."""
    from spmc_jax.attacks import get_attack
    from spmc_jax.attacks.base import AttackEnv

    env = AttackEnv(image_shape=(32, 32, 3), mean=(0.1307,) * 3, std=(0.3081,) * 3)
    atk = get_attack("base", env)
    x = jnp.full((3, 32, 32, 3), -0.5, jnp.float32)
    y = jnp.array([0, 5, 2], jnp.int32)
    flags = jnp.array([True, False, True])
    xp, yp = atk.apply(x, y, flags, jnp.asarray(0), jax.random.key(0))
    xp = np.asarray(xp)
    want = np.full((32, 32, 3), -0.5, np.float32)
    for r in (0, 2):
        for c in (0, 1, 2, 4, 5, 6):
            want[r, c, 0] = 1.0
    np.testing.assert_array_equal(xp[0], want)
    np.testing.assert_array_equal(xp[2], want)
    np.testing.assert_array_equal(xp[1], np.asarray(x[1]))
    assert int((xp[0] != -0.5).sum()) == 12
    np.testing.assert_array_equal(np.asarray(yp), [2, 5, 2])
    xt, yt = atk.test(x, y)
    np.testing.assert_array_equal(np.asarray(xt)[1], want)
    np.testing.assert_array_equal(np.asarray(yt), [2, 2, 2])
