"""`python -m spmc_jax.train`: train one federation and write its logs.

Outputs in `--out` (default `runs/<dataset>-<defense>-<attack>-g<γ>-s<seed>-<config hash>`):
  metrics.jsonl  one JSON object per round, numbered from 1 (A, R, R_excl_target, V, seconds,
                 client_weights, nonfinite, nonfinite_ids…)
  summary.json   full config, package versions, device, the plan, last-N-round means (N =
                 min(5, evaluated rounds)), `learned` (False: A stayed at chance level)
  plan.json      the plan (also written by --dry-run)
  metrics.csv    the same rows as CSV (lists as JSON text)
  tb/            TensorBoard event files (`tensorboard --logdir OUT/tb`)
  curves.png     A and R per round, redrawn while the run goes
  final_model/   the final global model (orbax; `python -m spmc_jax.gradcam --run OUT`)
  checkpoints/   with --checkpoint-every N: the run state after completed rounds (orbax; the
                 folder of the state after round r is named r); --resume continues from the
                 latest one

A folder that holds a run (metrics.jsonl, summary.json or checkpoints/) is never written into
unless --overwrite (start afresh) or --resume (continue it) is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from spmc_jax.cli_help import HelpFormatter
from spmc_jax.config import (
    ATTACKERS_PROJECTION,
    COMPUTE_DTYPES,
    CONV_IMPLS,
    CPU_DOT_FUSIONS,
    DATASETS,
    MODELS,
    PARTITIONS,
    PRESETS,
    PROTOCOLS,
    SPMC_SPACES,
    SPMC_TEACHERS,
    Config,
)
from spmc_jax.registry import parse_kv

DEFAULTS = Config()
DEFAULT_KEEP = 2  # = checkpoint.DEFAULT_KEEP (not imported: that module loads JAX and orbax)
# What makes a folder hold a run (a --dry-run's lone plan.json does not).
RUN_MARKERS = ("metrics.jsonl", "summary.json", "checkpoints")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spmc_jax.train",
        description=(
            "Train a federation under a backdoor attack and a defense, reporting clean accuracy A, "
            "backdoor failure rate R and V=(A+R)/2 per round. Defaults follow the SPMC reference "
            f"setup (Dirichlet 0.5, SGD 0.01): dataset {DEFAULTS.dataset}, "
            f"defense {DEFAULTS.defense}, attack "
            f"{DEFAULTS.attack}, {DEFAULTS.clients} clients, {DEFAULTS.rounds} rounds."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="start from a named configuration (config.PRESETS: "
        + "; ".join(f"{k}: {_preset_text(k)}" for k in PRESETS)
        + "); flags given explicitly override it (--attack-opt adds to its attack options, "
        "replacing a repeated key) (default: none, every flag at its own default)",
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=DEFAULTS.dataset, help=f"one of {', '.join(DATASETS)}")
    d.add_argument(
        "--data-dir",
        default=None,
        help="directory holding the dataset files (default: $SPMC_JAX_DATA_DIR, else the "
        "cache ~/.cache/spmc_jax, then where package registries install them)",
    )
    d.add_argument(
        "--no-fetch", action="store_true", help="fail instead of fetching a missing dataset"
    )
    d.add_argument(
        "--subsample",
        type=int,
        default=None,
        help="train on a class-stratified subset of N training images, for quick runs "
        "(default: all training images)",
    )
    d.add_argument(
        "--partition", default=DEFAULTS.partition, help=f"one of {', '.join(PARTITIONS)}"
    )
    d.add_argument("--beta", type=float, default=DEFAULTS.beta, help="Dirichlet concentration")
    d.add_argument(
        "--min-size",
        type=int,
        default=DEFAULTS.min_size,
        help="fewest samples per client in the Dirichlet split; when clients x min-size "
        "exceeds the data, clients draw overlapping shards (cross-device mode)",
    )
    f = p.add_argument_group("federation")
    f.add_argument("--clients", type=int, default=DEFAULTS.clients, help="registered clients N")
    f.add_argument(
        "--clients-per-round",
        type=int,
        default=None,
        help="clients sampled per round m (default: all)",
    )
    f.add_argument(
        "--rounds", type=int, default=DEFAULTS.rounds, help="communication rounds to train"
    )
    f.add_argument(
        "--protocol",
        default=DEFAULTS.protocol,
        help=f"{'/'.join(PROTOCOLS)}: fair = every method trains --local-epochs (10 when "
        "unset), every rule as its paper defines it; paper = as the reference ran Table 2: SPMC "
        "10 local epochs, baselines 1, and the reference's baseline quirks (config.PAPER_QUIRKS)",
    )
    f.add_argument(
        "--local-epochs",
        type=int,
        default=None,
        help="local epochs for every method, overriding --protocol (default: as --protocol says)",
    )
    f.add_argument(
        "--batch-size", type=int, default=DEFAULTS.batch_size, help="local SGD mini-batch size"
    )
    f.add_argument("--lr", type=float, default=DEFAULTS.lr, help="local SGD learning rate")
    f.add_argument("--momentum", type=float, default=DEFAULTS.momentum, help="local SGD momentum")
    f.add_argument(
        "--weight-decay",
        type=float,
        default=DEFAULTS.weight_decay,
        help="local SGD weight decay (L2, PyTorch style)",
    )
    f.add_argument("--model", default=DEFAULTS.model, help=f"one of {', '.join(MODELS)}")
    f.add_argument(
        "--conv-impl",
        default=DEFAULTS.conv_impl,
        help=f"{'/'.join(CONV_IMPLS)}: auto = im2col patches on CPU, XLA conv elsewhere",
    )
    f.add_argument(
        "--compute-dtype",
        default=DEFAULTS.compute_dtype,
        help=(
            f"{'/'.join(COMPUTE_DTYPES)}: the model's arithmetic; bfloat16 keeps float32 master "
            "weights, optimiser and aggregation (mixed precision; accuracy cost in "
            "benchmarks/RESULTS.md)"
        ),
    )
    f.add_argument(
        "--cpu-dot-fusion",
        default=DEFAULTS.cpu_dot_fusion,
        help=(
            f"{'/'.join(CPU_DOT_FUSIONS)}: on the CPU backend, compile each matmul fused with its "
            "elementwise neighbours into one YNNPACK call (XLA's "
            "xla_cpu_experimental_ynn_fusion_type=dot; 1.1-1.2x faster SimpleCNN steps, float32 "
            "summation order only); auto = ynn for simple_cnn where this jaxlib supports it, off "
            "elsewhere (mlp and resnet10 trained slower with it)"
        ),
    )
    f.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help="seed of the partition, the model init and every random draw of the run",
    )
    a = p.add_argument_group("threat model")
    a.add_argument(
        "--gamma",
        type=float,
        default=DEFAULTS.gamma,
        help="malicious ratio; attackers are the last floor(N*gamma) clients",
    )
    a.add_argument(
        "--attack",
        default=DEFAULTS.attack,
        help="attack name(s) joined by '+', e.g. base+scaling; 'help' lists them",
    )
    a.add_argument(
        "--attack-opt",
        action="append",
        metavar="NAME.KEY=VALUE",
        help="attack option, repeatable, e.g. scaling.boost=5 (default: each attack's own "
        "defaults, listed by --attack help)",
    )
    a.add_argument(
        "--attack-start",
        type=int,
        default=DEFAULTS.attack_start,
        help="first attacked round (rounds are numbered from 1)",
    )
    a.add_argument(
        "--attack-end",
        type=int,
        default=None,
        help="last attacked round, inclusive (default: the last round)",
    )
    a.add_argument("--attacker-ids", default="last", help="last (reference) or random (seeded)")
    a.add_argument(
        "--attackers-skip-projection",
        action="store_true",
        help="adaptive attacker: malicious clients skip SPMC's client-side projection "
        "(= --attackers-projection skip)",
    )
    a.add_argument(
        "--attackers-projection",
        default=DEFAULTS.attackers_projection,
        help=f"{'/'.join(ATTACKERS_PROJECTION)}: what SPMC's malicious clients do with the "
        "client-side projection: follow it, skip it, or invert it (double the data gradient's "
        "component that conflicts with the teacher instead of removing it)",
    )
    c = p.add_argument_group("client options")
    c.add_argument(
        "--fedprox-mu",
        type=float,
        default=DEFAULTS.fedprox_mu,
        help="FedProx (Li et al., MLSys 2020): every client adds mu/2*||w - w_global||^2 to "
        "its loss; 0 = off",
    )
    c.add_argument(
        "--client-dp-clip",
        type=float,
        default=DEFAULTS.client_dp_clip,
        help="local/weak DP: clients clip their update to L2 norm C before sending; 0 = off",
    )
    c.add_argument(
        "--client-dp-sigma",
        type=float,
        default=DEFAULTS.client_dp_sigma,
        help="local DP noise multiplier: Gaussian noise of std sigma*C per coordinate",
    )
    c.add_argument(
        "--client-dp-all",
        action="store_true",
        help="attackers run the local DP mechanism too (default: benign clients only)",
    )
    s = p.add_argument_group("defense")
    s.add_argument("--defense", default=DEFAULTS.defense, help="defense name; 'help' lists them")
    s.add_argument(
        "--defense-opt",
        action="append",
        metavar="KEY=VALUE",
        help="defense hyperparameter, repeatable (default: the rule's own defaults, listed by "
        "--defense help)",
    )
    s.add_argument(
        "--assumed-malicious",
        type=int,
        default=None,
        help="attacker count given to rules that need one (default: floor(m*gamma))",
    )
    s.add_argument(
        "--spmc-lambda", type=float, default=DEFAULTS.spmc_lambda, help="SPMC projection strength"
    )
    s.add_argument(
        "--spmc-temperature",
        type=float,
        default=DEFAULTS.spmc_temperature,
        help="SPMC softmax temperature",
    )
    s.add_argument(
        "--spmc-space",
        default=DEFAULTS.spmc_space,
        help=f"{'/'.join(SPMC_SPACES)}: compare full weights (reference) or updates",
    )
    s.add_argument(
        "--spmc-teachers",
        default=DEFAULTS.spmc_teachers,
        help=(
            f"{'/'.join(SPMC_TEACHERS)}: marginal teachers kept for last round's participants "
            "only (others learn from the global model; O(m*d) memory) or for every registered "
            "client from its last participation (O(N*d)); the same under full participation"
        ),
    )
    s.add_argument(
        "--no-projection",
        action="store_true",
        help="SPMC ablation: server part only (clients plain SGD)",
    )
    s.add_argument(
        "--no-server-weighting",
        action="store_true",
        help="SPMC ablation: client part only (uniform server weights)",
    )
    e = p.add_argument_group("execution")
    e.add_argument("--eval-every", type=int, default=1, help="evaluate every k rounds")
    e.add_argument(
        "--eval-batch",
        type=int,
        default=DEFAULTS.eval_batch,
        help="test images per evaluation batch (memory only; the numbers do not change)",
    )
    e.add_argument(
        "--client-chunk",
        type=int,
        default=None,
        help="clients trained at once, bounding memory (default: all that fit, 1 on CPU)",
    )
    e.add_argument(
        "--stream-aggregation",
        action="store_true",
        help=(
            "FedAvg rules: fold each chunk of trained clients into a running sum instead of "
            "holding the (clients-per-round x params) matrix (one device, no model attacks)"
        ),
    )
    e.add_argument("--devices", default="auto", help="'auto' or a device count for the client axis")
    e.add_argument(
        "--client-data",
        default=DEFAULTS.client_data,
        help=(
            "with several devices: 'blocks' (each device stores only its block of clients' "
            "images; partial participation samples m/D per block), 'replicated' (every device "
            "stores all images; sampling and results as on one device), 'auto' (blocks under "
            "full participation, replicated under partial participation)"
        ),
    )
    e.add_argument(
        "--no-balance-clients",
        action="store_true",
        help=(
            "with several devices: give each device a contiguous block of the clients (or of "
            "the round's participants) instead of clients chosen so the devices' local steps "
            "balance"
        ),
    )
    e.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help=(
            "split the host CPU into N JAX devices (jax_num_cpu_devices) so clients train on "
            "them in parallel under --devices; CPU backend only; 1 keeps one device (default: "
            "one per allowed core from the command line, under --devices auto without "
            "--stream-aggregation or multi-host; one device for in-process train.main)"
        ),
    )
    e.add_argument(
        "--coordinator",
        default=None,
        help="multi-host: host:port of process 0 (default: env SPMC_COORDINATOR, else one host)",
    )
    e.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="multi-host: process count (default: env SPMC_NUM_PROCESSES, else one host)",
    )
    e.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="multi-host: this process's rank (default: env SPMC_PROCESS_ID, else one host)",
    )
    e.add_argument(
        "--out",
        default=None,
        help="output directory; a folder holding a run is refused unless --overwrite or "
        "--resume (default: runs/<dataset>-<defense>-<attack>-g<gamma>-s<seed>-<hash of the "
        "options that change the numbers>)",
    )
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (its metrics, summary and checkpoints)",
    )
    e.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, build the partition, write the plan and exit without training",
    )
    e.add_argument(
        "--quiet",
        action="store_true",
        help="print no per-round lines and no progress bar (the bar is off anyway when stderr "
        "is not a terminal or CI is set)",
    )
    e.add_argument(
        "--test-subsample",
        type=int,
        default=None,
        metavar="N",
        help="evaluate A and R on a class-stratified subset of N test images, for quick runs "
        "(default: the whole test set)",
    )
    e.add_argument(
        "--wandb",
        default=None,
        metavar="PROJECT",
        help="also log every round to this Weights & Biases project, which needs the optional "
        "extra spmc_jax[wandb] (default: no W&B run)",
    )
    e.add_argument(
        "--wandb-mode",
        default="offline",
        help="offline: write the W&B run under OUT/wandb with no network or account (upload "
        "later with `wandb sync`); online: stream it to the W&B server",
    )
    e.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help=(
            "save the whole run state to OUT/checkpoints at the end of each evaluation block "
            "whose end round is a multiple of N, and after the last round (the last "
            f"{DEFAULT_KEEP} kept); 0 = off"
        ),
    )
    e.add_argument(
        "--resume",
        action="store_true",
        help=(
            "continue the run in --out from its latest checkpoint: the same numbers as an "
            "uninterrupted run (the config must match; --rounds may grow); metrics.jsonl keeps "
            "the checkpointed rounds' lines and appends. Add --checkpoint-every to keep saving"
        ),
    )
    return p


def _preset_text(name: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in PRESETS[name].items()) or "the defaults"


# Config fields whose command-line flag stores the negation.
_NEGATED_FLAGS = {
    "fetch": "no_fetch",
    "projection": "no_projection",
    "server_weighting": "no_server_weighting",
    "balance_clients": "no_balance_clients",
}


def preset_defaults(name: str) -> dict[str, Any]:
    """`config.PRESETS[name]` as argparse defaults (dest -> value) for `build_parser()`.

    Setting these as the parser's defaults and parsing again makes every explicit flag win
    over the preset. Raises ValueError for an unknown preset or a field without a flag.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    dests = {a.dest for a in build_parser()._actions}
    out: dict[str, Any] = {}
    for key, value in PRESETS[name].items():
        if key in _NEGATED_FLAGS:
            out[_NEGATED_FLAGS[key]] = not value
        elif key == "attack_opts":
            out["attack_opt"] = [f"{a}.{k}={v}" for a, k, v in value]
        elif key == "defense_opts":
            out["defense_opt"] = [f"{k}={v}" for k, v in value]
        elif key in dests:
            out[key] = value
        else:
            raise ValueError(f"preset {name!r}: {key!r} is not a train option")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; with --preset, its values become the defaults (flags win)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset is not None:
        parser.set_defaults(**preset_defaults(args.preset))
        args = parser.parse_args(argv)
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    attack_opts = []
    for item in args.attack_opt or []:
        name, _, kv = item.partition(".")
        if not kv or "=" not in kv:
            raise ValueError(f"--attack-opt expects NAME.KEY=VALUE, got {item!r}")
        k, v = parse_kv([kv], "--attack-opt").popitem()
        attack_opts.append((name, k, v))
    return Config(
        dataset=args.dataset,
        data_dir=args.data_dir,
        fetch=not args.no_fetch,
        subsample=args.subsample,
        partition=args.partition,
        beta=args.beta,
        min_size=args.min_size,
        clients=args.clients,
        clients_per_round=args.clients_per_round,
        rounds=args.rounds,
        protocol=args.protocol,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        model=args.model,
        conv_impl=args.conv_impl,
        seed=args.seed,
        gamma=args.gamma,
        attack=args.attack,
        attack_opts=tuple(attack_opts),
        attack_start=args.attack_start,
        attack_end=args.attack_end,
        attacker_ids=args.attacker_ids,
        attackers_skip_projection=args.attackers_skip_projection,
        attackers_projection=args.attackers_projection,
        fedprox_mu=args.fedprox_mu,
        client_dp_clip=args.client_dp_clip,
        client_dp_sigma=args.client_dp_sigma,
        client_dp_all=args.client_dp_all,
        defense=args.defense,
        defense_opts=tuple(parse_kv(args.defense_opt, "--defense-opt").items()),
        assumed_malicious=args.assumed_malicious,
        spmc_lambda=args.spmc_lambda,
        spmc_temperature=args.spmc_temperature,
        spmc_space=args.spmc_space,
        spmc_teachers=args.spmc_teachers,
        compute_dtype=args.compute_dtype,
        cpu_dot_fusion=args.cpu_dot_fusion,
        projection=not args.no_projection,
        server_weighting=not args.no_server_weighting,
        eval_every=args.eval_every,
        eval_batch=args.eval_batch,
        client_chunk=args.client_chunk,
        stream_aggregation=args.stream_aggregation,
        client_data=args.client_data,
        balance_clients=not args.no_balance_clients,
        devices=args.devices,
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        out=args.out,
    )


