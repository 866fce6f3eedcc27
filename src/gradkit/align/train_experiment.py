"""Local versus global training with layerwise targets (random targets, or a digits teacher).

Trains the same network from the same initial weights, on the same minibatches, with the same
momentum SGD, once following only the local gradients ``∂ℓ_i/∂φ_i`` and once the global
``∂(Σ_j ℓ_j)/∂φ_i``, and records at regular checkpoints (full batch, no update) every layer's
loss, the total, and ``cos(∂ℓ_i/∂φ_i, ∂L/∂φ_i)`` per layer.

Presets (explicit flags override them):

  achievable     depth 8, width 200, centered_leaky_clip, gaussian gain 1.6, 1000 samples,
                 teacher targets (gradkit.align.presets); 10k steps, lr 0.01, momentum 0.9,
                 minibatch 100, 3 seeds
  unachievable   the same network with iid N(0, 1) targets
  digits         scikit-learn's digits: a teacher MLP 64-128-128-10 trained on the labels,
                 its hidden states and logits are the targets of fresh students; relu and
                 kwta (soft top-k winners); test accuracy of teacher and students
  tiny           a seconds-long synthetic smoke test

Loss convention: ℓ_i = (1/B) Σ_b ‖s_{i,b} − s*_{i,b}‖² (summed over units, averaged over the
minibatch), the gist's per-example loss; see gradkit.align.training. On the synthetic presets
lr 0.01 is past the global mode's stability edge (local trains, global stalls or climbs);
compare with --lr 0.001, where both train.

Writes DIR/train.json, DIR/losses.png and DIR/alignment_over_training.png, and prints a
comparison table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from .. import _checks, _io, _runtime, _tasks
from .networks import ACTIVATIONS, INITS, make_mlp
from .presets import PRESETS
from .targets import TARGET_MODES, make_targets
from .training import TRAIN_MODES, checkpoint_steps, copy_network, train

__all__ = [
    "TRAIN_PRESETS",
    "add_arguments",
    "comparison_table",
    "losses_figure",
    "plot_alignment",
    "plot_losses",
    "resolve_config",
    "run",
    "run_experiment",
    "summarize",
]

# Training settings per preset. Synthetic presets take their network from
# gradkit.align.presets.PRESETS[network] (depth, width, activation, init, gain, bias,
# targets, target_scale; its `batch` is the number of samples) and add the training keys.
_SYNTHETIC_TRAINING = dict(
    steps=10_000, lr=0.01, momentum=0.9, batch_size=100, eval_every=250, seeds=3
)
TRAIN_PRESETS: dict[str, dict] = {
    "achievable": dict(network="achievable", **_SYNTHETIC_TRAINING),
    "unachievable": dict(network="unachievable", **_SYNTHETIC_TRAINING),
    "digits": dict(
        data="digits",
        activation="relu,kwta",
        depth=3,
        width=128,
        test_fraction=0.25,
        teacher_steps=1500,
        teacher_lr=1e-3,
        steps=2000,
        # lr 0.01 diverges here: the teacher's logits and hidden states are large, so the
        # students' regression is ~10x stiffer than the synthetic presets'.
        lr=0.001,
        momentum=0.9,
        batch_size=100,
        eval_every=250,
        seeds=3,
    ),
    "tiny": dict(
        network="achievable",
        depth=3,
        width=16,
        samples=64,
        steps=40,
        lr=0.01,
        momentum=0.9,
        batch_size=16,
        eval_every=10,
        seeds=2,
    ),
}

# Flags that override preset keys: dest name -> (check of its value, help). None = not given.
_OVERRIDES: dict[str, tuple[_checks.Check, str]] = {
    "seeds": (_checks.integer("--seeds", 1), "number of seeds (0, 1, …)"),
    "steps": (_checks.integer("--steps", 1), "SGD updates per run"),
    "lr": (_checks.number("--lr", above=0), "learning rate"),
    "momentum": (_checks.number("--momentum", at_least=0, below=1), "SGD momentum in [0, 1)"),
    "batch_size": (_checks.integer("--batch-size", 1), "examples per update"),
    "eval_every": (_checks.integer("--eval-every", 1), "steps between full-batch checkpoints"),
    "activation": (
        _checks.Check("--activation", f"one of {', '.join(ACTIVATIONS)}", str),
        f"activation, or a comma list for digits ({', '.join(ACTIVATIONS)})",
    ),
    "depth": (_checks.integer("--depth", 1), "number of layers L"),
    "width": (_checks.integer("--width", 1), "units per (hidden) layer"),
    "gain": (_checks.number("--gain", above=0), "weight init gain (synthetic)"),
    "init": (_checks.choice("--init", INITS), f"weight init (synthetic): {', '.join(INITS)}"),
    "samples": (_checks.integer("--samples", 1), "number of inputs (synthetic)"),
    "targets": (
        _checks.choice("--targets", TARGET_MODES),
        f"target kind (synthetic): {', '.join(TARGET_MODES)}",
    ),
    "target_scale": (
        _checks.number("--target-scale", above=0),
        "scale of iid targets (synthetic)",
    ),
    "teacher_steps": (_checks.integer("--teacher-steps", 1), "Adam steps of the digits teacher"),
    "teacher_lr": (
        _checks.number("--teacher-lr", above=0),
        "Adam lr of the digits teacher",
    ),
}
# Flags that only one family of presets reads: given for the other, they are refused.
_SYNTHETIC_ONLY = ("gain", "init", "samples", "targets", "target_scale")
_DIGITS_ONLY = ("teacher_steps", "teacher_lr")
_PRESET = _checks.choice("--preset", tuple(TRAIN_PRESETS))
_MODE = _checks.choice("--mode", ("local", "global", "both"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gradkit train``."""
    parser.add_argument(
        "--preset",
        type=_PRESET.argtype(),
        default="achievable",
        help=f"one of {', '.join(TRAIN_PRESETS)} (default achievable)",
    )
    parser.add_argument(
        "--mode", type=_MODE.argtype(), default="both", help="local, global or both (default both)"
    )
    for key, (check, text) in _OVERRIDES.items():
        parser.add_argument(_checks.flag(key), type=check.argtype(), default=None, help=text)
    parser.add_argument(
        "--no-alignment",
        action="store_true",
        help="skip the cos(local, global) measurements (faster)",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32", help="default float32"
    )
    parser.add_argument("--out", help="output folder (default runs/train-<time>)")
    _io.add_overwrite_argument(parser)
    _runtime.add_threads_argument(parser)
    _runtime.add_device_argument(parser)
    _tasks.add_jobs_argument(
        parser, "run the seeds (digits: activation × seed) in N local processes"
    )


