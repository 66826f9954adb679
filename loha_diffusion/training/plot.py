"""The run's loss curve, ``loss.png``: raw loss per step under its moving average, drawn with
matplotlib's Agg canvas (no display or GUI backend needed)."""
from __future__ import annotations

from pathlib import Path

FIGURE_INCHES, DPI = (8, 4), 100  # an 800 x 400 PNG


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def loss_figure(history: list[dict]):
    """A matplotlib Figure of ``history`` (the trainer's ``{"step", "loss", ...}`` records)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    if losses:
        window = max(1, len(losses) // 25)
        axes.plot(steps, losses, color="0.7", linewidth=0.8, label="loss per step")
        axes.plot(steps, moving_average(losses, window), color="tab:blue", linewidth=2,
                  label=f"moving average over {window} step{'s' if window > 1 else ''}")
        axes.legend(loc="upper right")
        axes.set_title(f"Training loss, {len(losses)} steps (last {losses[-1]:.4f})")
    else:
        axes.set_title("Training loss: no steps in this run")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_losses(history: list[dict], path) -> Path:
    """Write ``loss_figure(history)`` to ``path`` as a PNG."""
    path = Path(path)
    loss_figure(history).savefig(path, format="png")
    return path
