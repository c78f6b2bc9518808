"""Local (client-level) differential privacy / weak DP: clip the update, add Gaussian noise.

Each client clips its model update u = w − g to L2 norm C and adds isotropic Gaussian noise
of standard deviation σ·C before sending it (the Gaussian mechanism on a clipped update,
Abadi et al., CCS 2016; as a client-side backdoor defence, "weak DP": Sun et al., "Can You
Really Backdoor Federated Learning?", 2019, and Naseri et al., "Local and Central
Differential Privacy for Robustness and Privacy in Federated Learning", NDSS 2022):

    w' = g + u · min(1, C / ‖u‖₂) + σ·C·ξ,    ξ ~ N(0, I).

Applied on the trainable-parameter coordinates (BatchNorm statistics are sent as trained),
to the benign clients' rows (attackers control their own code and skip it) or, with
`all_clients`, to every row. A non-finite row stays non-finite (the server's sanitising
drops it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from spmc_jax.attacks.base import AttackEnv, restrict_to_params
from spmc_jax.client import ClientHook, RowsContext


def clip_and_noise(
    W: jax.Array, g: jax.Array, apply: jax.Array, key: jax.Array, clip: float, sigma: float
) -> jax.Array:
    """Rows of `W` where `apply`: g + clip_C(W_i − g) + σ·C·ξ_i; other rows bit-identical.

    Args:
      W: (n, p) client models.
      g: (p,) global model.
      apply: (n,) bool, rows that run the mechanism.
      key: PRNG key of the noise.
      clip: C > 0.
      sigma: σ >= 0 (0: clipping only).
    """
    u = W - g
    norm = jnp.sqrt(jnp.sum(u * u, axis=1, keepdims=True))
    scale = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30))
    new = g + u * scale
    if sigma > 0:
        new = new + (sigma * clip) * jax.random.normal(key, W.shape, W.dtype)
    return jnp.where(apply[:, None], new.astype(W.dtype), W)


def client_dp(
    env: AttackEnv, *, clip: float, sigma: float = 0.0, all_clients: bool = False
) -> ClientHook:
    """The local-DP hook.

    Args:
      env: attack environment (its `param_mask` selects the parameter columns).
      clip: C > 0, the update norm bound.
      sigma: noise multiplier σ >= 0 (noise std σ·C per coordinate).
      all_clients: attackers run it too (default: benign clients only).

    Raises:
      ValueError: C not finite and > 0, or σ not finite and >= 0.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"--client-dp-clip {clip!r}; accepted: a finite number > 0 (0 = off)")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"--client-dp-sigma {sigma!r}; accepted: a finite number >= 0")

    def rows(W: jax.Array, ctx: RowsContext) -> jax.Array:
        apply = jnp.ones_like(ctx.malicious) if all_clients else ~ctx.malicious

        def on_params(Wp, gp, malicious, key):
            del malicious
            return clip_and_noise(Wp, gp, apply, key, clip, sigma)

        return restrict_to_params(on_params, env.param_mask)(
            W, ctx.global_flat, ctx.malicious, ctx.key
        )

    return ClientHook(name="client_dp", rows=rows)
