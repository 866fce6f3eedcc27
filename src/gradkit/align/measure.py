"""Exact gradient-alignment measurements in one reverse sweep.

Notation (the gist "Why Alignment?"): layer ``i`` maps ``s_{i-1} → s_i = h(s_{i-1}, φ_i)``
(``s_{-1} = x``, 0-based here), the losses are ``ℓ_j = ‖s_j − s_j*‖²`` summed over batch and
units, ``g_ij = ∂ℓ_j/∂φ_i`` (zero for ``j < i``) and ``L = Σ_j ℓ_j``. For layer ``i``:

* local gradient ``g_ii``; distant gradients ``g_ij`` (``j > i``) and their sum
  ``d_i = Σ_{j>i} g_ij``; global gradient ``∂L/∂φ_i = g_ii + d_i``.
* ``cos(a, b) = ⟨a, b⟩ / (‖a‖‖b‖)`` over all of ``φ_i`` flattened (weights and biases
  concatenated). A zero vector has no direction: any cosine involving one is **NaN**. So the
  diagonal ``S[i, i]`` is 1 unless ``g_ii = 0`` (then NaN).

How it is fast — one reverse sweep, no per-loss backward passes
----------------------------------------------------------------
Going from the last layer to the first, the sweep carries a *stack* of cotangents of
``s_i``, one per loss ``j ≥ i`` (``c_ij = ∂ℓ_j/∂s_i``); at layer ``i`` the new loss's
cotangent ``2(s_i − s_i*)`` is pushed on top, and the whole stack goes through the layer in
one batched vector-Jacobian product. That replaces ``L`` backward passes (``L²/2`` layer
backwards, each with a weight gradient) by ``L²/2`` stacked cotangent products done as
``L`` large matrix products, and never forms the ``L²/2`` weight gradients:

* **dense path** (:class:`~gradkit.align.networks.DenseLayer` and ``nn.Linear``: ``s = h(W a +
  b)``). With ``δ_j = ∂ℓ_j/∂z`` (``B × n_out``, ``z`` the pre-activation) and
  ``Ã = [a, 1]`` (``B × (n_in + 1)``, the ``1`` column only with a bias), the gradient is
  ``g_j = δ_jᵀ Ã`` and inner products only need the Gram matrix ``K = Ã Ãᵀ``:
  ``⟨g_j, g_k⟩ = Σ_{bb'} K_{bb'} (δ_j δ_kᵀ)_{bb'}``. We factor ``K = F Fᵀ`` with
  ``F = Ã`` when ``n_in + 1 ≤ B`` and ``F = Rᵀ`` from ``Ãᵀ = QR`` otherwise, and use the
  *compressed gradient* ``δ_jᵀ F`` (``n_out × min(B, n_in + 1)``): it has the same inner
  products as ``g_j`` — also row by row, ``⟨g_j[o], g_k[o]⟩ = δ_j[:, o]ᵀ K δ_k[:, o]`` —
  at a fraction of the size. Elementwise activations multiply by ``h'(z)``; ``kwta`` uses the
  closed-form soft top-k Jacobian; any other activation goes through autograd on the
  activation alone (:func:`_batched_vjp`).
* **convolution path** (``nn.Conv1d/2d/3d``, alone or followed by parameter-free modules;
  :mod:`gradkit.align._conv`): the ``N`` weight gradients are one weight-gradient convolution
  with the cotangents stacked along the output channels, the ``N`` input cotangents one
  transposed convolution with them folded into the batch.
* **generic path** (any other ``nn.Module``): ``torch.autograd.grad(..., is_grads_batched=
  True)`` on the layer alone gives the stacked parameter gradients and input cotangents
  (one call per cotangent if a custom autograd Function in the layer cannot be vmapped).

Layers are the groups of :func:`~gradkit.align.networks.group_layers`: a flat
``nn.Sequential(Conv2d, ReLU, …, Flatten, Linear)`` is measured layer by layer, each
parameter-free module in the layer before it. Everything runs on the device of the network
and inputs (float64 on a GPU too); the results come back as CPU float64 tensors.

All paths equal :func:`~gradkit.align.reference.alignment_report_naive` (one
``autograd.grad`` per loss, flattened gradients, explicit cosines) to float64 rounding; the
tests check that.

Per-row variant: the authors' follow-up code also averages the cosine over the rows of the
weight matrix. Rows are output units: row ``o`` concatenates slice ``[o]`` of every parameter
whose leading size equals the layer's row count ``R`` (the leading size of its first
parameter with ≥ 2 dimensions; for ``Linear`` row ``o`` is ``[W[o, :], b[o]]``). Parameters
of another leading size (or 0-d) belong to no row and are left out of this variant; a layer
with no ≥ 2-d parameter counts as a single row. Rows whose cosine is undefined (a zero row —
e.g. a dead relu unit) are left out of the mean; the mean of no rows is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import _checks
from ..topk._solve import soft_topk_vjp
from ._conv import conv_input_cotangents, conv_param_rows, is_plain_conv
from .networks import CenteredLeakyClip, DenseLayer, KWinnersTakeAll, group_layers

__all__ = ["REPORT_KEYS", "alignment_matrix", "alignment_report"]

REPORT_KEYS = (
    "matrix",
    "grad_norms",
    "local_global_cosine",
    "local_distant_cosine",
    "local_distant_cosine_per_row",
    "local_norm",
    "distant_norm",
    "global_norm",
    "random_baseline",
    "num_params",
)

METHODS = ("auto", "dense", "generic")

# Activations of DenseLayer that act elementwise: their vjp is a product with h'(z).
_ELEMENTWISE = ("linear", "relu", "leaky_relu", "tanh", "centered_leaky_clip")
# Modules that act elementwise (their vjp is a product with h'(z)) when they follow nn.Linear.
_ELEMENTWISE_MODULES = (
    nn.Identity,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.Hardtanh,
    CenteredLeakyClip,
)


# ----------------------------------------------------------------------------- input checks


def _check_tensor(name: str, t, device: torch.device) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_describe(t)}")
    if t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but layers[0]'s parameters are on {device}; move it "
            f"there ({name.split('[')[0]}.to(device))"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite (it contains NaN or inf)")


def _describe(value) -> str:
    return f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__


def _layer_params(layers: nn.Sequential) -> list[list[nn.Parameter]]:
    """``φ_i`` of each grouped layer; every parameter finite and in one layer only."""
    params, owner = [], {}
    for i, layer in enumerate(layers):
        phi = [p for p in layer.parameters() if p.requires_grad]
        for p in phi:
            if id(p) in owner:
                raise ValueError(
                    f"layers[{owner[id(p)]}] and layers[{i}] share a parameter; the lab "
                    "needs each layer's φ_i to be its own"
                )
            owner[id(p)] = i
            if not torch.isfinite(p.detach()).all():
                raise ValueError(f"layers[{i}] has a non-finite parameter (NaN or inf)")
        params.append(phi)
    return params


def _check_inputs(
    layers: Sequence[nn.Module], x: Tensor, targets: Sequence[Tensor]
) -> tuple[nn.Sequential, list[list[nn.Parameter]]]:
    """The grouped layers (:func:`~gradkit.align.networks.group_layers`) and their ``φ_i``."""
    layers = group_layers(layers)
    params = _layer_params(layers)
    first = params[0][0]
    _check_tensor("x", x, first.device)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a batch dimension of size ≥ 1, got shape {tuple(x.shape)}")
    if x.dtype != first.dtype:
        raise TypeError(
            f"x has dtype {x.dtype} but layers[0]'s parameters are {first.dtype}; "
            "cast one of them (e.g. x.to(dtype))"
        )
    if isinstance(targets, Tensor) or not isinstance(targets, Sequence):
        raise TypeError("targets must be a list of L tensors, one per layer")
    if len(targets) != len(layers):
        raise ValueError(
            f"targets must hold one tensor per layer: got {len(targets)} targets for "
            f"{len(layers)} layers (parameter-free modules join the layer before them: "
            "see gradkit.align.group_layers)"
        )
    for j, t in enumerate(targets):
        _check_tensor(f"targets[{j}]", t, first.device)
    return layers, params


def _check_target_shapes(states: Sequence[Tensor], targets: Sequence[Tensor]) -> list[Tensor]:
    out = []
    for j, (s, t) in enumerate(zip(states, targets, strict=True)):
        if t.shape != s.shape:
            raise ValueError(
                f"targets[{j}] must have the shape of layer {j}'s output {tuple(s.shape)}, "
                f"got {tuple(t.shape)}"
            )
        out.append(t.detach().to(dtype=s.dtype, device=s.device))
    return out


def _check_method(method: str) -> None:
    _checks.choice("method", METHODS)(method)


# ----------------------------------------------------------------------------- row layout


def _row_count(shapes: Sequence[torch.Size]) -> int | None:
    """The layer's number of rows ``R``: leading size of its first ≥ 2-d parameter."""
    for shape in shapes:
        if len(shape) >= 2:
            return int(shape[0])
    return None


