"""Float64 NumPy oracle of 3DFed's crafted update, feedback reading and tuning, written from
Li et al., "3DFed", IEEE S&P 2023 (indicators, noise masks, decoy models and
the adaptive tuning) as restated in spmc_jax/attacks/three_dfed.py's docstring; loops per slot
and per optimiser step, no vectorised tricks of the code under test.
"""

from __future__ import annotations

import numpy as np

UP_COEF, NORM_COEF = 0.1, 0.01


def read_feedback(delta, ind_val, sent, threshold, tol):
    """(feedback list, status list, weak_dp) with status -1 unsent, 0 r, 1 c, 2 a."""
    f = [delta[r] / ind_val[r] if sent[r] else np.nan for r in range(len(sent))]
    live = [x for x, s in zip(f, sent, strict=True) if s]
    weak = any(x > 1 + tol or x < -threshold for x in live)
    fmax = max(live) if live else -np.inf
    status = []
    for x, s in zip(f, sent, strict=True):
        if not s:
            status.append(-1)
        elif x <= threshold:
            status.append(0)
        elif x <= 0.8 * fmax:
            status.append(1)
        else:
            status.append(2)
    return f, status, weak


def tune(status, decoy, alpha, k, unif, group_size, alpha_min, k_max):
    """(alpha, k) after a reading (adaptive tuning, groups counting their sent slots)."""
    bd = [r for r in range(len(status)) if status[r] >= 0 and not decoy[r]]
    dec = [r for r in range(len(status)) if status[r] >= 0 and decoy[r]]
    dec_acc = sum(status[r] == 2 for r in dec)
    k = max(k - dec_acc, 0)
    if not any(status[r] >= 1 for r in bd) and dec_acc == 0:
        k += 1
    k = min(k, k_max)
    G = len(alpha)
    groups = [[r for r in bd if r // group_size == gi] for gi in range(G)]
    active = [gi for gi in range(G) if groups[gi]]
    cand = sorted(
        alpha[gi]
        for gi in active
        if sum(status[r] == 2 for r in groups[gi]) >= 0.8 * len(groups[gi])
    )
    new = list(alpha)
    for gi in range(G):
        fresh = alpha_min + (1 - alpha_min) * unif[gi]
        if len(active) <= 1:
            new[gi] = fresh if not cand else alpha[gi]
        elif len(cand) == len(active):
            new[gi] = cand[0] + (cand[1] - cand[0]) * unif[gi]
        elif cand:
            new[gi] = cand[0] + 0.1 * unif[gi]
        else:
            new[gi] = fresh
        if new[gi] >= 1:
            new[gi] = 0.99
        elif new[gi] <= 0:
            new[gi] = 0.01
    return np.array(new), k


def select_indicators(analog, curv, allowed, slots, num_candidate):
    """Among the num_candidate*slots smallest analog (allowed coords, ties by index), the
    slots smallest |curv| (ties: smaller analog first)."""
    idx = [i for i in range(len(analog)) if allowed[i]]
    idx.sort(key=lambda i: (analog[i], i))
    cand = idx[: min(num_candidate * slots, len(idx))]
    order = sorted(range(len(cand)), key=lambda j: (abs(curv[cand[j]]), j))
    return [cand[j] for j in order[:slots]]


def optimise_masks(ub, n0, present, alpha, steps, lr, momentum, lagrange_step):
    """Noise masks of one group: gradient descent with momentum on each member's
    L_i = [a Σ_j 0.1/UP_ij + (1-a) 0.01 ||N_i|| + λ 0.01 ||Σ N||] / (1 + λ), dual ascent."""
    M = len(present)
    live = [i for i in range(M) if present[i]]
    N = np.zeros_like(n0)
    if live:
        mean = sum(n0[i] for i in live) / len(live)
        for i in live:
            N[i] = n0[i] - mean
    buf = np.zeros_like(N)
    lam = 1.0
    for t in range(steps):
        S = sum((N[i] for i in live), np.zeros_like(ub))
        nS = np.linalg.norm(S)
        grads = np.zeros_like(N)
        for i in live:
            A = ub + N[i]
            g_up = np.zeros_like(A)
            for j in range(A.shape[0]):
                up = max(np.abs(A[j]).sum(), 1e-12)
                g_up[j] = -UP_COEF * np.sign(A[j]) / up**2
            nN = np.linalg.norm(N[i])
            g_norm = NORM_COEF * N[i] / max(nN, 1e-12)
            g_lag = NORM_COEF * S / max(nS, 1e-12)
            grads[i] = (alpha * g_up + (1 - alpha) * g_norm + lam * g_lag) / (1 + lam)
        buf = grads if t == 0 else momentum * buf + grads
        N = N - lr * buf
        lam += lagrange_step * np.linalg.norm(sum((N[i] for i in live), np.zeros_like(ub)))
    return N


def craft(W, g, malicious, alpha, k, curv, neurons, noise0, entries, kernel, head_mask, o):
    """(rows, ind_idx, ind_val, sent, decoy) of one round, slots = n (module docstring)."""
    W = np.asarray(W, np.float64)
    g = np.asarray(g, np.float64)
    n, p = W.shape
    U = W - g
    mal = [i for i in range(n) if malicious[i]]
    m_t = len(mal)
    k_eff = min(max(k, 0), max(m_t - 1, 0))
    m_b = m_t - k_eff
    bd = [i for r, i in enumerate(mal) if r < m_b and np.all(np.isfinite(U[i]))]
    u_b = sum((U[i] for i in bd), np.zeros(p)) / max(len(bd), 1)
    benign = [i for i in range(n) if not malicious[i] and np.all(np.isfinite(U[i]))]
    u_ref = U[benign[0]] if benign else u_b.copy()
    nb = np.linalg.norm(u_b)
    s = max(min(np.linalg.norm(u_ref) / nb, o["weight_scale"]), 1.0) if nb > 0 else 1.0
    u_b = s * u_b
    ind = select_indicators(np.abs(u_b) + np.abs(u_ref), curv, ~head_mask, n, o["num_candidate"])
    gs = o["group_size"]
    G = len(alpha)
    masks = []
    for gi in range(G):
        sel = entries[neurons[gi]]  # (J, e)
        present = [gi * gs + mi < m_b for mi in range(gs)]
        masks.append(
            optimise_masks(
                u_b[sel],
                noise0[gi],
                present,
                alpha[gi],
                o["noise_steps"],
                o["noise_lr"],
                o["noise_momentum"],
                o["lagrange_step"],
            )
        )
    diff = np.abs(u_b[kernel] - u_ref[kernel])
    dorder = sorted(range(len(kernel)), key=lambda j: (diff[j], j))
    dparam = [kernel[j] for j in dorder[: min(n, len(kernel))]]
    out = W.copy()
    vals, decoy = np.zeros(n), np.zeros(n, bool)
    for r in range(n):
        if r < m_b:
            u = u_b.copy()
            gi, mi = min(r // gs, G - 1), r % gs
            sel = entries[neurons[gi]]
            u[sel.ravel()] += masks[gi][mi].ravel()
        else:
            u = u_ref.copy()
            pq = dparam[min(r - m_b, len(dparam) - 1)]
            u[pq] -= o["decoy_shift"] * (1.0 if u_ref[pq] >= 0 else -1.0)
            decoy[r] = r < m_t
        v = u[ind[r]] * o["indicator_boost"]
        if v == 0:
            v = o["indicator_floor"]
        u[ind[r]] = v
        vals[r] = v
        if r < m_t:
            out[mal[r]] = g + u
    sent = np.arange(n) < m_t
    return out, np.array(ind), vals, sent, decoy
