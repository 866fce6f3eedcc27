"""Random deep networks for the alignment lab.

A network is a sequence of layers, layer ``i`` mapping ``s_{i-1}`` to ``s_i = h(s_{i-1}, φ_i)``
with ``s_0 = x``; ``φ_i`` is every trainable parameter of layer ``i``. Any stack of
``nn.Module`` s works with the lab: :func:`group_layers` joins each parameter-free module
(activation, ``Flatten``, pooling, ``Dropout``) to the module with parameters before it, so a
flat ``nn.Sequential(Conv2d, ReLU, Conv2d, ReLU, Flatten, Linear)`` is three layers.
:func:`make_mlp` builds the random MLPs the experiments use, with an explicit initialisation
because framework defaults change the result: with PyTorch's default ``nn.Linear`` init
(variance ``1/(3·fan_in)``) a 20-layer linear net's signal shrinks by ~3× per layer and the
measured alignment collapses to ~0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .. import _checks

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "DenseLayer",
    "KWinnersTakeAll",
    "default_gain",
    "forward_states",
    "group_layers",
    "layer_activation",
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
        _checks.number("kwta k (a count, or a fraction in (0, 1))", above=0)(k)
        _checks.number("kwta temperature", above=0)(temperature)
        self.k, self.temperature = k, temperature

    def winners(self, width: int) -> float:
        """The budget ``k`` as a count for a layer of ``width`` units."""
        k = self.k * width if self.k < 1 else float(self.k)
        if k > width:
            raise ValueError(f"kwta k={self.k:g} exceeds the layer width {width}")
        return k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gradkit import soft_topk  # local import: the top-k package imports nothing from here

        return x * soft_topk(x, self.winners(x.shape[-1]), dim=-1, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"k={self.k}, temperature={self.temperature}"


def make_activation(name: str) -> nn.Module:
    """The activation ``h`` named ``name`` (one of :data:`ACTIVATIONS`)."""
    factories = {
        "linear": nn.Identity,
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(0.01),
        "tanh": nn.Tanh,
        "centered_leaky_clip": CenteredLeakyClip,
        "kwta": KWinnersTakeAll,
    }
    return factories[_checks.choice("activation", ACTIVATIONS)(name)]()


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
        init = _checks.choice("init", INITS)(init)
        gain = _checks.number("gain", above=0)(gain)
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
    device: torch.device | str | None = None,
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
        device: where the parameters live (default: the CPU). The weights are drawn on the
            CPU and then moved, so every device gets the same network.

    Returns:
        ``nn.Sequential`` whose items are the layers, so ``net[i]`` is layer ``i+1``.
    """
    depth = _checks.integer("depth", 1)(depth)
    width = _checks.integer("width", 1)(width)
    activation = _checks.choice("activation", ACTIVATIONS)(activation)
    seed = _checks.integer("seed")(seed)
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if value is not None:
            _checks.integer(name, 1)(value)
    gain = default_gain(activation) if gain is None else gain
    sizes = [in_features or width] + [width] * (depth - 1) + [out_features or width]
    layers = [
        DenseLayer(sizes[i], sizes[i + 1], activation, init=init, gain=gain, bias=bias, dtype=dtype)
        for i in range(depth)
    ]
    net = nn.Sequential(*layers)
    reinitialize(net, seed)  # drawn on the CPU, then moved: the same weights on every device
    return net if device is None else net.to(device)


def reinitialize(layers: Sequence[nn.Module], seed: int) -> None:
    """Re-draw every :class:`DenseLayer` of ``layers`` from one generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    for layer in layers:
        if isinstance(layer, DenseLayer):
            layer.reset_parameters(generator)


def forward_states(layers: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The states ``[s_1, …, s_L]`` of the layers of :func:`group_layers` ``(layers)`` on input
    ``x = s_0``: one state per layer, as the measurements and targets count them."""
    states = []
    s = x
    for layer in group_layers(layers):
        s = layer(s)
        states.append(s)
    return states


# ----------------------------------------------------------------------------- any stack


_GROUPS = (
    "wrap the network as nn.Sequential of (layer, activation) groups, e.g. nn.Sequential("
    "nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), nn.Sequential(nn.Flatten(), "
    "nn.Linear(144, 10))): each group's output is a state s_i with its own loss"
)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _items(layers) -> list:
    if isinstance(layers, (nn.Sequential, nn.ModuleList)):
        return list(layers)
    if isinstance(layers, nn.Module):
        raise TypeError(
            "layers must be a sequence of modules (nn.Sequential, nn.ModuleList or a list), "
            f"got a single {type(layers).__name__}, whose layers the lab cannot see; {_GROUPS}"
        )
    if isinstance(layers, torch.Tensor) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of nn.Module, got {type(layers).__name__}")
    return list(layers)


