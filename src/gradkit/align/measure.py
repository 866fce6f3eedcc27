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
* **generic path** (any other ``nn.Module``): ``torch.autograd.grad(..., is_grads_batched=
  True)`` on the layer alone gives the stacked parameter gradients and input cotangents
  (one call per cotangent if a custom autograd Function in the layer cannot be vmapped).

Both paths equal :func:`alignment_report_naive` (one ``autograd.grad`` per loss, flattened
gradients, explicit cosines) to float64 rounding; the tests check that.

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

from ..topk._solve import soft_topk_vjp
from .networks import DenseLayer, KWinnersTakeAll, forward_states

__all__ = [
    "REPORT_KEYS",
    "alignment_matrix",
    "alignment_matrix_naive",
    "alignment_report",
    "alignment_report_naive",
    "per_loss_gradients",
]

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


# ----------------------------------------------------------------------------- input checks


def _check_inputs(
    layers: Sequence[nn.Module], x: Tensor, targets: Sequence[Tensor]
) -> tuple[list[nn.Module], list[list[nn.Parameter]]]:
    if isinstance(layers, nn.Module) and not isinstance(layers, (nn.Sequential, nn.ModuleList)):
        raise TypeError(
            "layers must be a sequence of nn.Module (e.g. nn.Sequential), got a single "
            f"{type(layers).__name__}"
        )
    layers = list(layers)
    if not layers:
        raise ValueError("layers must contain at least one layer, got an empty sequence")
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layers[{i}] must be an nn.Module, got {type(layer).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a batch dimension of size ≥ 1, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite (it contains NaN or inf)")
    if isinstance(targets, Tensor) or not isinstance(targets, Sequence):
        raise TypeError("targets must be a list of L tensors, one per layer")
    if len(targets) != len(layers):
        raise ValueError(
            f"targets must hold one tensor per layer: got {len(targets)} targets "
            f"for {len(layers)} layers"
        )
    params = []
    for i, layer in enumerate(layers):
        phi = [p for p in layer.parameters() if p.requires_grad]
        if not phi:
            raise ValueError(f"layers[{i}] has no trainable parameters (φ_{i} is empty)")
        for p in phi:
            if not torch.isfinite(p.detach()).all():
                raise ValueError(f"layers[{i}] has a non-finite parameter (NaN or inf)")
        params.append(phi)
    first_dtype = params[0][0].dtype
    if x.dtype != first_dtype:
        raise TypeError(
            f"x has dtype {x.dtype} but layers[0]'s parameters are {first_dtype}; "
            "cast one of them (e.g. x.to(dtype))"
        )
    for j, t in enumerate(targets):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"targets[{j}] must be a floating-point tensor, got {type(t).__name__}")
        if not torch.isfinite(t).all():
            raise ValueError(f"targets[{j}] must be finite (it contains NaN or inf)")
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
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")


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


def _dense_parts(layer: nn.Module) -> tuple[nn.Linear, nn.Module | None, bool] | None:
    """``(linear, activation, elementwise)`` when ``layer`` is ``h(W a + b)``, else ``None``."""
    if isinstance(layer, DenseLayer):
        return layer.linear, layer.activation, layer.activation_name in _ELEMENTWISE
    if isinstance(layer, nn.Linear):
        return layer, None, True
    return None


