"""Random deep networks for the alignment lab.

A network is a sequence of layers, layer ``i`` mapping ``s_{i-1}`` to ``s_i = h(s_{i-1}, φ_i)``
with ``s_0 = x``; ``φ_i`` is every parameter of layer ``i``. Any ``nn.Module`` sequence works
with the measurements in :mod:`gradkit.align`; :func:`make_mlp` builds the random MLPs the
experiments use, with an explicit initialisation because framework defaults change the
result: with PyTorch's default ``nn.Linear`` init (variance ``1/(3·fan_in)``) a 20-layer linear
net's signal shrinks by ~3× per layer and the measured alignment collapses to ~0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "DenseLayer",
    "KWinnersTakeAll",
    "default_gain",
    "forward_states",
    "make_activation",
    "make_mlp",
    "reinitialize",
]

ACTIVATIONS = ("linear", "relu", "leaky_relu", "tanh", "centered_leaky_clip", "kwta")
INITS = ("gaussian", "orthogonal")


class CenteredLeakyClip(nn.Module):
    """``clamp(x, -0.5, 0.5) + 0.01·x``: a centred, leaky, saturating nonlinearity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-0.5, 0.5) + 0.01 * x


class KWinnersTakeAll(nn.Module):
    """Soft k-winners-take-all: ``x ⊙ soft_topk(x, k, τ)`` over the last dimension.

    Each unit passes its value scaled by its soft membership of the top ``k`` of its layer,
    so about ``k`` units are active per example and the gradient flows through the
    selection too (the closed-form top-k Jacobian).

    Args:
        k: number of winners per example (``0 < k ≤ width``), or a fraction in ``(0, 1)`` of
            the layer width.
        temperature: softness ``τ`` of the selection, in units of the pre-activation.
    """

    def __init__(self, k: float = 0.5, temperature: float = 0.1):
        super().__init__()
        if not (isinstance(k, (int, float)) and k > 0):
            raise ValueError(f"kwta k must be a positive count or a fraction in (0, 1), got {k!r}")
        if not temperature > 0:
            raise ValueError(f"kwta temperature must be > 0, got {temperature!r}")
        self.k = k
        self.temperature = temperature

    def winners(self, width: int) -> float:
        """The budget ``k`` as a count for a layer of ``width`` units."""
        k = self.k * width if self.k < 1 else float(self.k)
        if k > width:
            raise ValueError(f"kwta k={self.k} exceeds the layer width {width}")
        return k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gradkit import soft_topk  # local import: the top-k package imports nothing from here

        return x * soft_topk(x, self.winners(x.shape[-1]), dim=-1, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"k={self.k}, temperature={self.temperature}"


def make_activation(name: str) -> nn.Module:
    """The activation ``h`` named ``name`` (one of :data:`ACTIVATIONS`)."""
    if name == "linear":
        return nn.Identity()
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    if name == "tanh":
        return nn.Tanh()
    if name == "centered_leaky_clip":
        return CenteredLeakyClip()
    if name == "kwta":
        return KWinnersTakeAll()
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}")


def default_gain(activation: str) -> float:
    """Gain that keeps the forward signal's scale: √2 for rectifiers (relu, leaky_relu, kwta
    with half the units winning), 1 otherwise."""
    return math.sqrt(2.0) if activation in ("relu", "leaky_relu", "kwta") else 1.0


class DenseLayer(nn.Module):
    """One layer ``s_i = h(W s_{i-1} + b)`` that knows how to re-draw its own weights.

    ``init="gaussian"`` draws ``W ~ N(0, gain²/fan_in)``; ``init="orthogonal"`` draws a
    (semi-)orthogonal ``W`` scaled by ``gain``. Biases, when present, start at zero.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str = "linear",
        *,
        init: str = "gaussian",
        gain: float = 1.0,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
        if not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0):
            raise ValueError(f"gain must be a finite number > 0, got {gain!r}")
        self.linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
        self.activation = make_activation(activation)
        self.activation_name = activation
        self.init = init
        self.gain = float(gain)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw ``W`` (and zero ``b``) following this layer's init, from ``generator``."""
        weight = self.linear.weight
        fan_in = weight.shape[1]
        draw = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        if self.init == "gaussian":
            weight.copy_(draw * (self.gain / math.sqrt(fan_in)))
        else:
            rows, cols = weight.shape
            # QR of the taller orientation gives orthonormal columns; sign-fix for uniformity.
            q, r = torch.linalg.qr(draw if rows >= cols else draw.T)
            q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
            weight.copy_((q if rows >= cols else q.T) * self.gain)
        if self.linear.bias is not None:
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))

    def extra_repr(self) -> str:
        return f"init={self.init!r}, gain={self.gain:g}"


def make_mlp(
    depth: int,
    width: int,
    activation: str = "linear",
    *,
    init: str = "gaussian",
    gain: float | None = None,
    bias: bool = False,
    seed: int = 0,
    in_features: int | None = None,
    out_features: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """A random MLP of ``depth`` :class:`DenseLayer` s, ``width`` units each.

    Args:
        depth: number of layers ``L`` (≥ 1).
        width: units per layer.
        activation: one of :data:`ACTIVATIONS`.
        init: ``"gaussian"`` (``W ~ N(0, gain²/fan_in)``) or ``"orthogonal"``.
        gain: weight scale; ``None`` picks :func:`default_gain` (√2 for relu, else 1).
        bias: give every layer a bias (initialised to zero).
        seed: seed of the weights; the same seed gives the same network.
        in_features: width of the input ``x`` (default ``width``).
        out_features: width of the last layer (default ``width``), e.g. a classifier's logits.
        dtype: parameter dtype; float64 for exact measurements, float32 for training.

    Returns:
        ``nn.Sequential`` whose items are the layers, so ``net[i]`` is layer ``i+1``.
    """
    if not (isinstance(depth, int) and depth >= 1):
        raise ValueError(f"depth must be an integer ≥ 1, got {depth!r}")
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"width must be an integer ≥ 1, got {width!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    gain = default_gain(activation) if gain is None else gain
    sizes = [in_features or width] + [width] * (depth - 1) + [out_features or width]
    layers = [
        DenseLayer(sizes[i], sizes[i + 1], activation, init=init, gain=gain, bias=bias, dtype=dtype)
        for i in range(depth)
    ]
    net = nn.Sequential(*layers)
    reinitialize(net, seed)
    return net


def reinitialize(layers: Sequence[nn.Module], seed: int) -> None:
    """Re-draw every :class:`DenseLayer` of ``layers`` from one generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    for layer in layers:
        if isinstance(layer, DenseLayer):
            layer.reset_parameters(generator)


def forward_states(layers: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The states ``[s_1, …, s_L]`` of ``layers`` on input ``x = s_0``."""
    states = []
    s = x
    for layer in layers:
        s = layer(s)
        states.append(s)
    return states
