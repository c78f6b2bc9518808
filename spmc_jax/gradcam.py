"""`python -m spmc_jax.gradcam`: Grad-CAM heat maps of a trained run, clean vs triggered (Fig. 7).

Grad-CAM (Selvaraju et al., ICCV 2017) for class c on a conv layer with feature maps
A ∈ R^{h×w×K}:

    α_k = (1 / hw) Σ_ij ∂y^c / ∂A^k_ij        (y^c: the logit of class c)
    L   = ReLU(Σ_k α_k A^k)                   (h × w), upsampled bilinearly to the input
                                              and divided by its maximum (0 where L ≡ 0)

with c the model's predicted class, as the SPMC paper's Fig. 7 shows it: on a backdoored model
the triggered image's map jumps to the trigger's corner, on a defended one it stays on the
digit. The layer is the last conv layer: SimpleCNN's `conv2` (its output, before ReLU and
pooling) and ResNet-10's last block `layer4` (after its residual ReLU), the layers
pytorch-grad-cam users pick for these networks. ∂y^c/∂A is taken by adding a zero
perturbation to that layer's output (flax `intercept_methods`), so the models need no hooks.

The CLI reads a run's final model (RUN_DIR/final_model, orbax, written by every
`spmc_jax.train` run) and its config, loads the dataset, and draws for N test images (not of
the target class) the image, its heat map, the triggered image and its heat map, in a grid;
several `--run`s add their heat-map rows under the same images (e.g. FedAvg vs SPMC).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spmc_jax.cli_help import HelpFormatter

# The last conv layer of each model with one (flax module name, unique in the model).
LAST_CONV = {"simple_cnn": "conv2", "resnet10": "layer4"}
CELL_IN = 1.5  # inches per image cell of the figure
LABEL_IN = 1.3  # inches of the row-label column
TITLE_IN = 0.5  # inches above the grid for the title
DPI = 100


# ----------------------------------------------------------------------------- math
def grad_cam_maps(
    model: Any,
    variables: Any,
    x: Any,
    layer: str,
    classes: Any | None = None,
) -> tuple[Any, Any]:
    """Grad-CAM maps L = ReLU(Σ_k α_k A^k) at the layer's resolution (not upsampled, not
    normalised), for each image's predicted (or the given) class.

    Args:
      model: a flax module; `model.apply(variables, x, train=False)` gives logits.
      variables: its variables.
      x: (B, H, W, C) normalised input batch.
      layer: the flax name of the conv layer (or block) whose output is explained.
      classes: (B,) class per image; None: the predicted class.

    Returns:
      (maps (B, h, w), logits (B, num_classes)).

    Raises:
      ValueError: the module named `layer` did not run exactly once in the forward pass.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    def forward(delta: Any) -> tuple[Any, Any]:
        seen: list[Any] = []

        def hook(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.name == layer:
                seen.append(out)
                out = out if delta is None else out + delta
            return out

        with nn.intercept_methods(hook):
            logits = model.apply(variables, x, train=False)
        if len(seen) != 1:
            raise ValueError(f"layer {layer!r} ran {len(seen)} times in the model; accepted: once")
        return logits, seen[0]

    _, a_shape = jax.eval_shape(lambda: forward(None))

    def score(delta: Any) -> tuple[Any, tuple[Any, Any]]:
        logits, a = forward(delta)
        c = jnp.argmax(logits, -1) if classes is None else jnp.asarray(classes)
        c = jax.lax.stop_gradient(c)
        # Per-image logits are independent (eval mode), so the gradient of their sum is each
        # image's own gradient.
        return jnp.take_along_axis(logits, c[:, None], 1).sum(), (a, logits)

    zeros = jnp.zeros(a_shape.shape, a_shape.dtype)
    grads, (a, logits) = jax.grad(score, has_aux=True)(zeros)
    weights = grads.mean(axis=(1, 2))  # α_k per image: (B, K)
    return jax.nn.relu(jnp.einsum("bhwk,bk->bhw", a, weights)), logits


def grad_cam(
    model: Any,
    variables: Any,
    x: Any,
    layer: str,
    classes: Any | None = None,
) -> tuple[Any, Any]:
    """Grad-CAM heat maps at the input's resolution, each divided by its maximum.

    Arguments as `grad_cam_maps`. Returns (maps (B, H, W) in [0, 1], logits).
    """
    import jax
    import jax.numpy as jnp

    cam, logits = grad_cam_maps(model, variables, x, layer, classes)
    b, h, w = x.shape[:3]
    cam = jax.image.resize(cam, (b, h, w), "bilinear")
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)
    return cam, logits


# ----------------------------------------------------------------------------- run pieces
def config_from_dict(d: dict[str, Any]) -> Any:
    """A `Config` from its `to_dict()` (as stored in summary.json and checkpoints)."""
    from spmc_jax.config import Config

    kw = {f.name: d[f.name] for f in dataclasses.fields(Config) if f.name in d}
    for key in ("attack_opts", "defense_opts"):
        kw[key] = tuple(tuple(x) for x in kw.get(key, ()))
    return Config(**kw)


@functools.lru_cache(maxsize=8)
def _cam_fn(
    name: str, num_classes: int, conv_impl: str, compute_dtype: str
) -> tuple[Any, Callable[[Any, Any], tuple[Any, Any]]]:
    """(model, jitted `grad_cam(model, variables, x, last conv)`), compiled once per model and
    batch shape in a process (clean and triggered batches share it)."""
    import jax

    from spmc_jax.models import get_model

    model = get_model(name, num_classes, conv_impl, compute_dtype)
    layer = LAST_CONV[name]
    return model, jax.jit(lambda variables, x: grad_cam(model, variables, x, layer))


@dataclasses.dataclass
class CamResult:
    """Grad-CAM of N images, clean and triggered, for one model."""

    label: str
    images: np.ndarray  # (N, H, W, 3) clean, in [0, 1] for display
    triggered: np.ndarray  # (N, H, W, 3) with the trigger, in [0, 1]
    labels: np.ndarray  # (N,) true labels
    pred_clean: np.ndarray  # (N,)
    pred_triggered: np.ndarray  # (N,)
    cam_clean: np.ndarray  # (N, H, W) in [0, 1]
    cam_triggered: np.ndarray  # (N, H, W) in [0, 1]
    target: int


def model_cams(cfg: Any, flat: Any, ds: Any, n_images: int = 6, label: str = "") -> CamResult:
    """Grad-CAM of the first `n_images` test images not of the backdoor target, with and
    without the run's test trigger (the reference trigger for attacks without one, as R uses).

    Args:
      cfg: the run's `Config`.
      flat: its final global model as a flat parameter vector.
      ds: the dataset (its test split is used).
      n_images: how many images.
      label: a name for the model (row labels).

    Raises:
      ValueError: a model without a conv layer, a bad `n_images`, or a parameter vector of the
        wrong size.
    """
    import jax
    import jax.numpy as jnp

    from spmc_jax.attacks import AttackEnv, parse_attack
    from spmc_jax.attacks.base_backdoor import base as base_trigger
    from spmc_jax.data.pipeline import make_test_transform
    from spmc_jax.data.types import INPUT_SHAPE
    from spmc_jax.engine import resolve_conv_impl
    from spmc_jax.flat import Flattener

    if cfg.model not in LAST_CONV:
        raise ValueError(
            f"model {cfg.model!r} has no conv layer for Grad-CAM; accepted: {', '.join(LAST_CONV)}"
        )
    if n_images < 1:
        raise ValueError(f"--images must be >= 1, got {n_images}")
    model, cams = _cam_fn(cfg.model, ds.num_classes, resolve_conv_impl(cfg), cfg.compute_dtype)
    # Shapes only: the trained values come from `flat`.
    template = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *INPUT_SHAPE)), train=False)
    )
    flattener = Flattener.build(template)
    flat = jnp.asarray(flat, jnp.float32)
    if flat.shape != (flattener.dim,):
        raise ValueError(
            f"the model vector has {flat.shape[0]} parameters, {cfg.model} has "
            f"{flattener.dim}; accepted: the run's own final model"
        )
    variables = flattener.unravel(flat)
    # The evaluator's trigger (engine.Simulation): the data attack's test trigger, else the
    # reference trigger.
    env = AttackEnv(
        image_shape=INPUT_SHAPE,
        mean=ds.mean,
        std=ds.std,
        num_classes=ds.num_classes,
        num_malicious=cfg.num_malicious,
        n_clients=cfg.n_per_round,
        lr=cfg.lr,
        param_mask=flattener.param_mask,
    )
    data_attack, _ = parse_attack(cfg.attack, env, cfg.attack_options())
    probe = data_attack if data_attack is not None and data_attack.test else base_trigger(env)
    assert probe.test is not None and probe.target is not None
    target = int(probe.target)
    keep = np.flatnonzero(np.asarray(ds.y_test) != target)[:n_images]
    if len(keep) < n_images:
        raise ValueError(f"--images {n_images}: the test set has only {len(keep)} usable images")
    y = jnp.asarray(ds.y_test[keep], jnp.int32)
    xn = make_test_transform(ds.kind, ds.mean, ds.std)(jnp.asarray(ds.x_test[keep]))
    xt, _ = probe.test(xn, y)
    cam_c, logit_c = cams(variables, xn)
    cam_t, logit_t = cams(variables, xt)
    mean, std = np.asarray(ds.mean, np.float32), np.asarray(ds.std, np.float32)

    def show(v: Any) -> np.ndarray:
        return np.clip(np.asarray(v) * std + mean, 0.0, 1.0)

    return CamResult(
        label=label or f"{cfg.defense}",
        images=show(xn),
        triggered=show(xt),
        labels=np.asarray(y),
        pred_clean=np.asarray(jnp.argmax(logit_c, -1)),
        pred_triggered=np.asarray(jnp.argmax(logit_t, -1)),
        cam_clean=np.asarray(cam_c),
        cam_triggered=np.asarray(cam_t),
        target=target,
    )


def _changed_box(clean: np.ndarray, triggered: np.ndarray) -> tuple | None:
    """((row0, col0), (row1, col1)) bounding the pixels the trigger changed; None if none."""
    rows, cols = np.nonzero(np.any(clean != triggered, axis=-1))
    if len(rows) == 0:
        return None
    return (int(rows.min()), int(cols.min())), (int(rows.max()), int(cols.max()))


def figure_size(n_images: int, n_models: int) -> tuple[float, float]:
    """Inches (width, height) of the grid: 2 image rows + 2 heat-map rows per model."""
    return LABEL_IN + CELL_IN * n_images, TITLE_IN + CELL_IN * (2 + 2 * n_models)


def draw_cams(results: Sequence[CamResult], title: str = "") -> Any:
    """The Fig. 7-style grid: clean and triggered images on top, then per model its Grad-CAM
    of the predicted class on each (overlaid, jet colormap), prediction in each cell's title
    (red when it is the backdoor target), the trigger outlined (dashed yellow).

    Returns a matplotlib Figure (no pyplot state).
    """
    from matplotlib.figure import Figure

    first = results[0]
    n = len(first.labels)
    w, h = figure_size(n, len(results))
    fig = Figure(figsize=(w, h), dpi=DPI)
    rows = 2 + 2 * len(results)
    # Fixed margins in inches, so the pixel size is exactly figure_size * DPI.
    fig.subplots_adjust(
        left=LABEL_IN / w, right=0.99, top=1 - TITLE_IN / h, bottom=0.01, wspace=0.06, hspace=0.3
    )
    ax = fig.subplots(rows, n, squeeze=False)
    grid: list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]] = [
        ("clean", first.images, None, None),
        ("triggered", first.triggered, None, None),
    ]
    for r in results:
        grid.append((f"{r.label}\nGrad-CAM clean", r.images, r.cam_clean, r.pred_clean))
        grid.append(
            (f"{r.label}\nGrad-CAM triggered", r.triggered, r.cam_triggered, r.pred_triggered)
        )
    from matplotlib.patches import Rectangle

    for i, (name, imgs, cams, preds) in enumerate(grid):
        for j in range(n):
            a = ax[i, j]
            a.imshow(imgs[j], interpolation="nearest")
            if cams is not None:
                a.imshow(cams[j], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            box = _changed_box(first.images[j], first.triggered[j])
            if box is not None and "triggered" in name:
                # Outline the trigger: a few dim pixels are easy to miss at this size.
                (r0, c0), (r1, c1) = box
                a.add_patch(
                    Rectangle(
                        (c0 - 0.5, r0 - 0.5),
                        c1 - c0 + 1,
                        r1 - r0 + 1,
                        fill=False,
                        edgecolor="yellow",
                        lw=0.8,
                        ls="--",
                    )
                )
            a.set_xticks([])
            a.set_yticks([])
            if preds is not None:
                hit = int(preds[j]) == first.target
                a.set_title(
                    f"pred {int(preds[j])}" + (" = target" if hit else ""),
                    fontsize=8,
                    color="tab:red" if hit else "black",
                )
            elif i == 0:
                a.set_title(f"label {int(first.labels[j])}", fontsize=8)
        ax[i, 0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(
        title or f"Grad-CAM of the predicted class, last conv layer (target class {first.target})",
        fontsize=10,
    )
    return fig


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spmc_jax.gradcam",
        description=(
            "Draw Grad-CAM heat maps (predicted class, last conv layer) of a trained run's "
            "final model for N test images with and without the backdoor trigger, as the SPMC "
            "paper's Fig. 7. Give --run several times to compare runs (e.g. FedAvg vs SPMC) on "
            "the same images. Needs a model with conv layers (simple_cnn, resnet10)."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="RUN_DIR",
        help="the --out of a finished `python -m spmc_jax.train` run, repeatable (default: "
        "none; required)",
    )
    p.add_argument("--out", required=True, help="PNG file to write (default: none; required)")
    p.add_argument("--images", type=int, default=6, help="test images to show")
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory holding the dataset (default: the run's own --data-dir)",
    )
    return p


def main(argv: list[str] | None = None, loader: Callable[..., Any] | None = None) -> int:
    """Run the CLI; `loader(name, data_dir=, fetch=)` replaces `load_dataset` (tests)."""
    from spmc_jax.checkpoint import load_final_model
    from spmc_jax.data.sources import DatasetNotFoundError

    args = build_parser().parse_args(argv)
    if loader is None:
        from spmc_jax.data import load_dataset

        loader = load_dataset
    try:
        if args.images < 1:
            raise ValueError(f"--images must be >= 1, got {args.images}")
        if not args.out.lower().endswith(".png"):
            raise ValueError(f"--out {args.out!r}; accepted: a path ending in .png")
        results = []
        datasets: dict[str, Any] = {}
        for run in args.run:
            flat, meta = load_final_model(run)
            cfg = config_from_dict(meta["config"])
            if datasets and cfg.dataset not in datasets:
                raise ValueError(
                    f"--run {run} is on {cfg.dataset}, the first run on {next(iter(datasets))}; "
                    "accepted: runs on the same dataset"
                )
            if cfg.dataset not in datasets:
                datasets[cfg.dataset] = loader(
                    cfg.dataset, data_dir=args.data_dir or cfg.data_dir, fetch=cfg.fetch
                )
            label = f"{cfg.defense} ({Path(run).name})" if len(args.run) > 1 else cfg.defense
            results.append(model_cams(cfg, flat, datasets[cfg.dataset], args.images, label))
    except (ValueError, DatasetNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fig = draw_cams(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    print(f"wrote {out} ({len(results)} model(s), {args.images} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
