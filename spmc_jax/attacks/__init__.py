"""Attacks, one module each, registered by name (`--attack NAME`, composable with '+').

See `base.py` for the interface. `parse_attack("base+scaling", env)` builds the data
attack (at most one) and the model attacks (applied in order).
"""

from __future__ import annotations

from typing import Any

from spmc_jax.attacks.base import AttackEnv, AttackSpec, BackdoorSet, DataAttack, ModelAttack
from spmc_jax.registry import Registry, coerce_options

REGISTRY: Registry[AttackSpec] = Registry("attack", __name__)


def register(spec: AttackSpec) -> AttackSpec:
    """Add an attack to the registry (called at import time by each attack module)."""
    return REGISTRY.register(spec.name, spec)


def get_attack(name: str, env: AttackEnv, **options: Any) -> Any:
    """Build the single attack `name` with validated `options`."""
    spec = REGISTRY.get(name)
    return spec.factory(env, **coerce_options("attack", name, spec.factory, options))


def split_names(expr: str) -> list[str]:
    """'base+scaling' -> ['base', 'scaling'] ('none' -> []), validated against the registry."""
    names = [n.strip() for n in expr.split("+") if n.strip()]
    if not names:
        raise ValueError(f"empty attack {expr!r}; accepted: {', '.join(REGISTRY.names())}")
    if names == ["none"]:
        return []
    out = []
    for n in names:
        if n == "none":
            raise ValueError(f"'none' cannot be combined with other attacks in {expr!r}")
        REGISTRY.get(n)
        out.append(n)
    kinds = [REGISTRY.get(n).kind for n in out]
    if kinds.count("data") + kinds.count("client_data") > 1:
        raise ValueError(f"at most one data attack may be composed, got {expr!r}")
    return out


def parse_attack(
    expr: str, env: AttackEnv, options: dict[str, dict[str, Any]] | None = None
) -> tuple[DataAttack | None, list[ModelAttack]]:
    """Build the composition `expr` ("base", "base+scaling", "none").

    Args:
      expr: '+'-separated registry names.
      env: static facts.
      options: per-attack options, {name: {option: value}}.

    Returns:
      (data attack or None, list of model attacks in application order). Training-time
      attacks (kind "client", e.g. neurotoxin) are built by `parse_client_attacks`.
    """
    options = options or {}
    names = split_names(expr)
    unknown = set(options) - set(names)
    if unknown:
        raise ValueError(f"options given for attacks not in {expr!r}: {sorted(unknown)}")
    data: DataAttack | None = None
    models: list[ModelAttack] = []
    for n in names:
        if REGISTRY.get(n).kind == "client":
            continue
        built = get_attack(n, env, **options.get(n, {}))
        if isinstance(built, DataAttack):
            data = built
        else:
            models.append(built)
    return data, models


def parse_client_attacks(
    expr: str, env: AttackEnv, options: dict[str, dict[str, Any]] | None = None
) -> list[Any]:
    """The `client.ClientHook`s of the training-time attacks (kind "client") in `expr`."""
    options = options or {}
    return [
        get_attack(n, env, **options.get(n, {}))
        for n in split_names(expr)
        if REGISTRY.get(n).kind == "client"
    ]


__all__ = [
    "REGISTRY",
    "AttackEnv",
    "AttackSpec",
    "BackdoorSet",
    "DataAttack",
    "ModelAttack",
    "get_attack",
    "parse_attack",
    "parse_client_attacks",
    "register",
    "split_names",
]
