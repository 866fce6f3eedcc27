"""The gradient-alignment lab: random deep nets, layerwise targets, alignment measurements."""

from .networks import ACTIVATIONS, INITS, DenseLayer, KWinnersTakeAll, forward_states, make_mlp
from .presets import PRESETS, preset
from .targets import TARGET_MODES, layer_losses, make_targets

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "PRESETS",
    "TARGET_MODES",
    "DenseLayer",
    "KWinnersTakeAll",
    "forward_states",
    "layer_losses",
    "make_mlp",
    "make_targets",
    "preset",
]