def _make_backend(layer, params, a, need_input, method):
    parts = _dense_parts(layer) if method != "generic" else None
    if parts is not None and all(p.requires_grad for p in parts[0].parameters()):
        return _DenseBackend(*parts, a)
    if method == "dense":
        raise ValueError(
            f"method='dense' needs DenseLayer or nn.Linear layers, got {type(layer).__name__}"
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
        layers: layer ``i`` maps ``s_{i-1} → s_i`` (``s_{-1} = x``); ``φ_i`` is
            ``list(layers[i].parameters())`` (those that require grad).
        x: the input batch ``s_{-1}``.
        targets: ``[s_0*, …, s_{L−1}*]``, each shaped like its layer's output.
        method: ``"auto"`` (dense path for ``DenseLayer``/``nn.Linear``, generic path for the
            rest), ``"dense"`` (error for other layers) or ``"generic"`` (batched autograd
            for every layer). All give the same numbers.

    Returns:
        float64 tensors (CPU) keyed by :data:`REPORT_KEYS`:

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
    n_layers = len(layers)
    nan = math.nan
    cross = torch.full((n_layers, n_layers), nan, dtype=torch.float64)
    sq = torch.full((n_layers, n_layers), nan, dtype=torch.float64)
    out = {key: torch.full((n_layers,), nan, dtype=torch.float64) for key in REPORT_KEYS[2:]}
    sq_local = torch.full((n_layers,), nan, dtype=torch.float64)
    dot_local_distant = torch.zeros(n_layers, dtype=torch.float64)
    sq_distant = torch.zeros(n_layers, dtype=torch.float64)

    def consume(i: int, grads: _Grads, num_params: int) -> None:
        local = grads[0]
        cross[i, i:] = _inner(local, grads).double().cpu()
        sq[i, i:] = _sq_norm(grads).double().cpu()
        sq_local[i] = sq[i, i]
        out["num_params"][i] = num_params
        if len(grads.rows) > 1:
            distant = grads[1:].sum()
            dot_local_distant[i] = _inner(local, distant).double().cpu()
            sq_distant[i] = _sq_norm(distant).double().cpu()
            rows_cos = _cosine(
                _row_inner(local, distant).double(),
                _row_inner(local, local).double(),
                _row_inner(distant, distant).double(),
            )
            out["local_distant_cosine_per_row"][i] = (
                rows_cos.nanmean() if (~rows_cos.isnan()).any() else nan
            )

    _reverse_sweep(layers, params, x, targets, _full_seed, consume, method)

    upper = torch.ones(n_layers, n_layers, dtype=torch.bool).triu()
    diag = torch.diagonal(sq)
    matrix = _cosine(cross, diag.unsqueeze(1), sq)
    # S[i, i] is 1 by definition when g_ii ≠ 0 (computed it is 1 ± rounding).
    matrix.diagonal().copy_(torch.where(diag > 0, 1.0, nan))
    matrix = torch.where(upper, matrix, nan)
    has_distant = torch.arange(n_layers) < n_layers - 1
    sq_global = sq_local + 2 * dot_local_distant + sq_distant
    out["local_global_cosine"] = _cosine(sq_local + dot_local_distant, sq_local, sq_global)
    out["local_distant_cosine"] = torch.where(
        has_distant, _cosine(dot_local_distant, sq_local, sq_distant), nan
    )
    out["local_distant_cosine_per_row"] = torch.where(
        has_distant, out["local_distant_cosine_per_row"], nan
    )
    out["local_norm"] = sq_local.sqrt()
    out["distant_norm"] = torch.where(has_distant, sq_distant.sqrt(), nan)
    out["global_norm"] = sq_global.clamp_min(0).sqrt()
    out["random_baseline"] = out["num_params"].rsqrt()
    return {"matrix": matrix, "grad_norms": torch.where(upper, sq.sqrt(), nan), **out}


def alignment_matrix(
    layers: Sequence[nn.Module], x: Tensor, targets: Sequence[Tensor], *, method: str = "auto"
) -> Tensor:
    """``S[i, j] = cos(∂ℓ_i/∂φ_i, ∂ℓ_j/∂φ_i)`` for ``j ≥ i`` (NaN below), float64 ``(L, L)``.

    See :func:`alignment_report` for the arguments; this is its ``"matrix"``.
    """
    return alignment_report(layers, x, targets, method=method)["matrix"]


# ----------------------------------------------------------------------------- naive reference


def per_loss_gradients(
    layers: Sequence[nn.Module], x: Tensor, targets: Sequence[Tensor]
) -> list[list[list[Tensor] | None]]:
    """``grads[j][i]`` = per-parameter ``∂ℓ_j/∂φ_i`` (``None`` for ``i > j``), by one
    ``torch.autograd.grad`` per loss — the naive reference the fast sweep is tested against."""
    layers, params = _check_inputs(layers, x, targets)
    with torch.enable_grad():
        losses = _naive_states_and_losses(layers, params, x, targets)
        return [
            [*_naive_loss_gradients(losses, params, j), *[None] * (len(layers) - j - 1)]
            for j in range(len(layers))
        ]


def _naive_cos(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 or nb == 0:
        return math.nan
    return max(-1.0, min(1.0, (torch.dot(a, b) / (na * nb)).item()))


def _naive_states_and_losses(layers, params, x, targets):
    states = forward_states(layers, x.detach())
    targets = _check_target_shapes(states, targets)
    return [(s - t).pow(2).sum() for s, t in zip(states, targets, strict=True)]


def _naive_loss_gradients(losses, params, j):
    """Flattened ``∂ℓ_j/∂φ_i`` for ``i = 0..j`` (one ``autograd.grad``) and per parameter."""
    wrt = [p for phi in params[: j + 1] for p in phi]
    g = torch.autograd.grad(losses[j], wrt, retain_graph=True, allow_unused=True)
    g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, wrt, strict=True)]
    per_layer, k = [], 0
    for i in range(j + 1):
        per_layer.append(g[k : k + len(params[i])])
        k += len(params[i])
    return per_layer


