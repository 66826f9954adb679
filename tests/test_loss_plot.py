"""loss.png: the curve a run writes, checked on the figure's own data and on the PNG."""
import re

import numpy as np
from PIL import Image

from loha_diffusion.training.plot import loss_figure, plot_losses


def history(n=120, seed=0):
    rng = np.random.default_rng(seed)
    losses = 0.3 * np.exp(-np.arange(n) / 60) + 0.05 * rng.random(n)
    return [{"step": i + 1, "loss": float(v), "lr": 1e-3} for i, v in enumerate(losses)]


def trailing_mean(values, window):
    return np.array([np.mean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))])


def test_the_figure_plots_the_history_and_its_moving_average():
    records = history()
    axes = loss_figure(records).axes[0]
    raw, smooth = axes.get_lines()
    steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
    assert list(raw.get_xdata()) == steps and list(raw.get_ydata()) == losses
    # the legend states the window; the curve must be that moving average
    window = int(re.search(r"over (\d+) step", smooth.get_label()).group(1))
    assert 1 < window < len(records)
    assert list(smooth.get_xdata()) == steps
    np.testing.assert_allclose(smooth.get_ydata(), trailing_mean(np.array(losses), window), rtol=1e-12)
    assert axes.get_xlabel() == "step" and "loss" in axes.get_ylabel() and "120 steps" in axes.get_title()
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [raw.get_label(), smooth.get_label()]


def test_plot_losses_writes_an_800_by_400_png(tmp_path):
    for name, records in (("loss.png", history()), ("empty.png", [])):
        path = plot_losses(records, tmp_path / name)
        with Image.open(path) as image:
            assert (image.format, image.size) == ("PNG", (800, 400))
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 0  # something is drawn: axes, labels, curves