def _row_layout(grads: Sequence[Tensor], shapes: Sequence[torch.Size]) -> tuple[Tensor, Tensor]:
    """Stacked gradients ``(N, *shape)`` per parameter → ``rows (N, R, c)``, ``rest (N, c')``.

    ``rows[:, o]`` concatenates slice ``[o]`` of every parameter of leading size ``R``;
    ``rest`` holds the other parameters flattened (empty if none).
    """
    n = grads[0].shape[0]
    rows_count = _row_count(shapes)
    in_rows, in_rest = [], []
    for g, shape in zip(grads, shapes, strict=True):
        if rows_count is not None and len(shape) >= 1 and shape[0] == rows_count:
            in_rows.append(g.reshape(n, rows_count, -1))
        else:
            in_rest.append(g.reshape(n, -1))
    if rows_count is None:  # no matrix parameter: the whole layer is one row
        return torch.cat(in_rest, dim=1).unsqueeze(1), grads[0].new_zeros(n, 0)
    rest = torch.cat(in_rest, dim=1) if in_rest else grads[0].new_zeros(n, 0)
    return torch.cat(in_rows, dim=2), rest


class _Grads:
    """A stack of ``N`` gradients of one layer: ``rows (N, c, R)`` (column ``k`` of row ``o`` at
    ``[:, k, o]``) and ``rest (N, c')``, the parameters that belong to no row. The dense
    path's rows are compressed (fewer columns, same inner products, also row by row), the
    generic path's are the gradients themselves."""

    __slots__ = ("rest", "rows")

    def __init__(self, rows: Tensor, rest: Tensor):
        self.rows, self.rest = rows, rest

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index) -> _Grads:
        return _Grads(self.rows[index], self.rest[index])

    def sum(self) -> _Grads:
        """The sum of the stack (one gradient)."""
        return _Grads(self.rows.sum(0), self.rest.sum(0))

    def __add__(self, other: _Grads) -> _Grads:
        return _Grads(self.rows + other.rows, self.rest + other.rest)


