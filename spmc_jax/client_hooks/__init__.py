"""Client-side options built as `client.ClientHook`s, one module each (FedProx, local DP).

`config_hooks(cfg, env)` returns the hooks a `Config` switches on; none by default, so a
default run takes the code path without hooks.
"""

from __future__ import annotations

from typing import Any

from spmc_jax.attacks.base import AttackEnv
from spmc_jax.client import ClientHook
from spmc_jax.client_hooks.client_dp import client_dp
from spmc_jax.client_hooks.fedprox import fedprox


def config_hooks(cfg: Any, env: AttackEnv) -> list[ClientHook]:
    """The client hooks switched on by `cfg` (a `config.Config`), in application order.

    FedProx acts on every step's gradient; local DP on the trained rows.
    """
    hooks = []
    if cfg.fedprox_mu > 0:
        hooks.append(fedprox(cfg.fedprox_mu))
    if cfg.client_dp_clip > 0:
        hooks.append(
            client_dp(
                env,
                clip=cfg.client_dp_clip,
                sigma=cfg.client_dp_sigma,
                all_clients=cfg.client_dp_all,
            )
        )
    return hooks


__all__ = ["client_dp", "config_hooks", "fedprox"]