def group_layers(layers: Sequence[nn.Module]) -> nn.Sequential:
    """The layers ``s_i = h(s_{i-1}, φ_i)`` that the lab sees in a stack of modules.

    Each module with a trainable parameter (one with ``requires_grad``) starts a layer; each
    module without one — an activation, ``Flatten``, pooling, ``Dropout``, or a module whose
    parameters are all frozen — joins the layer before it, so its output is that layer's
    state. Only the top level is grouped: a nested ``nn.Sequential`` (or any module) with
    trainable parameters is one layer as a whole, which is how to put several parameterised
    modules into one layer (e.g. ``Conv2d`` + ``BatchNorm2d``).

    Args:
        layers: an ``nn.Sequential``, ``nn.ModuleList`` or list of modules.

    Returns:
        ``nn.Sequential`` with one item per layer, sharing the given modules (no copies): the
        module itself when it stands alone, else ``nn.Sequential(module, *followers)``.
        Grouping it again returns the same grouping.

    Raises:
        TypeError: ``layers`` is a single module that is not a sequence (e.g. a custom
            ``nn.Module`` with its own ``forward``), or holds something that is not a module.
        ValueError: ``layers`` is empty, or starts with a parameter-free module (there is no
            layer before it to join).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
        ...                     nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 10))
        >>> [len(g) if isinstance(g, nn.Sequential) else 1 for g in group_layers(net)]
        [3, 3, 1]
    """
    groups: list[list[nn.Module]] = []
    for k, module in enumerate(_items(layers)):
        if not isinstance(module, nn.Module):
            raise TypeError(f"layers[{k}] must be an nn.Module, got {type(module).__name__}")
        if _trainable(module):
            groups.append([module])
        elif groups:
            groups[-1].append(module)
        else:
            raise ValueError(
                f"layers[{k}] ({type(module).__name__}) has no trainable parameters and no "
                "layer before it to join (parameter-free modules such as activations, Flatten "
                "or pooling join the module with parameters before them). Apply it to x "
                f"before measuring, or drop it; to choose the layers yourself, {_GROUPS}"
            )
    if not groups:
        raise ValueError("layers must contain at least one layer, got an empty sequence")
    return nn.Sequential(*(g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups))


def layer_activation(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(body, h)`` of one layer of :func:`group_layers`: ``layer(a) = h(body(a))``.

    ``h`` is the layer's parameter-free tail: a :class:`DenseLayer`'s activation; for an
    ``nn.Sequential`` the modules after its last one with parameters; else ``nn.Identity``
    (a module's own internal nonlinearity cannot be seen from outside).
    """
    if isinstance(layer, DenseLayer):
        return layer.linear, layer.activation
    if isinstance(layer, nn.Sequential):
        items = list(layer)
        last = max((k for k, m in enumerate(items) if _trainable(m)), default=-1)
        if 0 <= last < len(items) - 1:
            return nn.Sequential(*items[: last + 1]), nn.Sequential(*items[last + 1 :])
    return layer, nn.Identity()


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule, children before their parent (siblings in order)."""
    for child in module.children():
        yield from _post_order(child)
    yield module


def _reset(module: nn.Module, seed: int) -> None:
    """``reset_parameters()`` on every submodule that has one, children first (a parent's own
    reset — e.g. :class:`DenseLayer`'s init — wins), from the seeded CPU generators."""
    covered: set[int] = set()
    generator = torch.Generator().manual_seed(int(seed))  # DenseLayers, in forward order
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))  # the default inits of torch.nn modules
        for sub in _post_order(module):
            if isinstance(sub, DenseLayer):
                sub.reset_parameters(generator)
            elif callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
            else:
                continue
            covered.update(id(p) for p in sub.parameters())
    for name, p in module.named_parameters():
        if p.requires_grad and id(p) not in covered:
            raise TypeError(
                f"cannot re-initialise parameter {name!r}: no module holding it has "
                "reset_parameters(); give that module one, or use other targets"
            )


def reinitialized_copy(layers: Sequence[nn.Module], seed: int) -> nn.Sequential:
    """An independent copy of :func:`group_layers` ``(layers)`` with fresh parameters.

    Every submodule with ``reset_parameters()`` is reset (:class:`DenseLayer` s from one
    generator seeded by ``seed``, in order, as :func:`reinitialize`; other modules from the
    global RNG seeded by ``seed`` inside a forked RNG state, so the caller's RNG is untouched).
    The reset runs on a CPU copy, then the copy is moved back to the original device: the
    same teacher on every device. A trainable parameter that no module can reset
    is a ``TypeError``.
    """
    grouped = group_layers(layers)
    devices = {t.device for t in [*grouped.parameters(), *grouped.buffers()]}
    copied = copy.deepcopy(grouped)
    if len(devices) == 1:
        (device,) = devices
        _reset(copied.to("cpu"), seed)
        return copied.to(device)
    _reset(copied, seed)  # parameters on several devices: reset in place
    return copied