def _inner(a: _Grads, b: _Grads) -> Tensor:
    """``⟨a, b_n⟩`` for each gradient ``b_n`` of the stack ``b`` (``a`` one gradient), or
    ``⟨a, b⟩`` when ``b`` is one gradient too."""
    if b.rows.ndim == a.rows.ndim:
        return torch.dot(a.rows.reshape(-1), b.rows.reshape(-1)) + torch.dot(a.rest, b.rest)
    stack = b.rows.reshape(len(b), -1)
    return stack @ a.rows.reshape(-1) + b.rest @ a.rest


def _sq_norm(b: _Grads) -> Tensor:
    """``‖b_n‖²`` of each gradient of the stack ``b`` (or ``‖b‖²`` of one gradient)."""
    if b.rows.ndim == 2:
        return _inner(b, b)
    # vector_norm reads the stack once, without a temporary (3× faster than Σ b² here).
    rows = torch.linalg.vector_norm(b.rows.reshape(len(b), -1), dim=1).square()
    return rows + torch.linalg.vector_norm(b.rest, dim=1).square()


def _row_inner(a: _Grads, b: _Grads) -> Tensor:
    """Row-by-row inner products ``⟨a[o], b[o]⟩`` of two single gradients, shape ``(R,)``."""
    return torch.einsum("kr,kr->r", a.rows, b.rows)


