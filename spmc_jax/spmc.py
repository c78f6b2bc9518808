"""SPMC: self-purification on the client, margin contribution on the server.

He, Huang, Yang, Liu, Ye, "SPMC: Self-Purifying Federated Backdoor Defense via Margin
Contribution", ICML 2025; formulas as in the authors' code (spmc_reference.md §2-§3).

Three pure pieces, each written for the shapes the engine uses:

- Client side, `project`: per parameter tensor, if the data gradient G_d conflicts with the
  guidance gradient G_g (cos < 0 strictly), remove λ times its component along G_g:
  G = G_d − λ·(⟨G_d, G_g⟩/‖G_g‖²)·G_g, else G = G_d (AlignedGradient.py:101-140).
- Server side, `margin_contribution`: every client's consistency score is the cosine between
  its model and the uniform leave-one-out mean of the others, Γ_i = (S − w_i)/(n − 1);
  α = softmax(cos / T); the new global model is Σ_i α_i w_i (SPMD.py:49-109). All n
  coalition models are handled in O(n·d) through the column mean, never by n averages.
- Teachers, `teachers`: the marginal model of client i is the α-weighted mean of the other
  clients, T_i = (g − α_i w_i)/(1 − α_i) = Σ_{j≠i} α_j w_j / Σ_{j≠i} α_j (§3.1).

Matrix products use `Precision.HIGHEST`: on TPUs and recent GPUs the default float32 matmul
rounds its inputs to bf16/TF32, which would swamp cosines that differ by ~1e-3 and blur
the aggregated model at the 1e-3 relative level.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# The reference's cosine denominator guard, ‖a‖·‖b‖ + 1e-5 (SPMD.py, `cosine_distance`).
COS_EPS = 1e-5
SPACES = ("weights", "updates")
_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- projection


def _check_lam(lam: float | jax.Array) -> None:
    if isinstance(lam, int | float | np.floating | np.integer) and not (
        math.isfinite(float(lam)) and float(lam) >= 0.0
    ):
        raise ValueError(f"lam={lam!r} is not accepted; accepted: a finite number >= 0")


def _leaf_conflict(gd: jax.Array, gg: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Conflict test and projection coefficient for one tensor, safe for tiny/huge gradients.

    Both gradients are divided by their max-abs first, so the squared norms can neither
    underflow (a guidance gradient of 1e-25 is still a direction, as in the reference's
    unit-vector form) nor overflow. The projection is scale-free in G_g and linear in
    G_d, so G_d − λ·(⟨G_d,G_g⟩/‖G_g‖²)·G_g = G_d − λ·s_d·(⟨v,u⟩/‖u‖²)·u with
    u = G_g/s_g, v = G_d/s_d.

    Returns:
      (conflict: bool scalar, coefficient c such that G = G_d − λ·c·u, u).
    """
    ct = jnp.promote_types(gd.dtype, jnp.float32)
    gd = gd.astype(ct)
    gg = gg.astype(ct)
    s_d = jnp.max(jnp.abs(gd))
    s_g = jnp.max(jnp.abs(gg))
    v = gd / jnp.where(s_d > 0, s_d, 1.0)
    u = gg / jnp.where(s_g > 0, s_g, 1.0)
    dot = jnp.sum(v * u)
    uu = jnp.sum(u * u)
    # cos < 0 strictly <=> ⟨v,u⟩ < 0; a zero tensor gives dot == 0 (the reference's NaN
    # cosine compares False too), a NaN gradient gives False (left as is, like the reference).
    conflict = dot < 0
    coef = s_d * dot / jnp.where(uu > 0, uu, 1.0)
    return conflict, coef, u