def _check_applies(args: argparse.Namespace, digits: bool) -> None:
    """Refuse a flag that the chosen preset would ignore."""
    foreign = _SYNTHETIC_ONLY if digits else _DIGITS_ONLY
    for key in foreign:
        if getattr(args, key, None) is not None:
            kind = "the synthetic presets" if digits else "--preset digits"
            raise ValueError(
                f"{_checks.flag(key)} does not apply to --preset {args.preset} (it is for {kind})"
            )


def resolve_config(args: argparse.Namespace) -> dict:
    """The run's settings: the preset, its network, then every flag that was given."""
    preset_name = _PRESET(args.preset)
    modes = list(TRAIN_MODES) if _MODE(args.mode) == "both" else [args.mode]
    config = dict(TRAIN_PRESETS[preset_name])
    _check_applies(args, config.get("data") == "digits")
    if "network" in config:
        network = dict(PRESETS[config["network"]])
        network["samples"] = network.pop("batch")
        network.pop("seeds", None)
        config = {**network, **config}
    for key in _OVERRIDES:
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    config.update(
        preset=preset_name,
        modes=modes,
        dtype=args.dtype,
        measure_alignment=not args.no_alignment,
    )
    _validate(config)
    return config


def _validate(config: dict) -> None:
    for key, (check, _) in _OVERRIDES.items():
        if key in config:
            config[key] = check.parse(config[key])
    activations = str(config["activation"]).split(",")
    for activation in activations:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"--activation must be one of {', '.join(ACTIVATIONS)} (comma-separated for "
                f"digits), got {activation!r}"
            )
    if "data" not in config:
        if len(activations) != 1:
            raise ValueError("--activation takes a single activation for synthetic presets")
        if config["batch_size"] > config["samples"]:
            raise ValueError(
                f"--batch-size must be ≤ the number of samples {config['samples']}, "
                f"got {config['batch_size']}"
            )