# ----------------------------------------------------------------------------- layer backends


class _NotDense(Exception):
    """A layer that looked dense but is not (its activation changes the shape)."""


class _DenseBackend:
    """``s = h(W a + b)``: analytic weight-gradient Gram, ``h'`` or a batched activation vjp."""

    def __init__(
        self, linear: nn.Linear, activation: nn.Module | None, elementwise: bool, a: Tensor
    ):
        weight = linear.weight.detach()
        bias = linear.bias
        self.weight = weight
        self.in_shape = a.shape
        a2 = a.detach().reshape(-1, weight.shape[1])
        z = torch.nn.functional.linear(a2, weight, None if bias is None else bias.detach())
        self.a = a2
        self.has_bias = bias is not None
        self.num_params = weight.numel() + (bias.numel() if bias is not None else 0)
        self.rows = weight.shape[0]
        self.derivative = None
        self.activation = None
        self.kwta = None
        if activation is None or isinstance(activation, nn.Identity):
            s = z
        elif elementwise:
            # h'(z) from autograd itself, so kinks (relu at 0, clip edges) match autograd's
            # convention exactly; valid because h acts elementwise.
            with torch.enable_grad():
                zr = z.detach().requires_grad_(True)
                out = activation(zr)
                (self.derivative,) = torch.autograd.grad(out, zr, torch.ones_like(out))
            s = out.detach()
        elif isinstance(activation, KWinnersTakeAll):
            # kwta(z) = z ⊙ p, p = soft_topk(z, k, τ), whose Jacobian is the closed form
            # (diag(v) − v vᵀ/Σv)/τ with v = p(1 − p): the N vjps are a few array operations.
            from gradkit import soft_topk  # the top-k package imports nothing from here

            k = activation.winners(z.shape[-1])
            self.kwta = (
                z,
                soft_topk(z, k, dim=-1, temperature=activation.temperature),
                activation.temperature,
            )
            s = z * self.kwta[1]  # = activation(z), without a second solve
        else:
            # Any other activation: keep its graph, take the N vjps in backward.
            with torch.enable_grad():
                zr = z.detach().requires_grad_(True)
                out = activation(zr)
            self.activation = (zr, out)
            s = out.detach()
        if s.shape != z.shape:
            raise _NotDense  # an activation that changes the shape (e.g. pooling)
        self.output = s.reshape(*a.shape[:-1], weight.shape[0])
        self._factor: Tensor | None = None

    def factor(self) -> Tensor:
        """``F`` with ``F Fᵀ = Ã Ãᵀ``, ``min(B, n_in + 1)`` columns."""
        if self._factor is None:
            a = self.a
            if self.has_bias:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
            if a.shape[1] <= a.shape[0]:
                self._factor = a
            else:
                # Ãᵀ = QR ⇒ Ã Ãᵀ = Rᵀ R: R is B × B, smaller than Ã when n_in + 1 > B.
                self._factor = torch.linalg.qr(a.T, mode="r")[1].T
        return self._factor

    def backward(self, stack: Tensor, reserve: int) -> tuple[_Grads, Tensor | None]:
        """Gradients of the stacked cotangents of ``s`` and, when ``reserve > 0``, a buffer
        ``(reserve + N, *a.shape)`` whose rows ``reserve:`` are the cotangents of ``a`` (the
        first ``reserve`` rows are left for the caller's next seeds; no concatenation)."""
        n = stack.shape[0]
        cot = stack.reshape(n, -1, self.rows)  # (N, B, n_out)
        if self.derivative is not None:
            delta = cot * self.derivative
        elif self.kwta is not None:
            z, p, temperature = self.kwta
            # d(z ⊙ p) = dz ⊙ p + z ⊙ dp: the cotangent of p is cot ⊙ z, pulled back through
            # soft_topk's own closed-form vjp, broadcast over the N stacked cotangents
            # (saturated rows pass no gradient through the selection there too).
            through_p, _ = soft_topk_vjp(cot * z, p, temperature)
            delta = cot * p + through_p
        elif self.activation is not None:
            zr, out = self.activation
            (delta,) = _batched_vjp(out, [zr], cot)
        else:
            delta = cot
        # Compressed gradients Fᵀ δ_j: (N, r, n_out), row o of g_j ↔ column o.
        compressed = torch.matmul(self.factor().T, delta)
        grads = _Grads(compressed, compressed.new_zeros(n, 0))
        if not reserve:
            return grads, None
        buffer = stack.new_empty(reserve + n, *self.in_shape)
        n_in = self.weight.shape[1]
        torch.mm(delta.reshape(-1, self.rows), self.weight, out=buffer[reserve:].view(-1, n_in))
        return grads, buffer