def default_out(cfg: Config) -> Path:
    """runs/<dataset>-<defense>-<attack>-g<γ>-s<seed>-<hash>: distinct for configs whose
    numbers differ (`Config.config_hash`), readable for the common ones."""
    g = f"{cfg.gamma:g}"
    name = f"{cfg.dataset}-{cfg.defense}-{cfg.attack}-g{g}-s{cfg.seed}-{cfg.config_hash()}"
    return Path("runs") / name


def check_out(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an output path that would lose an earlier run or cannot be a directory.

    Raises:
      ValueError: `out` (or a parent) is a file; `out` holds a run (RUN_MARKERS) and neither
        `overwrite` nor `resume` is set; or both are set.
    """
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other; accepted: one of them")
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(
                    f"--out {str(out)!r}: {str(p)!r} is a file; accepted: a new or existing "
                    "directory"
                )
            break
    held = [m for m in RUN_MARKERS if (out / m).exists()]
    if held and not (overwrite or resume):
        raise ValueError(
            f"--out {str(out)!r} already holds a run ({', '.join(held)}); accepted: a new "
            "directory, --overwrite to replace that run, or --resume to continue it"
        )


def check_data_dir(cfg: Config) -> None:
    """--data-dir must be a directory; with --no-fetch it must hold the dataset itself.

    Without this, a --data-dir with nothing in it would silently fall back to the cache.
    """
    if cfg.data_dir is None:
        return
    d = Path(cfg.data_dir)
    if not d.is_dir():
        raise ValueError(f"--data-dir {cfg.data_dir!r} is not a readable directory")
    if cfg.fetch:
        return
    from spmc_jax.data.sources import fetch_command, locate

    hit = locate(cfg.dataset, d)
    root = d.resolve()
    if hit is None or not (hit[1].resolve() == root or root in hit[1].resolve().parents):
        raise ValueError(
            f"--data-dir {cfg.data_dir!r} holds no {cfg.dataset} files and --no-fetch forbids "
            f"fetching them; accepted: a directory with {cfg.dataset}.npz, IDX files or the "
            f"CIFAR-10 layouts (see README, Data), e.g. filled by `{fetch_command(cfg.dataset)}`"
        )


def check_devices(cfg: Config) -> None:
    """--devices must not ask for more devices than JAX sees, nor more than one for
    --stream-aggregation (as `engine.Simulation` would find; initialises the backend)."""
    import jax

    from spmc_jax.sharding import resolve_device_count

    try:
        used = resolve_device_count(cfg.devices, math.gcd(cfg.n_per_round, cfg.clients))
    except ValueError:
        n = len(jax.devices())
        raise ValueError(
            f"--devices {cfg.devices}: only {n} device(s) are visible "
            f"({jax.devices()[0].platform}); accepted: 'auto' or 1..{n}"
        ) from None
    if cfg.stream_aggregation and used > 1:
        raise ValueError(
            f"--stream-aggregation runs on one device; --devices {cfg.devices} shards the "
            f"clients over {used}; accepted: --devices 1"
        )


ATTACK_KIND_HEADINGS = {
    "data": "data attacks (change the attackers' training data: poison samples, add a trigger):",
    "client_data": (
        "data attacks with their own client hook (a trigger the attackers optimise during the "
        "run, or their own training objective):"
    ),
    "client": "training-time attacks (change how the attackers train, e.g. their gradients):",
    "model": "model attacks (change the attackers' trained models before aggregation):",
}


def list_registry(kind: str) -> str:
    from spmc_jax.aggregators import REGISTRY as DEFENSES
    from spmc_jax.attacks import REGISTRY as ATTACKS
    from spmc_jax.registry import factory_options

    items: list[tuple[str, Any]] = list((DEFENSES if kind == "defense" else ATTACKS).items())
    lines = [f"{kind}s (use --{kind} NAME, options with --{kind}-opt):"]

    def entries(group: list[tuple[str, Any]]) -> None:
        for name, spec in group:
            opts = ", ".join(f"{k}={p.default!r}" for k, p in factory_options(spec.factory).items())
            lines.append(f"  {name:<18} {spec.summary}")
            if getattr(spec, "paper", ""):
                lines.append(f"  {'':<18} paper: {spec.paper}")
            if opts:
                lines.append(f"  {'':<18} options: {opts}")

    if kind == "defense":
        entries(items)
        return "\n".join(lines)
    for group_kind, heading in ATTACK_KIND_HEADINGS.items():
        group = [(n, s) for n, s in items if s.kind == group_kind]
        if group:
            lines.append(heading)
            entries(group)
    lines.append(
        "Combine at most one data attack with model attacks: --attack base+scaling trains the "
        "attackers on poisoned data, then boosts their models."
    )
    return "\n".join(lines)


def fmt_pct(v: float | None, w: int = 6) -> str:
    """A percentage with 2 decimals, right-aligned in `w` characters; '–' for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return " " * (w - 1) + "–"
    # `+ 0.0` turns the -0.0 of a tiny negative (R = 100 - 100.000001) into 0.0.
    return f"{round(v, 2) + 0.0:{w}.2f}"


def round_line(row: dict[str, Any], rounds: int) -> str:
    """The progress line of one evaluated round (train and sweep print it; rows are 1-based)."""
    return (
        f"round {row['round']:>3}/{rounds}  A {fmt_pct(row['A'])}  "
        f"R {fmt_pct(row['R'])}  V {fmt_pct(row['V'])}  "
        f"attackers' weight {row['attacker_weight']:.3f}  {row['seconds']:.2f} s/round"
    )


def nonfinite_line(row: dict[str, Any], rounds: int) -> str | None:
    """The warning for a round with non-finite client models (None when there were none)."""
    n = int(row.get("nonfinite", 0))
    if not n:
        return None
    ids = row.get("nonfinite_ids", [])
    shown = ", ".join(str(i) for i in ids[:20]) + (", ..." if len(ids) > 20 else "")
    return (
        f"warning: round {row['round']}/{rounds}: {n} of {len(row['client_ids'])} clients "
        f"non-finite (ids {shown}); their models were dropped (zero update)"
    )


def chance_note(final: dict[str, Any]) -> str:
    """The warning printed and plotted for a run that did not learn (`metrics.learned`)."""
    return (
        f"NOT LEARNED: mean A {fmt_pct(final['A']).strip()} % is within "
        f"{final['chance_margin']:g} points of chance ({final['chance']:.2f} %); R and V "
        "are meaningless for a model at chance"
    )


def plot_curves(
    history: list[dict[str, Any]], path: Path, title: str, note: str | None = None
) -> Any:
    """A and R per evaluated round (1-based, integer ticks); `note` in red at the bottom.

    Returns the matplotlib Figure (also saved to `path`).
    """
    # A bare Figure, not pyplot: no global backend switch (a notebook keeps its own).
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [h for h in history if h.get("A") is not None]
    fig = Figure(figsize=(9, 3.2 if note is None else 3.6))
    ax = fig.subplots(1, 2)
    for i, key in enumerate(("A", "R")):
        ax[i].plot([h["round"] for h in rows], [h[key] for h in rows], marker="o", ms=3)
        ax[i].xaxis.set_major_locator(MaxNLocator(integer=True))
        ax[i].set_xlabel("round")
        ax[i].set_ylabel(f"{key} (%)")
        # The whole percentage scale: a 0.1-point wiggle must not look like a trend.
        ax[i].set_ylim(-2, 102)
        ax[i].grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    if note is not None:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", color="firebrick", fontsize=8)
    fig.tight_layout(rect=(0, 0 if note is None else 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    return fig


def default_cpu_devices(args: argparse.Namespace) -> int | None:
    """The CPU split of a command-line run that gives no --cpu-devices: one JAX device per
    allowed core (`sharding.default_cpu_device_count`), so clients train one per core.

    None (one device, as before) where a split would not apply or would clash: --devices
    other than auto, --stream-aggregation (one device only), a multi-host run, one core, or
    JAX_PLATFORMS without cpu. Only the `python -m spmc_jax.train` entry point applies it:
    `jax_num_cpu_devices` must be set before the backend starts, so in-process callers
    (tests, notebooks) keep the devices they have.
    """
    from spmc_jax.sharding import default_cpu_device_count

    if args.devices != "auto" or args.stream_aggregation:
        return None
    if args.coordinator or args.num_processes is not None or args.process_id is not None:
        return None
    return default_cpu_device_count()


def main(argv: list[str] | None = None, *, cli: bool = False) -> int:
    """Run the command line `argv`; `cli=True` (the `python -m` entry point) also applies the
    command line's process-wide defaults (`default_cpu_devices`)."""
    args = parse_args(argv)
    if args.defense == "help":
        print(list_registry("defense"))
        return 0
    if args.attack == "help":
        print(list_registry("attack"))
        return 0
    try:
        from spmc_jax.compile_options import resolve_cpu_dot_fusion
        from spmc_jax.sharding import initialize_distributed, set_cpu_devices

        # Before anything touches a JAX backend.
        if args.cpu_devices is None and cli:
            args.cpu_devices = default_cpu_devices(args)
        if args.cpu_devices is not None:
            set_cpu_devices(args.cpu_devices)
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        cfg = config_from_args(args).validate()
        if args.checkpoint_every < 0:
            raise ValueError(
                f"--checkpoint-every must be >= 0 (0 = off), got {args.checkpoint_every}"
            )
        check_data_dir(cfg)
        check_devices(cfg)
        # An explicit "ynn" where it cannot apply (another backend, another jaxlib): an error.
        resolve_cpu_dot_fusion(cfg.cpu_dot_fusion, model=cfg.model)
        check_out(
            Path(cfg.out) if cfg.out else default_out(cfg),
            overwrite=args.overwrite,
            resume=args.resume,
        )
        check_workbench_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return execute(
        cfg,
        dry_run=args.dry_run,
        quiet=args.quiet,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        test_subsample=args.test_subsample,
        wandb_project=args.wandb,
        wandb_mode=args.wandb_mode,
    )


def _resume_point(cfg: Config, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check that `out` can be resumed under `cfg`, reading only JSON (no data, no compute).

    Returns:
      (the latest checkpoint's metadata, metrics.jsonl's rows of its completed rounds).

    Raises:
      ValueError: no run directory, no checkpoint, a config that changes the numbers, or a
        metrics.jsonl that lacks rows of the completed rounds.
    """
    from spmc_jax.checkpoint import (
        CHECKPOINT_SUBDIR,
        check_resume,
        completed_rows,
        latest_metadata,
    )

    if not out.is_dir():
        raise ValueError(
            f"--resume: the output directory {str(out)!r} does not exist; pass the --out of "
            "the run to resume"
        )
    meta = latest_metadata(out / CHECKPOINT_SUBDIR)
    if meta is None:
        raise ValueError(
            f"--resume: {str(out)!r} holds no checkpoint ({out / CHECKPOINT_SUBDIR} is missing "
            "or empty); the run must have been started with --checkpoint-every N"
        )
    check_resume(meta, cfg.to_dict())
    done = int(meta["rounds_done"])
    path = out / "metrics.jsonl"
    rows = completed_rows(path, done)
    if rows is None:
        raise ValueError(
            f"--resume: {path} lacks rows of some of the checkpoint's {done} completed rounds "
            f"(1..{done})"
        )
    return meta, rows


def execute(
    cfg: Config,
    dry_run: bool = False,
    quiet: bool = False,
    checkpoint_every: int = 0,
    resume: bool = False,
    test_subsample: int | None = None,
    wandb_project: str | None = None,
    wandb_mode: str = "offline",
) -> int:
    """Load data, plan, (train), write outputs. Returns the exit code.

    With `resume`, the run in `--out` continues from its latest checkpoint (checked before
    any data is loaded); with `checkpoint_every` N > 0, the state is saved after each
    evaluation block ending on a multiple of N and after the last round. `test_subsample`
    evaluates on a class-stratified subset of that many test images; `wandb_project` also
    logs to Weights & Biases (`reporting.RunLogger`).
    """
    from spmc_jax.data import load_dataset
    from spmc_jax.data.sources import DatasetNotFoundError
    from spmc_jax.engine import Simulation, device_memory_bytes, make_plan, run
    from spmc_jax.metrics import last_k_means, learned
    from spmc_jax.runinfo import environment

    out = Path(cfg.out) if cfg.out else default_out(cfg)
    meta: dict[str, Any] | None = None
    kept: list[dict[str, Any]] = []
    if resume:
        try:
            meta, kept = _resume_point(cfg, out)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        ds = test_subset(
            load_dataset(cfg.dataset, data_dir=cfg.data_dir, fetch=cfg.fetch), test_subsample
        )
        plan = make_plan(cfg, ds)
    except (ValueError, DatasetNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    plan_d = plan.to_dict()
    avail = device_memory_bytes()
    plan_d["device_memory_bytes"] = avail
    plan_d["test_subsample"] = test_subsample
    (out / "plan.json").write_text(
        json.dumps({"config": cfg.to_dict(), "plan": plan_d, "environment": env}, indent=1)
    )
    est = plan.memory["total"]
    fits = bool(plan.memory.get("fits", 1.0))
    chunk = "all" if plan.client_chunk is None else str(plan.client_chunk)
    print(
        f"plan: {plan.dataset} ({plan.dataset_source}), {cfg.clients} clients "
        f"({cfg.n_per_round}/round, malicious {plan_d['malicious_ids'][:20]}), "
        f"{plan.num_params:,} params, {plan.epochs} local epochs x {plan.steps_per_epoch} steps, "
        f"clients per chunk: {chunk}, est. memory {est / 2**30:.2f} GiB"
        + (f" of {avail / 2**30:.1f} GiB" if avail else "")
        + ("" if fits else " -- does NOT fit, even one client at a time")
    )
    if not fits and plan.memory_advice:
        print(f"to fit: {plan.memory_advice}")
    if plan.shared_shards:
        print(
            "note: more clients than the data allows disjoint shards of --min-size; clients "
            "draw overlapping samples (cross-device mode)"
        )
    if dry_run:
        print(f"dry run: plan written to {out / 'plan.json'}")
        return 0
    if not fits:
        print(
            f"error: estimated memory {est / 2**30:.1f} GiB does not fit the device "
            f"({(avail or 0) / 2**30:.1f} GiB) even with --client-chunk 1: {plan.memory_advice}",
            file=sys.stderr,
        )
        return 2

    from spmc_jax import checkpoint as ckpt_lib

    ckpt_dir = out / ckpt_lib.CHECKPOINT_SUBDIR
    if meta is None and ckpt_lib.clear(ckpt_dir):
        # A fresh run rewrites metrics.jsonl: an older run's checkpoints would resume into it.
        print(f"note: removed the earlier run's checkpoints in {ckpt_dir}")
    sim = Simulation(cfg, ds, plan)
    client_devices = 1 if sim.mesh is None else sim.mesh.size
    state, done = None, 0
    if meta is not None:
        try:
            ckpt_lib.check_resume(meta, cfg.to_dict(), client_devices)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        done = int(meta["rounds_done"])
        with ckpt_lib.Checkpointer(ckpt_dir) as reader:
            state, _ = reader.restore(sim.init_state(), done)
        print(f"resuming after round {done} from {ckpt_dir}")
    ckpt = ckpt_lib.Checkpointer(ckpt_dir) if checkpoint_every > 0 else None

    def on_checkpoint(state: Any, rounds_done: int) -> None:
        if ckpt is not None and (rounds_done % checkpoint_every == 0 or rounds_done == cfg.rounds):
            ckpt.save(state, rounds_done, cfg.to_dict(), client_devices)

    if meta is None:
        # A fresh run (--overwrite): no summary or plot of the replaced run may survive it.
        for stale in ("summary.json", "curves.png"):
            (out / stale).unlink(missing_ok=True)
    metrics_path = out / "metrics.jsonl"
    # Resuming: keep the checkpointed rounds' lines, drop any written after the checkpoint.
    metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    fh = metrics_path.open("a")
    t_start = time.perf_counter()
    title = f"{cfg.dataset} {cfg.defense} vs {cfg.attack}, gamma={cfg.gamma}"
    logger, progress = open_loggers(
        out, cfg, kept, title, quiet=quiet, wandb_project=wandb_project, wandb_mode=wandb_mode
    )

    def on_round(row: dict[str, Any]) -> None:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        logger.log(row)
        evaluated = row.get("A") is not None
        progress.update(
            1, f"A {fmt_pct(row['A']).strip()} R {fmt_pct(row['R']).strip()}" if evaluated else None
        )
        if not quiet and evaluated:
            progress.write(round_line(row, cfg.rounds))
        warn = nonfinite_line(row, cfg.rounds)
        if warn is not None:
            progress.write(warn)

    try:
        result = run(
            cfg,
            ds,
            on_round=on_round,
            sim=sim,
            state=state,
            start_round=done,
            history=kept,
            on_checkpoint=on_checkpoint,
        )
    finally:
        fh.close()
        progress.close()
        logger.close()
        if ckpt is not None:
            ckpt.close()  # waits for the last asynchronous save
    ckpt_lib.save_final_model(out, result.state.global_flat, cfg.rounds, cfg.to_dict())
    final = last_k_means(result.history)
    final.update(learned(final["A"], ds.num_classes))
    summary = {
        "config": cfg.to_dict(),
        "environment": env,
        "plan": plan_d,
        "conv_impl": sim.conv_impl,
        "cpu_dot_fusion": sim.cpu_dot_fusion,
        "r_trigger": sim.r_trigger,
        # What the rule's factory actually received (config's intent: config.derived).
        "defense_options_received": sim.defense_opts,
        "last5": final,
        "learned": final["learned"],
        "resumed_from_round": done if meta is not None else None,
        "checkpoint_every": checkpoint_every,
        "wall_seconds": time.perf_counter() - t_start,
        "mean_attacker_weight": float(
            sum(h["attacker_weight"] for h in result.history) / len(result.history)
        ),
    }
    summary["test_subsample"] = test_subsample
    summary["client_devices"] = client_devices  # devices the clients were sharded over
    summary["device_placement"] = sim.device_placement()  # which device trained which client
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    note = None if final["learned"] else chance_note(final)
    plot_curves(result.history, out / "curves.png", title, note=note)
    print(
        f"last-{len(final['rounds_averaged'])}-round means: A {fmt_pct(final['A'])}  "
        f"R {fmt_pct(final['R'])}  R(excl. target) {fmt_pct(final['R_excl_target'])}  "
        f"V {fmt_pct(final['V'])}"
    )
    if note is not None:
        print(f"warning: {note}")
    print(f"outputs: {out}/metrics.jsonl, metrics.csv, summary.json, curves.png, tb/, final_model/")
    return 0


def check_workbench_args(args: argparse.Namespace) -> None:
    """Validate the logging / evaluation flags (before any data is loaded).

    Raises:
      ValueError: --test-subsample below 10, or a --wandb request that cannot work.
    """
    from spmc_jax.reporting import check_wandb

    if args.test_subsample is not None and args.test_subsample < 10:
        raise ValueError(
            f"--test-subsample must be >= 10 (one image per class), got {args.test_subsample}"
        )
    check_wandb(args.wandb, args.wandb_mode)


def test_subset(ds: Any, n: int | None) -> Any:
    """The dataset with a class-stratified subset of `n` test images (as sweep's)."""
    from spmc_jax.sweep import _test_subset

    return _test_subset(ds, n)


def open_loggers(
    out: Path,
    cfg: Config,
    kept: list[dict[str, Any]],
    title: str,
    *,
    quiet: bool,
    wandb_project: str | None,
    wandb_mode: str,
) -> tuple[Any, Any]:
    """The run's `reporting.RunLogger` (CSV, TensorBoard, W&B, live curves.png) and its
    round `reporting.Progress` bar (silent off a terminal, in CI and with --quiet), the bar
    announcing that the first round compiles."""
    import jax

    from spmc_jax.reporting import Progress, RunLogger

    # Multi-host: one TensorBoard / W&B run (process 0's), not one per host.
    primary = jax.process_index() == 0
    logger = RunLogger(
        out,
        cfg.to_dict(),
        kept,
        plot=lambda history, path: plot_curves(history, path, title),
        tensorboard=primary,
        wandb_project=wandb_project if primary else None,
        wandb_mode=wandb_mode,
    )
    progress = Progress(
        cfg.rounds,
        initial=len(kept),
        enabled=False if quiet else None,
        compiling=f"round {len(kept) + 1}",
    )
    return logger, progress


def enable_cli_compile_cache() -> str:
    """Turn on JAX's persistent compilation cache for a command-line run.

    A second run with the same shapes then skips the 5–15 s of compilation (issue 14,
    benchmarks/RESULTS.md). Only the `python -m spmc_jax.train` entry point calls this: the
    setting is process-wide, so in-process callers (tests, notebooks, the sweep with its own
    `DIR/.jax_cache`) keep theirs. `JAX_COMPILATION_CACHE_DIR` wins when set; otherwise the
    cache lives in `<data cache>/jax_cache` (`$XDG_CACHE_HOME/spmc_jax`, default
    `~/.cache/spmc_jax`). Returns the directory in effect.
    """
    from spmc_jax.data.sources import default_cache_dir
    from spmc_jax.sweep import enable_jax_cache

    return enable_jax_cache(default_cache_dir() / "jax_cache")


if __name__ == "__main__":
    enable_cli_compile_cache()
    sys.exit(main(cli=True))