def _mean_std(values: list) -> dict:
    """Mean and sample standard deviation over seeds (std 0 for a single seed)."""
    t = torch.tensor(values, dtype=torch.float64)
    std = t.std(0) if t.shape[0] > 1 else torch.zeros_like(t[0])
    return {"mean": t.mean(0).tolist(), "std": std.tolist()}


def _at_fraction(history: dict, fraction: float) -> float:
    """Total loss at the first checkpoint at or past ``fraction`` of training."""
    steps = history["step"]
    goal = fraction * steps[-1]
    index = next(i for i, s in enumerate(steps) if s >= goal)
    return history["total_loss"][index]


def summarize(histories: list[dict]) -> dict:
    """Final numbers of one mode over seeds: ``{key: {"mean", "std"}}``.

    ``total_loss`` and ``layer_loss`` (one per layer) at the end; ``total_loss_at_10pct`` and
    ``total_loss_at_50pct`` of the steps (how fast); ``local_global_cosine`` per layer at the
    start and the end of training, when measured.
    """
    summary = {
        "total_loss": _mean_std([h["total_loss"][-1] for h in histories]),
        "layer_loss": _mean_std([h["layer_loss"][-1] for h in histories]),
        "total_loss_at_10pct": _mean_std([_at_fraction(h, 0.1) for h in histories]),
        "total_loss_at_50pct": _mean_std([_at_fraction(h, 0.5) for h in histories]),
    }
    if all("local_global_cosine" in h for h in histories):
        summary["local_global_cosine_start"] = _mean_std(
            [h["local_global_cosine"][0] for h in histories]
        )
        summary["local_global_cosine_end"] = _mean_std(
            [h["local_global_cosine"][-1] for h in histories]
        )
    for key in ("test_accuracy", "train_accuracy", "test_layer_loss"):
        if all(key in h for h in histories):
            summary[key] = _mean_std([h[key] for h in histories])
    return summary


def _meter(config: dict, runs: int) -> _runtime.Meter:
    """One progress line per checkpoint of every run, with an ETA."""
    per_run = len(checkpoint_steps(config["steps"], config["eval_every"]))
    return _runtime.Meter(runs * per_run, "gradkit train checkpoints")


def _ticker(meter: _runtime.Meter | None, label: str):
    """A ``metrics`` callback of :func:`train` that only advances ``meter``."""

    def tick(_net) -> dict:
        if meter is not None:
            meter.step(note=label)
        return {}

    return tick


def _draw_synthetic(config: dict, seed: int, dtype: torch.dtype, device: torch.device):
    """Seed ``seed``'s network, inputs and targets: drawn on the CPU, then moved."""
    net = make_mlp(
        config["depth"], config["width"], config["activation"],
        init=config["init"], gain=config["gain"], bias=config["bias"],
        seed=seed, dtype=dtype,
    )  # fmt: skip
    # Inputs x ~ N(0, I) from their own stream, so they differ from the weights' draw.
    generator = torch.Generator().manual_seed(10_007 + seed)
    x = torch.randn(config["samples"], config["width"], generator=generator, dtype=dtype)
    targets = make_targets(net, x, config["targets"], scale=config["target_scale"], seed=seed)
    return net.to(device), x.to(device), [t.to(device) for t in targets]