def alignment_matrix_naive(
    layers: Sequence[nn.Module], x: Tensor, targets: Sequence[Tensor]
) -> Tensor:
    """:func:`alignment_matrix` the obvious way — the baseline of ``gradkit bench align``.

    One ``torch.autograd.grad`` per loss ``ℓ_j`` (``L`` backward passes through the stored
    graph), every ``g_ij`` flattened and compared with the stored local gradient ``g_ii``.
    """
    layers, params = _check_inputs(layers, x, targets)
    n = len(layers)
    matrix = torch.full((n, n), math.nan, dtype=torch.float64)
    with torch.enable_grad():
        losses = _naive_states_and_losses(layers, params, x, targets)
        local: list[Tensor] = []
        for j in range(n):
            for i, per_param in enumerate(_naive_loss_gradients(losses, params, j)):
                flat = torch.cat([t.reshape(-1) for t in per_param])
                if i == j:
                    local.append(flat)
                    matrix[i, i] = 1.0 if flat.norm() > 0 else math.nan
                else:
                    matrix[i, j] = _naive_cos(local[i], flat)
    return matrix


def _naive_rows(per_param: Sequence[Tensor], shapes: Sequence[torch.Size]) -> Tensor:
    """The per-row layout written out directly: ``(R, c)`` rows of one layer's gradient."""
    rows_count = _row_count(shapes)
    if rows_count is None:
        return torch.cat([t.reshape(-1) for t in per_param]).unsqueeze(0)
    parts = [
        t.reshape(rows_count, -1)
        for t, shape in zip(per_param, shapes, strict=True)
        if len(shape) >= 1 and shape[0] == rows_count
    ]
    return torch.cat(parts, dim=1)


def alignment_report_naive(
    layers: Sequence[nn.Module], x: Tensor, targets: Sequence[Tensor]
) -> dict[str, Tensor]:
    """:func:`alignment_report` computed the obvious way: one backward per loss, flattened
    gradients, the global gradient by its own backward of ``Σ_j ℓ_j``, cosines one by one.

    Slow (``L`` backward passes, every ``g_ij`` materialised); the reference of the tests.
    """
    layers, params = _check_inputs(layers, x, targets)
    n = len(layers)
    nan = math.nan
    out = {
        key: torch.full(
            (n, n) if key in ("matrix", "grad_norms") else (n,), nan, dtype=torch.float64
        )
        for key in REPORT_KEYS
    }
    with torch.enable_grad():
        losses = _naive_states_and_losses(layers, params, x, targets)
        flat_params = [p for phi in params for p in phi]
        global_grads = torch.autograd.grad(sum(losses), flat_params, retain_graph=True)
        local: list[Tensor] = []
        local_parts: list[Sequence[Tensor]] = []
        distant: list[list[Tensor] | None] = [None] * n
        for j in range(n):
            for i, per_param in enumerate(_naive_loss_gradients(losses, params, j)):
                flat = torch.cat([t.reshape(-1) for t in per_param]).double()
                if i == j:
                    local.append(flat)
                    local_parts.append(per_param)
                    out["matrix"][i, i] = 1.0 if flat.norm() > 0 else nan
                else:
                    out["matrix"][i, j] = _naive_cos(local[i], flat)
                    distant[i] = (
                        list(per_param)
                        if distant[i] is None
                        else [d + t for d, t in zip(distant[i], per_param, strict=True)]
                    )
                out["grad_norms"][i, j] = flat.norm().item()
    k = 0
    for i in range(n):
        global_flat = torch.cat([t.reshape(-1) for t in global_grads[k : k + len(params[i])]])
        k += len(params[i])
        global_flat = global_flat.double()
        out["local_global_cosine"][i] = _naive_cos(local[i], global_flat)
        out["local_norm"][i] = local[i].norm().item()
        out["global_norm"][i] = global_flat.norm().item()
        out["num_params"][i] = local[i].numel()
        out["random_baseline"][i] = 1.0 / math.sqrt(local[i].numel())
        if distant[i] is None:
            continue
        distant_flat = torch.cat([t.reshape(-1) for t in distant[i]]).double()
        out["local_distant_cosine"][i] = _naive_cos(local[i], distant_flat)
        out["distant_norm"][i] = distant_flat.norm().item()
        shapes = [p.shape for p in params[i]]
        a = _naive_rows(local_parts[i], shapes).double()
        b = _naive_rows(distant[i], shapes).double()
        norms = a.norm(dim=1) * b.norm(dim=1)
        defined = norms > 0
        cosines = ((a * b).sum(1)[defined] / norms[defined]).clamp(-1, 1)
        out["local_distant_cosine_per_row"][i] = cosines.mean() if defined.any() else nan
    return out
