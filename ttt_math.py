# Copyright 2026 the TTT-LM PyTorch authors. MIT License.
"""The formulas a TTT layer's inner loop is made of: the per-head LayerNorm of the reconstruction target, the
gradient of the inner loss 1/2 ||LN(z) - target||^2 and its vector-Jacobian product, and the derivatives of the
tanh-approximated GELU (TTT-MLP). A leaf module (torch only): the readable loop scan in ttt.py and the recomputing
scans in ttt_scan.py both build on it, so neither imports the other for it. Same notation as ttt.py.
"""

import torch
import torch.nn.functional as F

TTT_NORM_EPS = 1e-6


def ln_fwd(z, gamma, beta):
    """Per-head LayerNorm over f. z: (..., H, k, f); gamma, beta: (H, 1, f)."""
    return F.layer_norm(z, z.shape[-1:], eps=TTT_NORM_EPS) * gamma + beta


def ln_reconstruction_parts(z, target, gamma, beta):
    """d l / d z for the inner loss l = 1/2 ||LN(z) - target||^2, the LayerNorm backward written out:
    with x_hat = (z - mu) / std and g = (LN(z) - target) * gamma,
    dl/dz = (f g - sum(g) - x_hat sum(g x_hat)) / (f std). Returns x_hat, std, g and dl/dz."""
    f = z.shape[-1]
    std = torch.sqrt(z.var(-1, keepdim=True, unbiased=False) + TTT_NORM_EPS)
    x_hat = (z - z.mean(-1, keepdim=True)) / std
    g = (gamma * x_hat + beta - target) * gamma
    return x_hat, std, g, (f * g - g.sum(-1, keepdim=True) - x_hat * (g * x_hat).sum(-1, keepdim=True)) / (f * std)


def ln_reconstruction_grad(z, target, gamma, beta):
    """d l / d z of the inner loss (see ln_reconstruction_parts)."""
    return ln_reconstruction_parts(z, target, gamma, beta)[-1]


def ln_reconstruction_grad_vjp(u, x_hat, std, g, grad, gamma):
    """Vector-Jacobian product of `ln_reconstruction_grad` for an upstream gradient u of its output G, from the
    forward's x_hat, std, g = (LN(z) - target) * gamma and G. Writing G = (g - mean(g) - x_hat mean(g x_hat)) / std:
    d_g = (u - mean(u) - x_hat mean(u x_hat)) / std; x_hat's own terms -(u mean(g x_hat) + g mean(u x_hat)) / std
    plus d_g gamma^2 through g; std's own term -sum(u G) / std; then the LayerNorm backward to z.
    Returns dz and d_g (from which the target, gamma and beta gradients follow)."""
    mean = lambda t: t.mean(-1, keepdim=True)
    u_xhat = mean(u * x_hat)
    d_g = (u - mean(u) - x_hat * u_xhat) / std
    d_xhat = d_g * gamma * gamma - (u * mean(g * x_hat) + g * u_xhat) / std
    d_std = -(u * grad).sum(-1, keepdim=True) / std
    dz = (d_xhat - mean(d_xhat) - x_hat * mean(d_xhat * x_hat)) / std + d_std * x_hat / x_hat.shape[-1]
    return dz, d_g


def gelu_tanh_grad(x):
    """Derivative of the tanh-approximated GELU 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    return 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)


def gelu_tanh_second_derivative(x):
    """With t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3): (1 - t^2) (u' - x t u'^2 + 3 sqrt(2/pi) 0.044715 x^2)."""
    du = 0.79788456 + 0.1070322243 * x * x
    tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    return (1 - tanh_out * tanh_out) * (du - x * tanh_out * du * du + 0.1070322243 * x * x)