def _synthetic_seed(config: dict, seed: int, dtype, device, meter) -> dict:
    """Both modes of one seed, from the same initial weights: ``{"history": {mode: ...}}``."""
    net, x, targets = _draw_synthetic(config, seed, dtype, device)
    histories = {}
    for mode in config["modes"]:
        histories[mode] = train(
            copy_network(net), x, targets, mode,
            steps=config["steps"], lr=config["lr"], momentum=config["momentum"],
            batch_size=config["batch_size"], eval_every=config["eval_every"], seed=seed,
            measure_alignment=config["measure_alignment"],
            metrics=_ticker(meter, f"seed {seed} {mode}"),
        )  # fmt: skip
    return {"history": histories}


def _units(config: dict) -> list[tuple[str | None, int]]:
    """The independent units of work: ``(None, seed)``, or ``(activation, seed)`` for digits."""
    if config.get("data") != "digits":
        return [(None, seed) for seed in range(config["seeds"])]
    activations = str(config["activation"]).split(",")
    return [(a, seed) for a in activations for seed in range(config["seeds"])]


def _run_unit(config: dict, unit, dtype, device, meter) -> dict:
    activation, seed = unit
    if activation is None:
        return _synthetic_seed(config, seed, dtype, device, meter)
    return _digits_one(config, activation, seed, dtype, device, meter)


def train_unit(task: dict) -> dict:
    """One unit (a seed, or an activation and a seed) as a task for ``--jobs`` processes."""
    _runtime.use_threads(task["threads"])
    config = task["config"]
    dtype = torch.float64 if config["dtype"] == "float64" else torch.float32
    device = _runtime.resolve_device(task["device"])
    return _run_unit(config, tuple(task["unit"]), dtype, device, None)


def _run_units(config: dict, dtype, device, partial: dict, meter, jobs: int) -> list[dict]:
    """Every unit's result in order; ``partial["finished"]`` holds them as they finish."""
    units = _units(config)
    finished: dict[int, dict] = partial.setdefault("finished", {})
    partial["units"] = units
    if jobs == 1:
        for index, unit in enumerate(units):
            finished[index] = _run_unit(config, unit, dtype, device, meter)
        return [finished[i] for i in range(len(units))]
    threads = torch.get_num_threads()
    tasks = [
        {"config": config, "unit": unit, "device": str(device), "threads": threads}
        for unit in units
    ]
    unit_meter = _runtime.Meter(len(units), "gradkit train runs")
    for index, result in _tasks.run_tasks(train_unit, tasks, jobs=jobs):
        finished[index] = result
        activation, seed = units[index]
        unit_meter.step(note=f"{activation + ' ' if activation else ''}seed {seed}")
    return [finished[i] for i in range(len(units))]


def _synthetic_summary(config: dict, results: list[dict]) -> dict:
    histories = {mode: [r["history"][mode] for r in results] for mode in config["modes"]}
    return {
        "history": histories,
        "final": {mode: summarize(hs) for mode, hs in histories.items()},
    }


def _digits_one(config: dict, activation: str, seed: int, dtype, device, meter) -> dict:
    from .digits import digits_run

    result = digits_run(
        activation=activation, modes=tuple(config["modes"]), seed=seed,
        depth=config["depth"], width=config["width"],
        test_fraction=config["test_fraction"], teacher_steps=config["teacher_steps"],
        teacher_lr=config["teacher_lr"], steps=config["steps"], lr=config["lr"],
        momentum=config["momentum"], batch_size=config["batch_size"],
        eval_every=config["eval_every"], measure_alignment=config["measure_alignment"],
        dtype=dtype, device=device, on_checkpoint=_ticker(meter, f"{activation} seed {seed}"),
    )  # fmt: skip
    for mode in config["modes"]:
        # Final accuracies ride along with the history so summarize() sees them.
        history = result["history"][mode] = dict(result["history"][mode])
        for key in ("test_accuracy", "train_accuracy", "test_layer_loss"):
            history[key] = result["final"][mode][key]
    return result


def _digits_summary(config: dict, results: list[dict]) -> dict:
    activations = str(config["activation"]).split(",")
    units = _units(config)
    final_by_activation, history_by_activation = {}, {}
    for activation in activations:
        mine = [r for (a, _), r in zip(units, results, strict=True) if a == activation]
        final = {m: summarize([r["history"][m] for r in mine]) for m in config["modes"]}
        final["teacher"] = {
            key: _mean_std([r["teacher"][key] for r in mine])
            for key in ("test_accuracy", "train_accuracy")
        }
        final_by_activation[activation] = final
        history_by_activation[activation] = {
            m: [r["history"][m] for r in mine] for m in config["modes"]
        }
    primary = activations[0]
    return {
        "history": history_by_activation[primary],
        "final": final_by_activation[primary],
        "primary_activation": primary,
        "history_by_activation": history_by_activation,
        "final_by_activation": final_by_activation,
    }


def run_experiment(
    config: dict,
    *,
    device: str | torch.device = "cpu",
    partial: dict | None = None,
    progress: bool = False,
    jobs: int = 1,
) -> dict:
    """Run every (seed, mode) of ``config`` (see :func:`resolve_config`) and summarise.

    Each seed (with digits: each activation and seed) is a unit of work; ``jobs > 1`` runs
    the units in that many local processes, with the same numbers as a serial run.
    ``partial`` (a dict) receives ``"units"`` and ``"finished"`` (``{index: result}``) as
    units finish, so an interrupted run keeps them; ``progress`` prints a line with an ETA
    at every checkpoint (with ``jobs > 1``: at every finished unit).
    """
    dtype = torch.float64 if config["dtype"] == "float64" else torch.float32
    device = _runtime.resolve_device(device)
    partial = {} if partial is None else partial
    digits = config.get("data") == "digits"
    meter = _meter(config, len(_units(config)) * len(config["modes"])) if progress else None
    start = time.perf_counter()
    results = _run_units(config, dtype, device, partial, meter if jobs == 1 else None, jobs)
    summary = _digits_summary(config, results) if digits else _synthetic_summary(config, results)
    return {"config": config, **summary, "runtime_s": time.perf_counter() - start}


def _fmt(stat: dict, digits: int = 3) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean is None or not math.isfinite(mean):
        return "diverged"
    return f"{mean:.{digits}g} ± {std:.2g}"


