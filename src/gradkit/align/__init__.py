"""The gradient-alignment lab: random deep nets, layerwise targets, alignment measurements."""

from .decompose import decomposition
from .measure import alignment_matrix, alignment_report
from .networks import (
    ACTIVATIONS,
    INITS,
    DenseLayer,
    KWinnersTakeAll,
    forward_states,
    group_layers,
    make_mlp,
)
from .presets import PRESETS, preset
from .reference import (
    alignment_matrix_naive,
    alignment_report_naive,
    decomposition_naive,
    per_loss_gradients,
)
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
    "group_layers",
    "layer_losses",
    "layerwise_losses",
    "make_mlp",
    "make_targets",
    "per_loss_gradients",
    "preset",
    "train",
    "train_step",
]