def project(g_data: PyTree, g_guide: PyTree, lam: float | jax.Array = 1.0) -> PyTree:
    """SPMC's per-tensor conflict projection of the data gradient (spmc_reference.md §3.3).

    For every leaf (parameter tensor, flattened for the inner products):

        G = G_d − λ·(⟨G_d, G_g⟩ / ‖G_g‖²)·G_g   if cos(G_d, G_g) < 0 (strictly),
        G = G_d                                  otherwise (also when either norm is 0).

    With λ = 1 (the reference's `lamda`) a projected tensor is exactly orthogonal to G_g.
    Leaves that are not projected are returned bit-identical. Pure, jittable and
    vmappable (the reductions are per leaf, so a vmapped batch axis stays separate).

    Args:
      g_data: gradient pytree of the data loss (cross-entropy on the labels).
      g_guide: gradient pytree of the guidance loss (soft-label CE to the teacher), same
        structure and shapes.
      lam: projection strength λ >= 0 (a Python number is validated; an array is not).

    Returns:
      The projected gradient pytree, dtypes preserved.
    """
    _check_lam(lam)

    def leaf(gd, gg):
        if gd.shape != gg.shape:
            raise ValueError(f"gradient leaves differ in shape: {gd.shape} vs {gg.shape}")
        conflict, coef, u = _leaf_conflict(gd, gg)
        projected = (gd.astype(u.dtype) - lam * coef * u).astype(gd.dtype)
        return jnp.where(conflict, projected, gd)

    return jax.tree.map(leaf, g_data, g_guide)


