"""Float64 NumPy oracle of a 2-D convolution (cross-correlation, as PyTorch's Conv2d), NHWC
input, HWIO kernel, written from the definition: out[b, y, x, o] = Σ_{i,j,c}
xpad[b, y·s + i, x·s + j, c] · k[i, j, c, o]."""

from __future__ import annotations

import numpy as np


def conv2d_nhwc(x: np.ndarray, k: np.ndarray, stride: int, pad: int) -> np.ndarray:
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = np.asarray(k, np.float64)
    kh, kw, _, cout = k.shape
    b, h, w, _ = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((b, oh, ow, cout))
    for yy in range(oh):
        for xx in range(ow):
            win = x[:, yy * stride : yy * stride + kh, xx * stride : xx * stride + kw, :]
            out[:, yy, xx, :] = np.einsum("bijc,ijco->bo", win, k)
    return out


def conv2d_nhwc_kernel_grad(
    x: np.ndarray, g: np.ndarray, kshape: tuple[int, ...], stride: int, pad: int
) -> np.ndarray:
    """∂/∂k of Σ out·g for the convolution above: dk[i, j, c, o] =
    Σ_{b,y,x} xpad[b, y·s + i, x·s + j, c] · g[b, y, x, o], in float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    g = np.asarray(g, np.float64)
    kh, kw = kshape[0], kshape[1]
    _, oh, ow, _ = g.shape
    dk = np.zeros(kshape)
    for i in range(kh):
        for j in range(kw):
            win = x[
                :, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride
            ]
            dk[i, j] = np.einsum("byxc,byxo->co", win, g)
    return dk


def conv2d_nhwc_input_grad(
    g: np.ndarray, k: np.ndarray, xshape: tuple[int, ...], stride: int, pad: int
) -> np.ndarray:
    """∂/∂x of Σ out·g for the convolution above: each output pixel hands window
    xpad[b, y·s + i, x·s + j, c] the amount Σ_o g[b, y, x, o] · k[i, j, c, o]; the padding's
    share is dropped. In float64."""
    g = np.asarray(g, np.float64)
    k = np.asarray(k, np.float64)
    kh, kw = k.shape[0], k.shape[1]
    b, h, w, c = xshape
    dxpad = np.zeros((b, h + 2 * pad, w + 2 * pad, c))
    _, oh, ow, _ = g.shape
    for yy in range(oh):
        for xx in range(ow):
            dxpad[:, yy * stride : yy * stride + kh, xx * stride : xx * stride + kw, :] += (
                np.einsum("bo,ijco->bijc", g[:, yy, xx, :], k)
            )
    return dxpad[:, pad : pad + h, pad : pad + w, :]