def comparison_table(result: dict) -> str:
    """The markdown table printed at the end of a run."""
    lines = []
    by_activation = result.get("final_by_activation") or {"": result["final"]}
    depth = len(next(iter(result["history"].values()))[0]["layer_loss"][0])
    header = [
        "mode",
        "ℓ total @10%",
        "ℓ total @50%",
        "ℓ total final",
        "ℓ_1 final",
        f"ℓ_{depth} final",
    ]
    has_cos = any(
        "local_global_cosine_end" in f
        for fs in by_activation.values()
        for m, f in fs.items()
        if m != "teacher"
    )
    if has_cos:
        header.append("mean_i cos(local, global) start → end")
    has_acc = "digits" == result["config"].get("data")
    if has_acc:
        header = ["activation", *header, "test accuracy"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for activation, finals in by_activation.items():
        if has_acc:
            teacher = finals["teacher"]["test_accuracy"]
            lines.append(
                f"| {activation} | teacher (backprop, cross-entropy) |"
                + " |" * (len(header) - 3)
                + f" {teacher['mean']:.4f} ± {teacher['std']:.4f} |"
            )
        for mode in result["config"]["modes"]:
            f = finals[mode]
            layer = f["layer_loss"]
            cells = [
                mode,
                _fmt(f["total_loss_at_10pct"]),
                _fmt(f["total_loss_at_50pct"]),
                _fmt(f["total_loss"]),
                _fmt({"mean": layer["mean"][0], "std": layer["std"][0]}),
                _fmt({"mean": layer["mean"][-1], "std": layer["std"][-1]}),
            ]
            if has_cos:
                start = f.get("local_global_cosine_start", {}).get("mean")
                end = f.get("local_global_cosine_end", {}).get("mean")
                cells.append(
                    f"{sum(start) / len(start):.3f} → {sum(end) / len(end):.3f}"
                    if start and end and None not in start + end
                    else "n/a"
                )
            if has_acc:
                acc = f["test_accuracy"]
                cells = [activation, *cells, f"{acc['mean']:.4f} ± {acc['std']:.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curve_sets(result: dict) -> dict[str, list[dict]]:
    """``{label: [history per seed]}`` for every (activation, mode) trained."""
    if "history_by_activation" in result:
        return {
            f"{activation} {mode}": histories
            for activation, by_mode in result["history_by_activation"].items()
            for mode, histories in by_mode.items()
        }
    return dict(result["history"])


def _band(histories: list[dict], key: str, layer: int | None):
    steps = histories[0]["step"]
    values = torch.tensor(
        [[row if layer is None else row[layer] for row in h[key]] for h in histories],
        dtype=torch.float64,
    )
    return steps, values.mean(0), values.min(0).values, values.max(0).values


def plot_losses(result: dict, path: Path) -> Path:
    """Loss curves of every mode (mean over seeds, min–max band), log scale: the total, then
    one panel per group of layers (one layer per panel up to 11 layers), and the students'
    test accuracy when it was recorded (digits)."""
    return _io.save_figure(losses_figure(result), path)


def losses_figure(result: dict):
    """The figure of :func:`plot_losses` (not saved)."""
    plt = _io.pyplot()
    curves = _curve_sets(result)
    depth = len(next(iter(curves.values()))[0]["layer_loss"][0])
    per_panel = max(1, math.ceil(depth / 11))
    groups = [list(range(i, min(i + per_panel, depth))) for i in range(0, depth, per_panel)]
    accuracy = all("checkpoint_test_accuracy" in hs[0] for hs in curves.values())
    panels = 1 + len(groups) + accuracy
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for panel, ax in enumerate(axes.flat):
        if panel >= panels:
            ax.axis("off")
        elif accuracy and panel == panels - 1:
            _accuracy_panel(ax, curves, plt)
        else:
            _loss_panel(ax, curves, [None] if panel == 0 else groups[panel - 1], plt)
    axes.flat[0].legend(fontsize=8)
    config = result["config"]
    fig.suptitle(
        f"gradkit train --preset {config['preset']}: layerwise loss, local vs global "
        f"(mean over {config['seeds']} seeds, band = min–max)"
    )
    fig.tight_layout()
    return fig


def _loss_panel(ax, curves: dict, layers: list, plt) -> None:
    from .plots import readable_log_axis

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    key = "total_loss" if layers == [None] else "layer_loss"
    for c, (label, histories) in enumerate(curves.items()):
        for j, layer in enumerate(layers):
            steps, mean, low, high = _band(histories, key, layer)
            style = ("-", "--", ":", "-.")[j % 4]
            ax.plot(steps, mean, style, color=colors[c % len(colors)],
                    label=label if j == 0 else None)  # fmt: skip
            ax.fill_between(steps, low, high, color=colors[c % len(colors)], alpha=0.15)
    ax.set_title("total Σ ℓ_i" if layers == [None] else ", ".join(f"ℓ_{i + 1}" for i in layers))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    readable_log_axis(ax)


def _accuracy_panel(ax, curves: dict, plt) -> None:
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (label, histories) in enumerate(curves.items()):
        steps, mean, low, high = _band(histories, "checkpoint_test_accuracy", None)
        ax.plot(steps, mean, color=colors[c % len(colors)], label=label)
        ax.fill_between(steps, low, high, color=colors[c % len(colors)], alpha=0.15)
    ax.set_title("students' test accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)


def plot_alignment(result: dict, path: Path) -> Path:
    """``cos(∂ℓ_i/∂φ_i, ∂L/∂φ_i)`` per layer over training, one panel per trained mode."""
    plt = _io.pyplot()
    curves = {
        label: hs for label, hs in _curve_sets(result).items() if "local_global_cosine" in hs[0]
    }
    fig, axes = plt.subplots(
        1, max(1, len(curves)), figsize=(4.5 * max(1, len(curves)), 3.5), squeeze=False
    )
    if not curves:
        axes[0, 0].text(0.5, 0.5, "alignment not measured (--no-alignment)", ha="center")
        axes[0, 0].axis("off")
    cmap = plt.get_cmap("viridis")
    for ax, (label, histories) in zip(axes.flat, curves.items(), strict=False):
        depth = len(histories[0]["local_global_cosine"][0])
        for layer in range(depth):
            steps, mean, _, _ = _band(histories, "local_global_cosine", layer)
            ax.plot(steps, mean, color=cmap(layer / max(1, depth - 1)), label=f"layer {layer + 1}")
        ax.set_title(f"trained {label}")
        ax.set_xlabel("step")
        ax.set_ylabel("cos(local, global)")
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color="grey", lw=0.5)
    if curves:
        axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"gradkit train --preset {result['config']['preset']}: alignment over training")
    fig.tight_layout()
    return _io.save_figure(fig, path)


def _jobs_of(args: argparse.Namespace) -> int:
    """``--jobs`` of a parsed (or hand-made) namespace, checked."""
    return _tasks.JOBS.parse(getattr(args, "jobs", None) or 1)


def _print_config(config: dict, device: torch.device, out: Path) -> None:
    shown = {k: v for k, v in config.items() if k not in ("network",)}
    text = ", ".join(f"{k}={v}" for k, v in shown.items())
    print(f"gradkit train: {text}; device={device}, threads={torch.get_num_threads()}")
    print(f"writing to {out}", flush=True)


def _save_partial(config: dict, partial: dict, out: Path) -> None:
    """On Ctrl-C: the finished units' histories, marked incomplete; say where they are."""
    finished = partial.get("finished")
    if not finished:
        return
    runs = [
        {"activation": partial["units"][i][0], "seed": partial["units"][i][1], **finished[i]}
        for i in sorted(finished)
    ]
    payload = {"config": config, "complete": False, "runs": runs}
    path = _io.write_json(out / "train.partial.json", payload)
    print(
        f"\ninterrupted: {len(runs)} of {len(partial['units'])} runs finished; their "
        f"histories are in {path}",
        file=sys.stderr,
        flush=True,
    )


def run(args: argparse.Namespace) -> int:
    """``gradkit train``: run, write ``train.json`` and the plots, print the table."""
    config = resolve_config(args)
    device = _runtime.resolve_device(getattr(args, "device", "cpu"))
    _runtime.use_threads(getattr(args, "threads", None))
    overwrite = bool(getattr(args, "overwrite", False))
    with _io.run_folder("train", args.out, overwrite=overwrite) as out:
        _print_config(config, device, out)
        partial: dict = {}
        try:
            result = run_experiment(
                config, device=device, partial=partial, progress=True, jobs=_jobs_of(args)
            )
        except ImportError as error:  # the digits extra is missing: say how to install it
            raise SystemExit(f"gradkit train: error: {error}") from error
        except KeyboardInterrupt:
            _save_partial(config, partial, out)
            raise
        result["config"] = {**config, "device": str(device), "threads": torch.get_num_threads()}
        _io.write_json(out / "train.json", result)
        plot_losses(result, out / "losses.png")
        plot_alignment(result, out / "alignment_over_training.png")
    print(comparison_table(result))
    print(f"\n{result['runtime_s']:.1f} s; wrote {out / 'train.json'}, losses.png, "
          "alignment_over_training.png")  # fmt: skip
    return 0
