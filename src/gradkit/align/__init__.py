"""The gradient-alignment lab: random deep nets, layerwise targets, alignment measurements."""

from .decompose import decomposition, decomposition_naive
from .measure import (
    alignment_matrix,
    alignment_matrix_naive,
    alignment_report,
    alignment_report_naive,
    per_loss_gradients,
)
from .networks import ACTIVATIONS, INITS, DenseLayer, KWinnersTakeAll, forward_states, make_mlp
from .presets import PRESETS, preset
from .targets import TARGET_MODES, layer_losses, make_targets
from .training import TRAIN_MODES, layerwise_losses, train, train_step

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "PRESETS",
    "TARGET_MODES",
    "TRAIN_MODES",
    "DenseLayer",
    "KWinnersTakeAll",
    "alignment_matrix",
    "alignment_matrix_naive",
    "alignment_report",
    "alignment_report_naive",
    "decomposition",
    "decomposition_naive",
    "forward_states",
    "layer_losses",
    "layerwise_losses",
    "make_mlp",
    "make_targets",
    "per_loss_gradients",
    "preset",
    "train",
    "train_step",
]
