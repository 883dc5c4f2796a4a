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


# ------------------------------------------------------------------------------------------------
# Figures of the report and of `vaelab compare` (returned, then saved or embedded).


def figure_png(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for a self-contained HTML page); closes it."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def training_figure(metrics: Sequence[dict]):
    """Three panels against epoch: the ELBO (train, validation, test), its two parts (reconstruction
    E_q log p(x|z) and KL), and the seconds of each epoch's steps."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in metrics]
    marker = "." if len(epochs) <= 60 else None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("train_elbo", "train"), ("validation_elbo", "validation"), ("test_elbo", "test")):
        if key in metrics[0]:
            axes[0].plot(epochs, [row[key] for row in metrics], marker=marker, label=label)
    axes[0].set_ylabel("ELBO (nats per digit)")
    if len(epochs) > 3:             # leave out the steep start so the later differences are readable
        later = [row[k] for row in metrics[2:] for k in ("train_elbo", "test_elbo")]
        axes[0].set_ylim(min(later) - 2, max(later) + 2)
    for split, style in (("train", "-"), ("test", "--")):
        axes[1].plot(epochs, [-row[f"{split}_reconstruction"] for row in metrics], style, color="C0",
                     label=f"−reconstruction, {split}")
        axes[1].plot(epochs, [row[f"{split}_kl"] for row in metrics], style, color="C3", label=f"KL, {split}")
    axes[1].set_ylabel("nats per digit")
    if len(epochs) > 3:
        later = [v for row in metrics[2:] for v in (-row["train_reconstruction"], -row["test_reconstruction"],
                                                     row["train_kl"], row["test_kl"])]
        axes[1].set_ylim(0, max(later) * 1.1)
    axes[2].bar(epochs, [row["epoch_seconds"] for row in metrics], color="C7", width=0.8)
    axes[2].set_ylabel("seconds of the epoch's steps")
    for ax in axes:
        _integer_epochs(ax)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def histogram_figure(values: np.ndarray, xlabel: str, title: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(values, bins=60, color="C0", alpha=0.85)
    ax.axvline(float(np.mean(values)), color="black", linewidth=1, label=f"mean {np.mean(values):.2f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test digits")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def digit_rows_figure(rows: Sequence[np.ndarray], labels: Sequence[str], title: str):
    """Rows of digits ((n, 784) each, values in [0, 1]) with a label on the left of each row."""
    plt = _pyplot()
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(cols * 0.62 + 1.6, len(rows) * 0.7 + 0.5), squeeze=False)
    for ax, images, label in zip(axes[:, 0], rows, labels):
        ax.imshow(image_grid(np.asarray(images), 1, cols), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        for spine in ax.spines.values():
            spine.set_visible(False)
    axes[0, 0].set_title(title, fontsize=10)
    return fig


def kl_figure(layers: Sequence[dict]):
    """Mean KL per latent dimension of each stochastic layer, active units (Cov_x E_q[u] > 0.01) in colour."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 2.6 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        active = set(layer["active"])
        if layer.get("kl_per_dimension") is None:          # a flow or a mixture prior: no per-unit KL
            variance = np.asarray(layer["posterior_mean_variance"])
            ax.bar(np.arange(len(variance)), variance, color=["C0" if i in active else "0.75" for i in range(len(variance))])
            ax.set_yscale("symlog", linthresh=1e-2)
            ax.axhline(1e-2, color="C3", lw=0.8, ls="--")
            ax.set_ylabel("Cov_x E_q[u]")
            ax.set_title(f"layer {layer['layer']}: {layer['active_units']} of {layer['latent']} units active (blue; "
                         f"the dashed line is 0.01), KL {layer['kl']:.2f} nats in all (no per-unit KL: q or p does "
                         f"not factorise)", fontsize=9)
            ax.set_xlabel("latent dimension")
            continue
        kl = np.asarray(layer["kl_per_dimension"])
        colours = ["C0" if i in active else "0.75" for i in range(len(kl))]
        ax.bar(np.arange(len(kl)), kl, color=colours)
        ax.set_ylabel("KL (nats)")
        ax.set_title(f"layer {layer['layer']}: {layer['active_units']} of {layer['latent']} units active "
                     f"(blue), KL {layer['kl']:.2f} nats", fontsize=9)
        ax.set_xlabel("latent dimension")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def scatter_2d_figure(points: np.ndarray, labels: np.ndarray, title: str):
    """Points (N, 2) coloured by digit class 0–9."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=3, alpha=0.6,
                         linewidths=0)
    cbar = fig.colorbar(scatter, ax=ax, ticks=range(10))
    cbar.set_label("digit")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def curves_figure(runs: Sequence[tuple[str, Sequence[dict]]]):
    """Test ELBO (solid) and train ELBO (dotted) against epoch for several runs, one colour each."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for index, (name, metrics) in enumerate(runs):
        epochs = [row["epoch"] for row in metrics]
        ax.plot(epochs, [row["test_elbo"] for row in metrics], color=f"C{index}", label=f"{name}, test")
        ax.plot(epochs, [row["train_elbo"] for row in metrics], ":", color=f"C{index}", label=f"{name}, train")
    values = [row["test_elbo"] for _, metrics in runs if len(metrics) > 5 for row in metrics[2:]]
    if values:                       # leave out the steep first epochs where there are enough later ones
        ax.set_ylim(min(values) - 3, max(row["test_elbo"] for _, metrics in runs for row in metrics) + 3)
    _integer_epochs(ax)
    ax.set_ylabel("ELBO (nats per digit)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def sweep_history_figure(numbers: Sequence[int], values: Sequence[float], states: Sequence[str], minimize: bool,
                         label: str):
    """The objective of every finished trial against its slot, the best so far as a step line; pruned trials as
    crosses at their last reported value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    done = [(n, v) for n, v, s in zip(numbers, values, states) if s == "complete" and v is not None]
    pruned = [(n, v) for n, v, s in zip(numbers, values, states) if s == "pruned" and v is not None]
    if done:
        ax.scatter(*zip(*done), color="C0", label="complete", zorder=3)
        best, line = None, []
        for n, v in sorted(done):
            best = v if best is None or (v < best if minimize else v > best) else best
            line.append((n, best))
        ax.step(*zip(*line), where="post", color="C3", label="best so far")
    if pruned:
        ax.scatter(*zip(*pruned), color="0.5", marker="x", label="pruned (last validation ELBO)")
    ax.set_xlabel("trial")
    ax.set_ylabel(label)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sweep_parameter_figure(name: str, values: Sequence, objective: Sequence[float], label: str, log: bool):
    """One searched parameter against the objective of the complete trials (choices spread on their own axis)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 3.0))
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        ax.scatter(values, objective, color="C0")
        if log:
            ax.set_xscale("log")
    else:
        names = sorted({str(v) for v in values})
        ax.scatter([names.index(str(v)) for v in values], objective, color="C0")
        ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel(name)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def importance_figure(importances: dict[str, float]):
    """Optuna's parameter importances as horizontal bars (they sum to 1)."""
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(5.5, 0.5 + 0.45 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.set_xlabel("importance (fANOVA, sums to 1)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig
