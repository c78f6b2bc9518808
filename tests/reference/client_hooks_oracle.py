"""Float64 NumPy oracles of the client hooks and client-side attacks, from the papers' math.

Nothing here imports spmc_jax.
"""

from __future__ import annotations

import numpy as np


def prox_gradient(g: np.ndarray, w: np.ndarray, w_global: np.ndarray, mu: float) -> np.ndarray:
    """FedProx (Li et al. 2020): ∇[F(w) + μ/2‖w − w_g‖²] = g + μ(w − w_g)."""
    return np.asarray(g, np.float64) + mu * (np.asarray(w, np.float64) - w_global)


def clip_update(W: np.ndarray, g: np.ndarray, clip: float) -> np.ndarray:
    """Rows g + (w_i − g)·min(1, C/‖w_i − g‖₂), float64, one row at a time."""
    out = np.array(W, np.float64)
    for i in range(out.shape[0]):
        u = out[i] - g
        norm = np.sqrt(np.sum(u * u))
        out[i] = g + u * (min(1.0, clip / norm) if norm > 0 else 1.0)
    return out


def neurotoxin_mask(prev: np.ndarray, cur: np.ndarray, ratio: float) -> np.ndarray:
    """Neurotoxin (Zhang et al. 2022): 1 on coordinates NOT among the top-⌈ratio·p⌉ of
    |cur − prev| (last round's global update), 0 on those; all 1 without an update."""
    delta = np.abs(np.asarray(cur, np.float64) - prev)
    p = delta.size
    if not np.any(delta > 0):
        return np.ones(p)
    k = int(np.ceil(ratio * p))
    top = np.argsort(-delta, kind="stable")[:k]
    mask = np.ones(p)
    mask[top] = 0.0
    return mask


def spmc_invert(gd: np.ndarray, gg: np.ndarray, lam: float) -> np.ndarray:
    """SPMC projection inverted (one tensor): if ⟨G_d, G_g⟩ < 0,
    G = G_d + λ·⟨G_d, G_g⟩/‖G_g‖²·G_g (the conflicting component grows), else G_d."""
    gd = np.asarray(gd, np.float64).ravel()
    gg = np.asarray(gg, np.float64).ravel()
    dot = gd @ gg
    if dot < 0:
        return gd + lam * dot / (gg @ gg) * gg
    return gd


def kernel_cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """A3FL's sim(θ', θ): the mean over the kernels (arrays of >= 2 dimensions) of
    cos(θ'_l, θ_l) = ⟨θ'_l, θ_l⟩ / (‖θ'_l‖‖θ_l‖), float64; 1-D arrays are skipped."""
    cos = []
    for u, v in zip(a, b, strict=True):
        if np.ndim(u) < 2:
            continue
        u, v = np.asarray(u, np.float64).ravel(), np.asarray(v, np.float64).ravel()
        cos.append(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.mean(cos))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def a3fl_linear_adaptive_trigger(
    x: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray,
    pattern: np.ndarray,
    W: np.ndarray,
    b: np.ndarray,
    target: int,
    alpha: float,
    steps: int,
    lo: np.ndarray,
    hi: np.ndarray,
    adv_steps: int,
    adv_lr: float,
    lam0: float,
    every: int,
    rule: str,
) -> tuple[np.ndarray, float, list[float]]:
    """A3FL's full trigger search against a linear softmax model, float64.

    Before each block of `every` trigger steps: θ' = (W', b') from (W, b) by `adv_steps`
    gradient steps on CE(x ⊕ δ, y) (true labels; ∇_W = X'ᵀ(softmax − e_y)/B,
    ∇_b = mean(softmax − e_y)), and λ = λ₀·cos(W', W) (the only kernel; "fixed": λ₀). Then
    δ ← clip(δ − α·sign(∇_δ[CE(θ) + λ·CE(θ')]), lo, hi) on M, with ∇_{x'} of a CE toward t
    equal to (softmax − e_t) Wᵀ / B per sample.

    Returns (δ, the smallest |∇| entry on M seen, the λ of each block).
    """
    x = np.asarray(x, np.float64)
    W, b = np.asarray(W, np.float64), np.asarray(b, np.float64)
    p = np.asarray(pattern, np.float64).copy()
    B = x.shape[0]

    def flat(q: np.ndarray) -> np.ndarray:
        return np.where(mask[None], q[None], x).reshape(B, -1)

    smallest, lams = np.inf, []
    done = 0
    while done < steps:
        Wa, ba = W.copy(), b.copy()
        xs = flat(p)
        for _ in range(adv_steps):
            r = _softmax(xs @ Wa + ba)
            r[np.arange(B), y] -= 1.0
            Wa, ba = Wa - adv_lr * xs.T @ r / B, ba - adv_lr * r.mean(0)
        lam = lam0 * kernel_cosine([Wa], [W]) if rule == "similarity" else lam0
        lams.append(lam)
        for _ in range(min(every, steps - done)):
            xs = flat(p)
            gx = np.zeros_like(xs)
            for Wm, bm, weight in ((W, b, 1.0), (Wa, ba, lam)):
                r = _softmax(xs @ Wm + bm)
                r[:, target] -= 1.0
                gx += weight * r @ Wm.T / B
            g = np.where(mask, gx.reshape(x.shape).sum(0), 0.0)
            smallest = min(smallest, float(np.min(np.abs(g[mask]))))
            p = np.where(mask, np.clip(p - alpha * np.sign(g), lo, hi), p)
            done += 1
    return p, smallest, lams