class _ConvBackend:
    """``s = h(conv(a) + b)`` for a plain convolution (:mod:`._conv`): two convolutions carry
    all ``N`` cotangents; the parameter-free tail ``h`` by ``h'`` or a batched vjp."""

    def __init__(self, conv: nn.Module, tail: nn.Module | None, a: Tensor):
        self.conv = conv
        self.a = a.detach()
        self.num_params = sum(p.numel() for p in conv.parameters())
        z = conv(self.a)
        self.derivative = self.tail = None
        if tail is None:
            self.output = z
            return
        with torch.enable_grad():
            zr = z.detach().requires_grad_(True)
            out = tail(zr)
            if _elementwise(tail):  # h'(z) once, as on the dense path
                (self.derivative,) = torch.autograd.grad(out, zr, torch.ones_like(out))
            else:
                self.tail = (zr, out)
        self.output = out.detach()

    def backward(self, stack: Tensor, reserve: int) -> tuple[_Grads, Tensor | None]:
        """As :meth:`_DenseBackend.backward`."""
        if self.derivative is not None:
            delta = stack * self.derivative
        elif self.tail is not None:
            (delta,) = _batched_vjp(self.tail[1], [self.tail[0]], stack)
        else:
            delta = stack
        with torch.no_grad():
            rows = conv_param_rows(self.conv, self.a, delta)
            grads = _Grads(rows, rows.new_zeros(len(rows), 0))
            if not reserve:
                return grads, None
            cot = conv_input_cotangents(self.conv, self.a.shape, delta)
        return grads, torch.cat([cot.new_empty(reserve, *cot.shape[1:]), cot])


class _GenericBackend:
    """Any module: batched autograd vjp of the layer alone (``is_grads_batched``)."""

    def __init__(self, layer: nn.Module, params: list[nn.Parameter], a: Tensor, need_input: bool):
        self.params = params
        self.shapes = [p.shape for p in params]
        self.num_params = sum(p.numel() for p in params)
        with torch.enable_grad():
            self.input = a.detach().requires_grad_(need_input)
            out = layer(self.input)
        if not isinstance(out, Tensor):
            raise TypeError(f"each layer must return a tensor, got {type(out).__name__}")
        self.graph_output = out
        self.output = out.detach()

    def backward(self, stack: Tensor, reserve: int) -> tuple[_Grads, Tensor | None]:
        """As :meth:`_DenseBackend.backward`, by one batched autograd call."""
        need_input = reserve > 0
        inputs = ([self.input] if need_input else []) + self.params
        grads = _batched_vjp(self.graph_output, inputs, stack)
        grads = [
            torch.zeros(stack.shape[0], *t.shape, dtype=stack.dtype, device=stack.device)
            if g is None
            else g
            for g, t in zip(grads, inputs, strict=True)
        ]
        param_grads = grads[1:] if need_input else grads
        rows, rest = _row_layout(param_grads, self.shapes)
        grads_out = _Grads(rows.transpose(1, 2).contiguous(), rest)
        if not need_input:
            return grads_out, None
        cot_in = grads[0]
        return grads_out, torch.cat([cot_in.new_empty(reserve, *cot_in.shape[1:]), cot_in])


