"""Pictures: ELBO against epoch, image grids, Stirling's relative error. Matplotlib with the Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def picture_formats() -> list[str]:
    """File suffixes (without the dot) that matplotlib can write here: png, pdf, svg, jpg, …"""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return sorted(FigureCanvasAgg(Figure()).get_supported_filetypes())


def _save(fig, path: Path) -> None:
    """Write ``fig`` atomically in the format its file name asks for (PNG at 120 dpi by default)."""
    from vaelab.atomic import atomic_write

    path = Path(path)
    kind = path.suffix.lower().lstrip(".") or "png"
    atomic_write(path, lambda handle: fig.savefig(handle, format=kind, dpi=120, bbox_inches="tight"))
    _pyplot().close(fig)


def plot_elbo(metrics: Sequence[dict[str, float]], path: Path, title: str = "") -> None:
    """Train and test ELBO (nats per example) against epoch, as in the reference exercise."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in metrics]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [row["train_elbo"] for row in metrics], label="train ELBO", marker="." if len(epochs) < 30 else None)
    ax.plot(epochs, [row["test_elbo"] for row in metrics], label="test ELBO", marker="." if len(epochs) < 30 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per example)")
    if len(epochs) > 3:  # leave out the first epochs' steep start so the later gap is readable
        values = [row[k] for row in metrics[2:] for k in ("train_elbo", "test_elbo")]
        ax.set_ylim(min(values) - 2, max(values) + 2)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or f"ELBO, final test {metrics[-1]['test_elbo']:.2f}")
    _save(fig, path)


def image_grid(images: np.ndarray, rows: int, cols: int, pad: int = 2) -> np.ndarray:
    """(n, 784) values in [0, 1] → one (rows·(28+pad)+pad, cols·(28+pad)+pad) array, ink dark on white."""
    side = 28
    grid = np.ones((rows * (side + pad) + pad, cols * (side + pad) + pad))
    for i, image in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        top, left = pad + r * (side + pad), pad + c * (side + pad)
        grid[top:top + side, left:left + side] = 1.0 - image.reshape(side, side)
    return grid


def plot_grid(images: np.ndarray, path: Path, title: str, cols: int = 8) -> None:
    """A grid of digits (decoder means), grey on white."""
    plt = _pyplot()
    rows = int(np.ceil(len(images) / cols))
    fig, ax = plt.subplots(figsize=(cols * 0.6 + 0.4, rows * 0.6 + 0.6))
    ax.imshow(image_grid(images, rows, cols), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    _save(fig, path)


def plot_reconstructions(originals: np.ndarray, reconstructions: np.ndarray, path: Path, cols: int = 10) -> None:
    """Test digits (binarised) in the odd rows, the decoder means of their reconstructions below them."""
    pairs = []
    for start in range(0, len(originals), cols):
        pairs.extend(originals[start:start + cols])
        pairs.extend(reconstructions[start:start + cols])
    plot_grid(np.stack(pairs), path, "test digits (rows 1, 3, …) and their reconstructions", cols=cols)


def plot_stirling(ns: np.ndarray, errors: dict[int, np.ndarray], path: Path) -> None:
    """|relative error| of N! against N on log-log axes, one curve per number of correction terms."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for terms, err in errors.items():
        keep = err > 0
        ax.loglog(ns[keep], err[keep], marker=".", label=f"{terms} correction term{'s' if terms != 1 else ''}")
    ax.loglog(ns, 1 / (12 * ns), color="black", linestyle="--", linewidth=0.8, zorder=3, label="1/(12N)")
    ax.set_xlabel("N")
    ax.set_ylabel("|relative error of N!|")
    ax.set_title("Stirling's formula √(2πN)(N/e)^N · exp(Σ corrections)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
