"""A tiny name -> spec registry shared by aggregators and attacks.

Members live one per module inside a package; the package's modules are imported on the
first lookup, so adding a rule touches one file (plus its test) and no index.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named specs of one kind (e.g. "defense"), discovered from a package's modules."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, spec: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = spec
        return spec

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise ValueError(
                f"unknown {self.kind} {name!r}; accepted: {', '.join(self.names())} "
                f"(or 'help' to list them)"
            )
        return self._items[name]

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._items.items())


def factory_options(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """Keyword-only options (name -> Parameter) of a registry factory."""
    sig = inspect.signature(factory)
    return {n: p for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def coerce_options(
    kind: str, name: str, factory: Callable[..., Any], raw: Mapping[str, Any]
) -> dict[str, Any]:
    """Validate and type-convert `raw` options (strings from the CLI, or values) for `factory`.

    Raises:
      ValueError: naming the bad option and the accepted ones.
    """
    opts = factory_options(factory)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in opts:
            accepted = ", ".join(f"{k}={p.default!r}" for k, p in opts.items()) or "none"
            raise ValueError(f"{kind} {name!r} has no option {key!r}; accepted: {accepted}")
        default = opts[key].default
        out[key] = _convert(kind, name, key, value, default)
    return out


def build_checked(
    kind: str,
    name: str,
    factory: Callable[..., Any],
    env: Any,
    options: Mapping[str, Any],
    context: str = "",
) -> Any:
    """Build `factory(env, **options)` as a validation step; errors name the flag and the facts.

    The generic validation hook: a CLI builds every rule and attack once with a shape-only
    `env` whose facts come from the configuration, before any data is loaded, so every check
    a factory makes (option ranges, limits that depend on the client or attacker count)
    fails as early as the configuration's own checks. New registry members need no code here.

    Args:
      kind: "defense" or "attack" (the CLI flag is `--<kind>`).
      name: registered name.
      factory: its factory.
      env: the environment to build with.
      options: raw options (CLI strings or values), coerced by `coerce_options`.
      context: the run facts the factory saw (e.g. "n=10 clients, f=2 assumed malicious"),
        appended to the message.

    Raises:
      ValueError: `--<kind> <name>: <the factory's message>` (plus the context).
    """
    opts = coerce_options(kind, name, factory, options)
    try:
        return factory(env, **opts)
    except (ValueError, TypeError) as err:
        where = f" (with {context})" if context else ""
        raise ValueError(f"--{kind} {name}{where}: {err}") from None


def _convert(kind: str, name: str, key: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        if isinstance(value, str) and default is None:
            return _parse_scalar(value)
        return value
    try:
        if isinstance(default, bool):
            low = value.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return low in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            return tuple(_parse_scalar(v) for v in value.split(",") if v)
    except ValueError:
        raise ValueError(
            f"{kind} {name!r} option {key}={value!r} is not a valid "
            f"{type(default).__name__} (default {default!r})"
        ) from None
    return value


def _parse_scalar(value: str) -> Any:
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value


def parse_kv(items: list[str] | None, flag: str) -> dict[str, str]:
    """Parse repeated `KEY=VALUE` CLI items."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out