def conv3x3_same(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """'SAME' 3x3 cross-correlation (NHWC, HWIO) by summing the 9 shifted products."""
    x = np.asarray(x, np.float64)
    n, h, wd, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, wd, w.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += xp[:, i : i + h, j : j + wd, :] @ np.asarray(w[i, j], np.float64)
    return out + b


def iba_trigger(params: dict, x: np.ndarray, eps: float, std: np.ndarray) -> np.ndarray:
    """IBA (Nguyen et al. 2023) with the small conv generator:
    T(x) = ε·tanh(conv(ReLU(conv(x))))/std, float64."""
    h = np.maximum(conv3x3_same(x, params["w1"], params["b1"]), 0.0)
    return eps * np.tanh(conv3x3_same(h, params["w2"], params["b2"])) / np.asarray(std)


def max_pool2(x: np.ndarray) -> np.ndarray:
    """2x2 max pooling, stride 2, floor (odd trailing rows/columns dropped), NHWC."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def bilinear_resize(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Bilinear up-sampling with half-pixel centres, NHWC: output index o samples the input
    at s = (o + ½)·in/out − ½, clamped to [0, in − 1], between floor(s) and floor(s) + 1."""

    def axis_weights(n_in: int, n_out: int) -> np.ndarray:
        m = np.zeros((n_out, n_in))
        for o in range(n_out):
            src = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
            i0 = int(np.floor(src))
            i1 = min(i0 + 1, n_in - 1)
            m[o, i0] += 1.0 - (src - i0)
            m[o, i1] += src - i0
        return m

    mh, mw = axis_weights(x.shape[1], oh), axis_weights(x.shape[2], ow)
    return np.einsum("ph,nhwc,qw->npqc", mh, np.asarray(x, np.float64), mw)


def unet_generator(params: dict, x: np.ndarray, depth: int) -> np.ndarray:
    """IBA's U-Net autoencoder G(x) (before the tanh), float64: `depth` blocks of double
    conv3x3+ReLU then 2x2 max pooling, a double-conv bottleneck, `depth` blocks of bilinear
    up-sampling to the skip's size, concatenation [up, skip] and a double conv, then a 1x1
    conv. `params[name_j]` = {"kernel": HWIO, "bias"} for the j-th conv of block `name`."""

    def double_conv(h: np.ndarray, name: str) -> np.ndarray:
        for j in range(2):
            p = params[f"{name}_{j}"]
            h = np.maximum(conv3x3_same(h, p["kernel"], p["bias"]), 0.0)
        return h

    h, skips = np.asarray(x, np.float64), []
    for i in range(depth):
        h = double_conv(h, f"down{i}")
        skips.append(h)
        h = max_pool2(h)
    h = double_conv(h, "bottleneck")
    for i in reversed(range(depth)):
        skip = skips[i]
        h = bilinear_resize(h, skip.shape[1], skip.shape[2])
        h = double_conv(np.concatenate([h, skip], axis=-1), f"up{i}")
    return h @ np.asarray(params["out"]["kernel"][0, 0], np.float64) + params["out"]["bias"]


def alter_min_rows(
    W: np.ndarray, g: np.ndarray, est: np.ndarray, malicious: np.ndarray, lam: float
) -> np.ndarray:
    """Bhagoji et al. (2019) explicit boosting around the benign estimate:
    malicious rows g + δ̂ + λ(w − g − δ̂), benign rows unchanged, float64."""
    W = np.asarray(W, np.float64)
    out = W.copy()
    out[malicious] = g + est + lam * (W[malicious] - g - est)
    return out


def alter_min_grad(g: np.ndarray, w: np.ndarray, w0: np.ndarray, est: np.ndarray, rho: float):
    """∇[L + ρ‖w − w_g − δ̂‖²] = g + 2ρ(w − w_g − δ̂)."""
    return np.asarray(g, np.float64) + 2 * rho * (np.asarray(w, np.float64) - w0 - est)


def alter_min_alternating_linear(
    kernel: np.ndarray,
    bias: np.ndarray,
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]],
    lr: float,
    lam: float,
    rho: float,
    est_kernel: np.ndarray,
    est_bias: np.ndarray,
    stealth_steps: int,
    malicious: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Bhagoji et al. (2019) alternating minimization on a linear softmax model
    logits = x @ K + b, plain SGD, float64. `batches`: per local step (x (B, F), labels
    after poisoning (B,), poisoned flags (B,), s = the step's index in its epoch). An
    attacker's step s with s mod (1 + k) == 0 is the boosted malicious step
    w ← w − lr·λ·∇ mean_{poisoned} CE; the others are stealth steps
    w ← w − lr·(∇ mean_{clean} CE + 2ρ(w − w_0 − δ̂)). A benign client: w ← w − lr·∇ mean CE."""
    k0, b0 = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
    k, b = k0.copy(), b0.copy()
    for x, y, flags, s in batches:
        x = np.asarray(x, np.float64)
        z = x @ k + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        err = p - np.eye(k.shape[1])[y]
        mal_step = malicious and s % (1 + stealth_steps) == 0
        if not malicious:
            wts = np.full(len(y), 1.0 / len(y))
        elif mal_step:
            wts = lam * flags / max(flags.sum(), 1)
        else:
            wts = ~flags / max((~flags).sum(), 1)
        gk = x.T @ (err * wts[:, None])
        gb = (err * wts[:, None]).sum(0)
        if malicious and not mal_step:
            gk = gk + 2 * rho * (k - k0 - est_kernel)
            gb = gb + 2 * rho * (b - b0 - est_bias)
        k, b = k - lr * gk, b - lr * gb
    return k, b