def _batched_vjp(
    output: Tensor, inputs: Sequence[Tensor], cotangents: Tensor
) -> tuple[Tensor | None, ...]:
    """``∂⟨output, c_n⟩/∂inputs`` for each cotangent ``c_n`` of the stack ``cotangents``.

    One ``autograd.grad(..., is_grads_batched=True)`` call (the backward under vmap). An
    autograd Function whose backward has no vmap support makes that raise; then it is one
    call per cotangent — slower, same numbers.
    """
    try:
        return torch.autograd.grad(
            output,
            inputs,
            cotangents,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
    except RuntimeError:
        per_cotangent = [
            torch.autograd.grad(output, inputs, c, retain_graph=True, allow_unused=True)
            for c in cotangents
        ]
        return tuple(
            None if parts[0] is None else torch.stack(parts)
            for parts in zip(*per_cotangent, strict=True)
        )


def _elementwise(module: nn.Module) -> bool:
    if isinstance(module, nn.Sequential):
        return all(_elementwise(m) for m in module)
    return isinstance(module, _ELEMENTWISE_MODULES)


def _dense_parts(layer: nn.Module) -> tuple[nn.Linear, nn.Module | None, bool] | None:
    """``(linear, activation, elementwise)`` when ``layer`` is ``h(W a + b)``, else ``None``:
    a :class:`DenseLayer`, an ``nn.Linear``, or an ``nn.Sequential(nn.Linear, *tail)`` whose
    tail has no parameters (a group of :func:`~gradkit.align.networks.group_layers`)."""
    if isinstance(layer, DenseLayer):
        return layer.linear, layer.activation, layer.activation_name in _ELEMENTWISE
    if isinstance(layer, nn.Linear):
        return layer, None, True
    if isinstance(layer, nn.Sequential) and len(layer) > 1 and isinstance(layer[0], nn.Linear):
        tail = layer[1] if len(layer) == 2 else nn.Sequential(*list(layer)[1:])
        if not any(True for _ in tail.parameters()):
            return layer[0], tail, _elementwise(tail)
    return None


def _conv_parts(layer: nn.Module, a: Tensor) -> tuple[nn.Module, nn.Module | None] | None:
    """``(conv, tail)`` when ``layer`` is a plain convolution (:func:`._conv.is_plain_conv`)
    on a batched input, alone or followed by parameter-free modules; else ``None``."""
    conv, tail = layer, None
    if isinstance(layer, nn.Sequential) and len(layer) > 1:
        conv = layer[0]
        tail = layer[1] if len(layer) == 2 else nn.Sequential(*list(layer)[1:])
        if any(True for _ in tail.parameters()):
            return None
    if is_plain_conv(conv) and a.ndim == conv.weight.ndim:
        return conv, tail
    return None


def _make_backend(layer, params, a, need_input, method):
    conv = _conv_parts(layer, a) if method == "auto" else None
    if conv is not None:
        return _ConvBackend(*conv, a)
    parts = _dense_parts(layer) if method != "generic" else None
    if parts is not None and all(p.requires_grad for p in parts[0].parameters()):
        # A non-elementwise tail sees the pre-activation flattened to (rows, n_out): only
        # valid for 2-d inputs, and only if it keeps the shape.
        linear, activation, elementwise = parts
        if elementwise or a.ndim == 2:
            try:
                return _DenseBackend(linear, activation, elementwise, a)
            except _NotDense:
                pass
    if method == "dense":
        raise ValueError(
            "method='dense' needs layers of the form h(W a + b) (DenseLayer, nn.Linear, or "
            f"nn.Linear followed by a shape-keeping activation), got {type(layer).__name__}"
        )
    return _GenericBackend(layer, params, a, need_input)


# ----------------------------------------------------------------------------- the sweep


def _reverse_sweep(
    layers: list[nn.Module],
    params: list[list[nn.Parameter]],
    x: Tensor,
    targets: Sequence[Tensor],
    seeds: Callable[[Tensor, Tensor], Tensor],
    consume: Callable[[int, _Grads, int], None],
    method: str,
) -> None:
    """Run the forward pass, then one reverse sweep with a stack of cotangents.

    ``seeds(s_j, s_j*)`` gives the ``C`` cotangent channels ``(C, *s_j.shape)`` of loss ``j``
    at ``s_j``. At layer ``i`` the stack holds ``(L − i)·C`` cotangents of ``s_i`` ordered
    ``(j, channel)`` with ``j = i..L−1``; ``consume(i, grads, P_i)`` receives the stacked
    gradients of ``φ_i`` in the same order. ``layers``/``params`` come from
    :func:`_check_inputs`.
    """
    backends, a = [], x.detach()
    with torch.no_grad():
        for i, layer in enumerate(layers):
            backend = _make_backend(layer, params[i], a, i > 0, method)
            backends.append(backend)
            a = backend.output
    targets = _check_target_shapes([b.output for b in backends], targets)
    last = len(layers) - 1
    with torch.no_grad():
        stack = seeds(backends[last].output, targets[last])
        channels = stack.shape[0]
        for i in reversed(range(len(layers))):
            grads, below = backends[i].backward(stack, reserve=channels if i > 0 else 0)
            consume(i, grads, backends[i].num_params)
            backends[i] = None  # free this layer's activations early
            if i > 0:
                below[:channels] = seeds(backends[i - 1].output, targets[i - 1])
                stack = below


def _full_seed(s: Tensor, target: Tensor) -> Tensor:
    """``∂ℓ/∂s = 2(s − s*)`` for ``ℓ = ‖s − s*‖²``, one channel."""
    return (2 * (s - target)).unsqueeze(0)


def _cosine(dot: Tensor, sq_a: Tensor, sq_b: Tensor) -> Tensor:
    """``dot / √(sq_a sq_b)`` clamped to [−1, 1]; NaN where either norm is zero."""
    denom = torch.sqrt(sq_a * sq_b)
    cos = (dot / torch.where(denom > 0, denom, torch.ones_like(denom))).clamp(-1.0, 1.0)
    return torch.where(denom > 0, cos, torch.full_like(cos, math.nan))


# ----------------------------------------------------------------------------- public API


def alignment_report(
    layers: Sequence[nn.Module],
    x: Tensor,
    targets: Sequence[Tensor],
    *,
    method: str = "auto",
) -> dict[str, Tensor]:
    """Every alignment measurement of one network, batch and set of targets.

    Args:
        layers: any stack of modules (``nn.Sequential``, ``nn.ModuleList``, list), grouped
            into layers by :func:`~gradkit.align.networks.group_layers`; layer ``i`` maps
            ``s_{i-1} → s_i`` (``s_{-1} = x``) and ``φ_i`` is its parameters that require
            grad.
        x: the input batch ``s_{-1}``, on the network's device and in its dtype.
        targets: ``[s_0*, …, s_{L−1}*]``, one per layer, each shaped like its output.
        method: ``"auto"`` (dense path for ``h(W a + b)`` layers, convolution path for
            plain convolutions, generic path for the rest), ``"dense"`` (error for other
            layers) or ``"generic"`` (batched autograd for every layer). All give the same
            numbers.

    Returns:
        float64 CPU tensors keyed by :data:`REPORT_KEYS`:

        * ``matrix`` ``(L, L)``: ``S[i, j] = cos(g_ii, g_ij)`` for ``j ≥ i``, NaN below;
        * ``grad_norms`` ``(L, L)``: ``‖g_ij‖`` for ``j ≥ i``, NaN below;
        * ``local_global_cosine`` ``(L,)``: ``cos(g_ii, ∂L/∂φ_i)``;
        * ``local_distant_cosine`` ``(L,)``: ``cos(g_ii, d_i)``, ``d_i = Σ_{j>i} g_ij`` (NaN
          for the last layer, which has no distant loss);
        * ``local_distant_cosine_per_row`` ``(L,)``: mean over rows (module docstring) of
          the row-wise ``cos(g_ii[o], d_i[o])``;
        * ``local_norm``, ``distant_norm``, ``global_norm`` ``(L,)``: ``‖g_ii‖``, ``‖d_i‖``,
          ``‖∂L/∂φ_i‖``;
        * ``random_baseline`` ``(L,)``: ``1/√P_i``, the typical ``|cos|`` of two random
          directions in ``P_i`` dimensions;
        * ``num_params`` ``(L,)``: ``P_i``.

    Cosines with a zero vector are NaN (module docstring).
    """
    _check_method(method)
    layers, params = _check_inputs(layers, x, targets)
    acc = _report_accumulators(len(layers), x.device)
    _reverse_sweep(layers, params, x, targets, _full_seed, _report_consumer(acc), method)
    return _finish_report({key: value.cpu() for key, value in acc.items()})


def _report_accumulators(n: int, device: torch.device) -> dict[str, Tensor]:
    """float64 buffers on the measurement's device, filled layer by layer (no sync)."""

    def full(*shape: int, fill: float = math.nan) -> Tensor:
        return torch.full(shape, fill, dtype=torch.float64, device=device)

    return {
        "cross": full(n, n),  # ⟨g_ii, g_ij⟩
        "sq": full(n, n),  # ‖g_ij‖²
        "num_params": full(n),
        "dot_local_distant": full(n, fill=0.0),  # ⟨g_ii, d_i⟩
        "sq_distant": full(n, fill=0.0),  # ‖d_i‖²
        "per_row": full(n),
    }


def _report_consumer(acc: dict[str, Tensor]) -> Callable[[int, _Grads, int], None]:
    def consume(i: int, grads: _Grads, num_params: int) -> None:
        local = grads[0]
        acc["cross"][i, i:] = _inner(local, grads)
        acc["sq"][i, i:] = _sq_norm(grads)
        acc["num_params"][i] = num_params
        if len(grads) > 1:
            distant = grads[1:].sum()
            acc["dot_local_distant"][i] = _inner(local, distant)
            acc["sq_distant"][i] = _sq_norm(distant)
            rows_cos = _cosine(
                _row_inner(local, distant).double(),
                _row_inner(local, local).double(),
                _row_inner(distant, distant).double(),
            )
            acc["per_row"][i] = rows_cos.nanmean()  # NaN when no row is defined

    return consume


def _finish_report(acc: dict[str, Tensor]) -> dict[str, Tensor]:
    """The report's cosines and norms from the accumulated inner products (on the CPU)."""
    nan = math.nan
    n = acc["sq"].shape[0]
    upper = torch.ones(n, n, dtype=torch.bool).triu()
    sq, sq_local = acc["sq"], acc["sq"].diagonal()
    matrix = _cosine(acc["cross"], sq_local.unsqueeze(1), sq)
    # S[i, i] is 1 by definition when g_ii ≠ 0 (computed it is 1 ± rounding).
    matrix.diagonal().copy_(torch.where(sq_local > 0, 1.0, nan))
    has_distant = torch.arange(n) < n - 1
    dot, sq_distant = acc["dot_local_distant"], acc["sq_distant"]
    sq_global = sq_local + 2 * dot + sq_distant
    return {
        "matrix": torch.where(upper, matrix, nan),
        "grad_norms": torch.where(upper, sq.sqrt(), nan),
        "local_global_cosine": _cosine(sq_local + dot, sq_local, sq_global),
        "local_distant_cosine": torch.where(has_distant, _cosine(dot, sq_local, sq_distant), nan),
        "local_distant_cosine_per_row": torch.where(has_distant, acc["per_row"], nan),
        "local_norm": sq_local.sqrt(),
        "distant_norm": torch.where(has_distant, sq_distant.sqrt(), nan),
        "global_norm": sq_global.clamp_min(0).sqrt(),
        "random_baseline": acc["num_params"].rsqrt(),
        "num_params": acc["num_params"],
    }


def alignment_matrix(
    layers: Sequence[nn.Module], x: Tensor, targets: Sequence[Tensor], *, method: str = "auto"
) -> Tensor:
    """``S[i, j] = cos(∂ℓ_i/∂φ_i, ∂ℓ_j/∂φ_i)`` for ``j ≥ i`` (NaN below), float64 ``(L, L)``.

    See :func:`alignment_report` for the arguments; this is its ``"matrix"``.
    """
    return alignment_report(layers, x, targets, method=method)["matrix"]
