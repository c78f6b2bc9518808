"""Float64 oracle of Grad-CAM for a head of global average pooling + one linear layer.

For logits y = mean_ij(A_ij) · W + b, ∂y^c/∂A^k_ij = W[k, c] / (h w) for every position, so
Grad-CAM's α_k = W[k, c] / (h w) and L = ReLU(Σ_k α_k A^k) = ReLU(A · W[:, c]) / (h w): the
class activation map of Zhou et al. (CVPR 2016), as Selvaraju et al. (ICCV 2017, §3.1) show.
"""

from __future__ import annotations

import numpy as np


def gap_linear_cam(
    feats: np.ndarray, kernel: np.ndarray, bias: np.ndarray, classes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(maps (B, h, w), logits (B, C)) for features (B, h, w, K), kernel (K, C), bias (C,);
    the class per image is the argmax of the logits unless `classes` is given."""
    feats = np.asarray(feats, np.float64)
    _, h, w, _ = feats.shape
    logits = feats.mean(axis=(1, 2)) @ kernel + bias
    c = np.argmax(logits, -1) if classes is None else np.asarray(classes)
    maps = np.einsum("bhwk,bk->bhw", feats, kernel[:, c].T) / (h * w)
    return np.maximum(maps, 0.0), logits