def project_stats(g_data: PyTree, g_guide: PyTree) -> jax.Array:
    """Number of leaves `project` would change (cos < 0), as an int32 scalar (diagnostics).

    The reference keeps the same count (`self.count`) and never uses it.
    """
    flags = jax.tree.map(lambda gd, gg: _leaf_conflict(gd, gg)[0], g_data, g_guide)
    return sum((f.astype(jnp.int32) for f in jax.tree.leaves(flags)), jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------ leave-one-out cosines


def _compare_mask(mask: np.ndarray | None, d: int) -> jax.Array:
    """Validate a static (d,) bool mask and return it as a float32 multiplier."""
    if mask is None:
        return jnp.ones((d,), jnp.float32)
    mask = np.asarray(mask)
    if mask.shape != (d,) or mask.dtype != np.bool_:
        raise ValueError(
            f"compare_mask must be a bool numpy array of shape ({d},); "
            f"got dtype {mask.dtype} shape {mask.shape}"
        )
    if not mask.any():
        raise ValueError("compare_mask selects no coordinate; accepted: at least one True")
    return jnp.asarray(mask, jnp.float32)


_BLOCK = 128  # lane-sized blocks for the two-level row sums


def _row_sums(
    terms: tuple[Callable[..., jax.Array], ...], x: jax.Array, *vecs: jax.Array
) -> tuple[jax.Array, ...]:
    """Row sums of elementwise expressions f(x_i, *vecs) in one pass over x (n, d).

    One variadic reduction reads x once for all of them; XLA:CPU instead turns sibling
    row reductions of one input into a multi-output fusion ~8x slower than one reduction.
    A variadic reduce is summed sequentially, though (relative error ~d·eps at d = 1e6),
    so it runs over blocks of 128 columns and the (n, d/128) partial sums are then summed
    by an ordinary (tree) reduction: relative error ~1e-7 at d = 1e6.
    """
    n, d = x.shape
    pad = (-d) % _BLOCK
    xb = jnp.pad(x, ((0, 0), (0, pad))).reshape(n, -1, _BLOCK)
    vb = [jnp.pad(v, (0, pad)).reshape(-1, _BLOCK) for v in vecs]
    vals = tuple(f(xb, *vb) for f in terms)
    zeros = tuple(jnp.zeros((), v.dtype) for v in vals)
    parts = jax.lax.reduce(
        vals, zeros, lambda acc, v: tuple(p + q for p, q in zip(acc, v, strict=True)), (2,)
    )
    return tuple(jnp.sum(p, axis=1) for p in parts)


def loo_cosines(
    client_flat: jax.Array,
    compare_mask: np.ndarray | None = None,
    reference: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Cosine of each client with the uniform leave-one-out mean of the others, in O(n·d).

    φ_i = ⟨x_i, y_i⟩ / (‖x_i‖·‖y_i‖ + 1e-5) with x_i = w_i − r, y_i = Γ_i − r,
    Γ_i = (S − w_i)/(k − 1), S = Σ_j w_j over the k valid rows (k = n without `valid`),
    r = `reference` (0 when None), and every inner product restricted to `compare_mask`
    (spmc_reference.md §2 steps 1-2; the reference compares parameters only and uses r = 0).

    Numerics. With whole weight vectors every φ_i is ~1 and they differ by ~1e-3, so the
    textbook closed form (‖S‖², ⟨S,w_i⟩, ‖w_i‖² in float32) loses much of the signal to
    rounding in the length-d reductions. Instead the rows are centred on their mean m
    (c_i = x_i − m, so x_i = m + c_i and y_i = m − c_i/(k−1)) and
    h_i = ‖x_i‖‖y_i‖ − ⟨x_i, y_i⟩ = (‖x_i − y_i‖² − (‖x_i‖ − ‖y_i‖)²)/2 is formed from
    the small quantities only:
        ‖x_i − y_i‖²     = q_i·k²/(k−1)²,
        ‖x_i‖² − ‖y_i‖²  = 2·b_i·k/(k−1) + q_i·(1 − 1/(k−1)²),
        ‖y_i‖²           = a − 2·b_i/(k−1) + q_i/(k−1)²,
    with a = ‖m‖², b_i = ⟨m, c_i⟩, q_i = ‖c_i‖². Then φ_i = (P_i − h_i)/(P_i + 1e-5),
    P_i = ‖x_i‖‖y_i‖: rounding in the large a only scales 1 − φ_i, it does not swamp it.
    Far from parallel (generic updates) h_i is a difference of large terms, so there the
    direct expansion ⟨x_i, y_i⟩ = a + b_i·(k−2)/(k−1) − q_i/(k−1) is used instead; each row
    takes the form with the smaller rounding-error bound. Against a float64 oracle the
    error is <= 2e-7 (3 float32 ulps of 1) for nearly identical weight vectors (d up to
    1e6, n up to 257, cosine spread down to 3e-6) and for generic vectors, in both spaces
    (tests/test_spmc.py asserts 4e-7); the textbook form is off by 2e-6 to 2e-5 on the
    former, as much as the spread itself. Cost: one matrix-vector product and one fused
    pass over the rows (plus x − r in the updates space), no (n, d) temporaries.
    Rows with x_i = 0 exactly get φ_i = 0 (as ⟨0, y⟩/(0 + 1e-5) in the reference).

    Args:
      client_flat: (n, d) client models (full rows, BatchNorm statistics included).
      compare_mask: static (d,) bool numpy array of the coordinates the cosine uses
        (parameters only in the reference); None = all.
      reference: optional (d,) vector subtracted from both sides ("updates" space, r = the
        previous global model).
      valid: optional (n,) bool; invalid rows are left out of every Γ_i and get φ = 0.
        With fewer than 2 valid rows every φ is 0. Every row must be finite (an invalid
        row may hold any finite values; the aggregator wrapper replaces non-finite ones).

    Returns:
      (n,) float32 cosines.

    Raises:
      ValueError: n < 2, or a malformed mask/reference.
    """
    client_flat = jnp.asarray(client_flat)
    if client_flat.ndim != 2 or client_flat.shape[0] < 2:
        raise ValueError(
            f"client_flat must be (n, d) with n >= 2 clients; got shape {client_flat.shape}"
        )
    n, d = client_flat.shape
    if reference is not None and jnp.shape(reference) != (d,):
        raise ValueError(f"reference must have shape ({d},); got {jnp.shape(reference)}")
    cmask = _compare_mask(compare_mask, d)
    x = client_flat.astype(jnp.float32)
    r = jnp.zeros((d,), jnp.float32) if reference is None else jnp.asarray(reference, jnp.float32)
    vw = jnp.ones((n,), jnp.float32) if valid is None else jnp.asarray(valid).astype(jnp.float32)
    k = jnp.sum(vw)

    # m = mean of the valid compared vectors x_i − r, zero outside the compared columns.
    # Weights: a plain matrix-vector product (XLA:CPU runs a dot with a fused operand such
    # as x − r ~10x slower). Updates: the mean of the small differences x_i − r, since
    # mean(x) − r would carry the rounding of mean(x), eps·|x|, into every coordinate of
    # the small mean update (measured: 10x larger cosine errors).
    if reference is None:
        m = jnp.matmul(vw, x, precision=_HI)
    else:
        m = jnp.matmul(vw, x - r, precision=_HI)
    m = m / jnp.maximum(k, 1.0) * cmask
    a = jnp.sum(m * m)
    # With c_i = x_i − r − m on the compared columns: b_i = ⟨m, c_i⟩, q_i = ‖c_i‖², and
    # ‖x_i − r‖² directly (not a + 2b + q), so that exact zero rows stay exactly zero.
    b, q, nx2 = _row_sums(
        (
            lambda xi, ri, mi, wi: (xi - ri - mi) * mi,
            lambda xi, ri, mi, wi: (xi - ri - mi) * (xi - ri - mi) * wi,
            lambda xi, ri, mi, wi: (xi - ri) * (xi - ri) * wi,
        ),
        x,
        r,
        m,
        cmask,
    )

    km1 = jnp.maximum(k - 1.0, 1.0)
    ny2 = jnp.maximum(a - 2.0 * b / km1 + q / km1**2, 0.0)
    nx, ny = jnp.sqrt(nx2), jnp.sqrt(ny2)
    p = nx * ny
    # Two exact expressions for ⟨x_i, y_i⟩; each row takes the one whose rounding error
    # bound (the magnitude of the terms it adds) is smaller.
    # (1) Near-parallel vectors: P − h from the small quantities only.
    diff2 = q * (k / km1) ** 2
    dn = (2.0 * b * k / km1 + q * (1.0 - 1.0 / km1**2)) / jnp.where(nx + ny > 0, nx + ny, 1.0)
    dot_h = p - 0.5 * (diff2 - dn * dn)
    # (2) Otherwise (e.g. generic updates, cosines far from 1): expand in a, b, q.
    dot_c = a + b * (k - 2.0) / km1 - q / km1
    use_h = diff2 + dn * dn < a + jnp.abs(b) + q / km1
    dot = jnp.clip(jnp.where(use_h, dot_h, dot_c), -p, p)  # |⟨x,y⟩| <= ‖x‖‖y‖
    cos = dot / (p + COS_EPS)

    ok = (nx2 > 0) & (k >= 2)
    if valid is not None:
        ok = ok & jnp.asarray(valid)
    return jnp.where(ok, cos, 0.0)


# ------------------------------------------------------------------ weights and aggregate


def _check_temperature(temperature: float | jax.Array) -> None:
    if isinstance(temperature, int | float | np.floating | np.integer) and not (
        math.isfinite(float(temperature)) and float(temperature) > 0.0
    ):
        raise ValueError(
            f"temperature={temperature!r} is not accepted; accepted: a finite number > 0"
        )


def margin_weights(
    cos: jax.Array, temperature: float | jax.Array = 1.0, valid: jax.Array | None = None
) -> jax.Array:
    """α = softmax(φ / T) over the valid clients; invalid clients get α = 0.

    The reference computes exp(φ_p − max φ + 1e-5)/Σ (SPMD.py:96-102): the +1e-5 is a
    common factor exp(1e-5) that cancels in the normalisation, so it is omitted here.
    All clients invalid gives α = 0 everywhere.

    Args:
      cos: (n,) consistency scores φ.
      temperature: T > 0 (1 in the reference); larger T flattens α towards uniform.
      valid: optional (n,) bool mask.

    Returns:
      (n,) float32 weights summing to 1 over the valid clients.
    """
    _check_temperature(temperature)
    cos = jnp.asarray(cos, jnp.float32)
    ok = jnp.ones(cos.shape, bool) if valid is None else jnp.asarray(valid, bool)
    z = jnp.where(ok, cos / temperature, -jnp.inf)
    zmax = jnp.max(z)
    e = jnp.where(ok, jnp.exp(z - jnp.where(jnp.isfinite(zmax), zmax, 0.0)), 0.0)
    total = jnp.sum(e)
    return e / jnp.where(total > 0, total, 1.0)


def margin_contribution(
    client_flat: jax.Array,
    compare_mask: np.ndarray | None = None,
    temperature: float | jax.Array = 1.0,
    space: str = "weights",
    global_flat: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """SPMC server aggregation: g' = Σ_i α_i w_i with α = softmax(loo_cosines / T).

    spmc_reference.md §2: φ_i = cos(w_i, Γ_i) on whole weight vectors ("weights", the
    reference) or on updates w_i − g and Γ_i − g ("updates", an option); the aggregate
    is taken over the full rows (BatchNorm statistics included).

    Args:
      client_flat: (n, d) trained client models, n >= 2.
      compare_mask: static (d,) bool mask of the coordinates the cosine uses.
      temperature: softmax temperature T > 0.
      space: "weights" or "updates".
      global_flat: (d,) previous global model; required for "updates". When given it is
        also the result if no client is valid.
      valid: optional (n,) bool; invalid rows get α = 0 and leave every Γ_i.

    Returns:
      (new_global (d,), alpha (n,)).
    """
    if space not in SPACES:
        raise ValueError(f"space={space!r} is not accepted; accepted: {', '.join(SPACES)}")
    if space == "updates" and global_flat is None:
        raise ValueError("space='updates' needs global_flat (the previous global model)")
    ref = global_flat if space == "updates" else None
    cos = loo_cosines(client_flat, compare_mask, reference=ref, valid=valid)
    alpha = margin_weights(cos, temperature, valid)
    new_global = jnp.matmul(alpha, client_flat.astype(jnp.float32), precision=_HI)
    if valid is not None:
        if global_flat is None:
            n = client_flat.shape[0]
            fallback = jnp.matmul(jnp.full((n,), 1.0 / n), client_flat, precision=_HI)
        else:
            fallback = jnp.asarray(global_flat)
        new_global = jnp.where(jnp.any(valid), new_global, fallback.astype(jnp.float32))
    return new_global, alpha


# ------------------------------------------------------------------------------ teachers


def teachers(new_global: jax.Array, client_flat: jax.Array, alpha: jax.Array) -> jax.Array:
    """Marginal ("teacher") models T_i = (g − α_i w_i)/(1 − α_i), all n in O(n·d).

    spmc_reference.md §3.1: with g = Σ_j α_j w_j and Σ_j α_j = 1 this is
    Σ_{j≠i} α_j w_j / Σ_{j≠i} α_j, the α-weighted model of the other clients.

    Evaluated as T_i = g + (α_i/(1 − α_i))·(g − w_i): a small correction to g built from
    the small difference g − w_i, so T_i is accurate to the float32 rounding of g
    (uniform α gives the plain leave-one-out mean (S − w_i)/(n − 1)). The factor blows up
    as α_i → 1, so the single client that may have α_i > 1/2 is computed directly from the
    Σ-form instead (equal to the marginal form when g = Σ_j α_j w_j); if the others' total
    weight is 0 (one valid client) its teacher is g. Clients with α_i = 0 (invalid) get
    T_i = g.

    Args:
      new_global: (d,) g, the α-weighted aggregate (as returned by `margin_contribution`).
      client_flat: (n, d) client models w_i.
      alpha: (n,) weights, non-negative, summing to 1.

    Returns:
      (n, d) float32 teachers.
    """
    w = jnp.asarray(client_flat, jnp.float32)
    g = jnp.asarray(new_global, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    if w.ndim != 2 or g.shape != w.shape[1:] or alpha.shape != w.shape[:1]:
        raise ValueError(
            f"shapes do not match: new_global {g.shape}, client_flat {w.shape}, "
            f"alpha {alpha.shape}; accepted: (d,), (n, d), (n,)"
        )
    big = alpha > 0.5
    factor = jnp.where(big, 0.0, alpha / jnp.where(big, 1.0, 1.0 - alpha))
    out = g + factor[:, None] * (g - w)
    # The (at most one) client with α_i > 1/2: Σ_{j≠i} α_j w_j / Σ_{j≠i} α_j, directly.
    i = jnp.argmax(alpha)
    others = alpha.at[i].set(0.0)
    rest = jnp.sum(others)
    direct = jnp.matmul(others, w, precision=_HI) / jnp.where(rest > 0, rest, 1.0)
    direct = jnp.where(rest > 0, direct, g)
    return jnp.where(big[:, None], direct[None, :], out)
