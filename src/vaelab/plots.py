"""Pictures: ELBO against epoch, image grids, Stirling's relative error. Matplotlib with the Agg backend."""

from __future__ import annotations

import contextlib
import functools
import math
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


def _save(fig, path: Path, dpi: int = 120, tight: bool = True, metadata: dict[str, str] | None = None) -> None:
    """Write ``fig`` atomically in the format its file name asks for (PNG at ``dpi``); ``tight`` crops it to what
    it draws (otherwise the file keeps the figure's size, as a figure for a paper must). ``metadata``: text fields of
    a PNG (other formats do not take free keys and are written without them)."""
    from vaelab.atomic import atomic_write

    path = Path(path)
    kind = path.suffix.lower().lstrip(".") or "png"
    extra = {"metadata": metadata} if metadata and kind == "png" else {}
    with _every_script_drawn(fig):
        atomic_write(path, lambda handle: fig.savefig(handle, format=kind, dpi=dpi,
                                                      bbox_inches="tight" if tight else None, **extra))
    _pyplot().close(fig)


@functools.cache
def _characters(path: str) -> frozenset[int]:
    """The code points the font file at ``path`` draws (its first face's character map; none where FreeType cannot
    read it)."""
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(str(path)).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


_UNDRAWN_NAMED: set[int] = set()      # characters _every_script_drawn has warned of (once a process, not a figure)
_FALLBACKS: set[str] = set()          # the families _give_fonts has given texts


def _give_fonts(fig) -> set[int]:
    """Give each text of ``fig`` with characters its fonts lack (a run named 実験一 in a legend: DejaVu Sans has no
    CJK), after its own families, installed ones that have them, the text's style and weight first. Matplotlib
    falls back glyph by glyph along a text's list of families (Agg, PDF and SVG alike), but only among the families
    it is given, and it gives its default one. Returns the characters no font has."""
    from matplotlib import font_manager
    from matplotlib.text import Text

    def weight(value) -> float:                      # "normal", "bold", 500, …
        return float(font_manager.weight_dict.get(value, value))

    def with_family(props, family: str):
        props = props.copy()
        props.set_family(family)
        return props

    unmatched: set[int] = set()
    for text in fig.findobj(Text):
        words = text.get_text()
        if words.isascii():
            continue
        props = text.get_fontproperties()
        families = list(props.get_family())
        fonts = [_characters(font_manager.findfont(with_family(props, f))) for f in families]
        missing = {ord(c) for c in words if not c.isspace() and not any(ord(c) in font for font in fonts)}
        extra: list[str] = []
        if missing:
            # matplotlib's Last Resort font has a box for every code point: the box this is to spare
            candidates = [e for e in font_manager.fontManager.ttflist if not e.name.startswith("Last Resort")]
            for entry in sorted(candidates, key=lambda e: (e.style != props.get_style(), abs(
                    weight(e.weight) - weight(props.get_weight())), e.name, e.fname)):   # its style and weight first
                drawn = missing & _characters(entry.fname)
                if drawn and entry.name not in families + extra:
                    extra.append(entry.name)
                    missing -= drawn
                if not missing:
                    break
        if extra:
            text.set_fontfamily(families + extra)
            _FALLBACKS.update(extra)
        unmatched |= missing
    return unmatched


@contextlib.contextmanager
def _every_script_drawn(fig):
    """Around laying out or drawing ``fig`` (its texts measured in the fonts they will be drawn in): the fonts of
    ``_give_fonts``, and one warning naming the characters no font that matplotlib knows of has, once a process
    (matplotlib's own is one per glyph and figure)."""
    import logging
    import warnings

    import matplotlib
    from matplotlib import font_manager

    def other_weight(record: logging.LogRecord) -> bool:
        # "Failed to find font weight normal for WenQuanYi Zen Hei, now using 500": a font of one weight, given here
        return not (str(record.msg).startswith("findfont: Failed to find font weight")
                    and isinstance(record.args, tuple) and len(record.args) > 1 and record.args[1] in _FALLBACKS)

    logger = logging.getLogger(font_manager.__name__)
    logger.addFilter(other_weight)
    try:
        unmatched = _give_fonts(fig)
        if unmatched - _UNDRAWN_NAMED:
            _UNDRAWN_NAMED.update(unmatched)
            shown = ", ".join(chr(c) for c in sorted(unmatched)[:8]) + (", …" if len(unmatched) > 8 else "")
            warnings.warn(f"{shown}: no font that matplotlib knows of has {'them' if len(unmatched) > 1 else 'it'}, "
                          f"so figures draw boxes (install a font that has, e.g. one of the Noto fonts; matplotlib "
                          f"looks for fonts again once its list, {matplotlib.get_cachedir()}/fontlist-*.json, is "
                          f"deleted)", stacklevel=3)
        with warnings.catch_warnings():
            if unmatched:                             # named once
                warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
            yield
    finally:
        logger.removeFilter(other_weight)


def _tight_layout(fig) -> None:
    """``fig.tight_layout()`` with its texts measured in the fonts they will be drawn in (_every_script_drawn)."""
    with _every_script_drawn(fig):
        fig.tight_layout()


def plot_elbo(metrics: Sequence[dict[str, float]], path: Path, title: str = "", dpi: int = 120) -> None:
    """Train and test ELBO (nats per digit) against epoch, as in the reference exercise; every epoch shown, an
    inset zooming on the later ones where the first epochs dwarf them."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in metrics]
    fig, ax = plt.subplots(figsize=(6, 4))
    marker = "." if len(epochs) < 30 else None
    series = [([row["train_elbo"] for row in metrics], {"label": "train ELBO", "marker": marker, "color": "C0"}),
              ([row["test_elbo"] for row in metrics], {"label": "test ELBO", "marker": marker, "color": "C1"})]
    for values, style in series:
        ax.plot(epochs, values, **style)
    _integer_epochs(ax)
    ax.set_ylabel("ELBO (nats per digit)")
    inset = _with_inset(ax, epochs, series)
    ax.grid(alpha=0.3)
    # The legend where it covers the fewest points (matplotlib's "best"): in the inset where there is one (the main
    # axes' "best" would not see the inset over its lower right), else below a rising curve, not over its first epochs.
    if inset is not None:
        inset.legend(loc="best", fontsize=8)
    else:
        ax.legend(loc="best")
    ax.set_title(title or f"ELBO, final test {metrics[-1]['test_elbo']:.2f}")
    _save(fig, path, dpi=dpi)


def image_grid(images: np.ndarray, rows: int, cols: int, pad: int = 2) -> np.ndarray:
    """(n, 784) values in [0, 1] → one (rows·(28+pad)+pad, cols·(28+pad)+pad) array, ink dark on white."""
    side = 28
    grid = np.ones((rows * (side + pad) + pad, cols * (side + pad) + pad))
    for i, image in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        top, left = pad + r * (side + pad), pad + c * (side + pad)
        grid[top:top + side, left:left + side] = 1.0 - image.reshape(side, side)
    return grid


def plot_grid(images: np.ndarray, path: Path, title: str, cols: int = 8,
              metadata: dict[str, str] | None = None) -> None:
    """A grid of digits (decoder means), grey on white; ``metadata`` as for ``_save``."""
    plt = _pyplot()
    rows = int(np.ceil(len(images) / cols))
    fig, ax = plt.subplots(figsize=(cols * 0.6 + 0.4, rows * 0.6 + 0.6))
    ax.imshow(image_grid(images, rows, cols), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    _save(fig, path, metadata=metadata)


def plot_reconstructions(originals: np.ndarray, reconstructions: np.ndarray, path: Path, cols: int = 10) -> None:
    """Test digits (binarised) in the odd rows, the decoder means of their reconstructions below them."""
    pairs = []
    for start in range(0, len(originals), cols):
        pairs.extend(originals[start:start + cols])
        pairs.extend(reconstructions[start:start + cols])
    plot_grid(np.stack(pairs), path, "test digits (rows 1, 3, …) and their reconstructions", cols=cols)


# a legend names each curve up to this many correction terms; beyond, a colour scale does (K = 30 made a legend of
# 32 entries in a 10-colour cycle, taller than the axes and covering them, until 2026-12-07)
STIRLING_LEGEND_TERMS = 3
# the error axis ends here: above it a truncation of the divergent series is worse than no approximation at all
STIRLING_ERROR_CAP = 10.0


def stirling_figure(ns: np.ndarray, errors: dict[int, np.ndarray]):
    """|relative error| of N! against N on log-log axes, one curve per number of correction terms K; the figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    most = max(errors)
    scale = plt.get_cmap("viridis") if most > STIRLING_LEGEND_TERMS else None
    cut = False
    for terms, err in errors.items():
        keep = err > 0                       # 0: below float64's range; inf: above it (K ≫ πN at a small N)
        cut |= bool((err[keep] > STIRLING_ERROR_CAP).any())
        ax.loglog(ns[keep], err[keep], marker=".", markersize=6 if scale is None else 3,
                  color=None if scale is None else scale(terms / most),
                  label=f"{terms} correction term{'s' if terms != 1 else ''}" if scale is None else None)
    ax.loglog(ns, 1 / (12 * ns), color="black", linestyle="--", linewidth=0.8, zorder=3, label="1/(12N)")
    if scale is not None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = fig.colorbar(ScalarMappable(Normalize(0, most), scale), ax=ax)
        bar.set_label("correction terms K")
    if cut:
        # Stirling's series diverges: its k-th term shrinks only while k < πN, so many terms at a small N err by more
        # than 10⁶⁰⁰ (K = 30 at N = 1: 10^(2.6·10³⁰)), which squeezed every useful curve into the bottom of the axes
        ax.set_ylim(top=STIRLING_ERROR_CAP)
        ax.text(0.5, -0.17, f"errors above {STIRLING_ERROR_CAP:g} are off the axis: the series diverges for K "
                f"above about πN", transform=ax.transAxes, ha="center", va="top", fontsize=8)
    ax.set_xlabel("N")
    ax.set_ylabel("|relative error of N!|")
    ax.set_title("Stirling's formula √(2πN)(N/e)^N · exp(Σ corrections)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    return fig


def plot_stirling(ns: np.ndarray, errors: dict[int, np.ndarray], path: Path) -> None:
    """``stirling_figure`` written to ``path`` in the format its name asks for."""
    _save(stirling_figure(ns, errors), path)


# ------------------------------------------------------------------------------------------------
# Figures of the report and of `vaelab compare` (returned, then saved or embedded).


def figure_png(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for a self-contained HTML page); closes it."""
    import io

    buffer = io.BytesIO()
    with _every_script_drawn(fig):
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


@functools.cache
def _fitting_locator():
    """The class of a locator (MaxNLocator's; ``integer=True`` for whole numbers) that takes, when the axes are drawn
    (after any tight_layout), the most ticks, 10 at most, whose labels fit along its axis: on an x axis each label
    (0.65 d + 1) font sizes wide for the d characters of the longest label its formatter writes (a digit is 0.64 em
    in DejaVu Sans, and an em between labels), on a y axis 1.5 font sizes high. Ten fixed bins put "1050", "1200",
    "1350" 2 pixels apart in the 2.6 in inset of a 1374-epoch run's elbo.png, hidden sizes 100 … 1000 into one another
    in a sweep's 3.6 in figure, and learning rates 0.00190 … 0.00210 into one line (when the count came from the
    digits of the whole numbers in view, "0")."""
    from matplotlib.ticker import MaxNLocator

    class FittingLocator(MaxNLocator):
        def __call__(self):
            axes, (low, high) = self.axis.axes, sorted(self.axis.get_view_interval())
            size = self.axis.get_major_ticks(1)[0].label1.get_fontsize()      # points (1: not the locator again)
            horizontal = self.axis is axes.xaxis
            length = (axes.bbox.width if horizontal else axes.bbox.height) * 72 / axes.figure.dpi   # points
            for bins in range(10, 0, -1):
                self.set_params(nbins=bins)
                ticks = super().__call__()
                shown = [t for t in ticks if low <= t <= high]
                if not horizontal:
                    per_label = 1.5
                else:
                    labels = self.axis.major.formatter.format_ticks(shown) if shown else []
                    per_label = 0.65 * max((len(label) for label in labels), default=1) + 1
                if len(shown) * per_label * size <= length:
                    return ticks
            return ticks

    return FittingLocator


def _whole_ticks(axis, nbins: int | None = None) -> None:
    """Ticks at whole numbers only (epochs, units, steps) on ``axis`` (ax.xaxis or ax.yaxis), after the data are
    drawn: at most ``nbins`` intervals, or as many as the labels fit (``_fitting_locator``). The integer locator needs
    two whole numbers in view, else it ticks fractions (one epoch read 0.96, 0.99 …, one unit −0.4 … 0.4), so with
    fewer the whole number in view is the tick."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=nbins, integer=True) if nbins else _fitting_locator()(integer=True))
    low, high = sorted(axis.get_view_interval())
    whole = list(range(math.ceil(low), math.floor(high) + 1))
    if len(whole) < 2:
        axis.set_ticks(whole)


def _log_ticks(axis) -> None:
    """Labels on a log ``axis`` (after the data are drawn) that stay apart: powers of ten, with 2 × and 5 × between
    them where at most one decade is in view, or, where fewer than two of those are in view, as many as fit
    (``_fitting_locator``). matplotlib labels minor ticks when less than a decade is in view: "4 × 10⁻⁴" and
    "6 × 10⁻⁴" ran into each other under a sweep's learning rates of 4.1 × 10⁻⁴ to 2.7 × 10⁻³ (until 2026-12-07)."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter, ScalarFormatter

    low, high = sorted(axis.get_view_interval())
    subs = (1.0, 2.0, 5.0) if math.log10(high / low) <= 1 else (1.0,)
    axis.set_minor_formatter(NullFormatter())
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    if sum(low <= s * 10.0**k <= high for k in decades for s in subs) >= 2:
        axis.set_major_locator(LogLocator(subs=subs))
        # (minor_thresholds infinite: every tick the locator gives is labelled, 5 × 10⁻³ as well as 2 × 10⁻³)
        axis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(math.inf, math.inf)))
    else:                                        # (a narrow range: 1.0 to 1.2 × 10⁻³)
        axis.set_major_locator(_fitting_locator()())
        axis.set_major_formatter(ScalarFormatter())


def _integer_epochs(ax) -> None:
    """Whole epochs on the x axis, at most five ticks: four-digit epochs stay apart in a panel 4.3 in wide."""
    _whole_ticks(ax.xaxis, nbins=4)
    ax.set_xlabel("epoch")


def _columns(width: float, panels: int) -> int:
    """Panels side by side for a figure ``width`` inches wide: one column below 5 in, two below 9, else all."""
    return 1 if width < 5 else min(panels, 2) if width < 9 else panels


def _with_inset(ax, epochs: Sequence[int], series: Sequence[tuple[Sequence[float], dict]], skip: int = 2):
    """Every point on ``ax``; where the first ``skip`` epochs span more than four times the range of the rest,
    an inset zooms on the later epochs (so nothing is cut and the late differences stay readable): the inset's
    axes if so, else None. In a run of 60 epochs or more its first 5 % count as its first epochs too, where the
    first ``skip`` do not dwarf the rest: a KL warm-up spreads the first rise over more epochs (a run of the
    one-hour preset, 320 epochs: its train and test ELBO spanned 141 nats, 46 after epoch 2, 12 after epoch 16)."""
    if len(epochs) <= skip + 3:
        return None
    whole = [v for values, _ in series for v in values if v == v]
    for first in sorted({skip, max(skip, len(epochs) // 20)}):
        late = [v for values, _ in series for v in values[first:] if v == v]
        if late and (max(whole) - min(whole)) > 4 * max(max(late) - min(late), 1e-9):
            skip = first
            break
    else:
        return None
    inset = ax.inset_axes([0.42, 0.12, 0.55, 0.5])
    for values, style in series:
        inset.plot(epochs[skip:], values[skip:], **style)
    inset.tick_params(labelsize=7)
    inset.grid(alpha=0.3)
    inset.set_title(f"epochs {epochs[skip]}–{epochs[-1]}", fontsize=7)
    _whole_ticks(inset.xaxis)                   # as many as fit its width, 0.55 of its axes'
    return inset


# an epoch this many times the median epoch is drawn above a cut axis (``_epoch_seconds``)
LONG_EPOCH = 5.0


def epoch_seconds_cut(seconds: Sequence[float]) -> float | None:
    """Where the seconds' axis of ``_epoch_seconds`` stops: 1.15 × the longest epoch of at most ``LONG_EPOCH`` × the
    median (NaN: not timed); None where no epoch lies above that (or fewer than three were timed). Every epoch above
    it took over ``LONG_EPOCH`` × the median (one at most that long is among those the cut is taken from)."""
    timed = [s for s in seconds if s == s]
    if len(timed) < 3:
        return None
    median = float(np.median(timed))
    top = 1.15 * max(s for s in timed if s <= LONG_EPOCH * median)
    if top <= 0 or not any(s > top for s in timed):   # (epochs of no measurable time: nothing to cut the axis at)
        return None
    return top


def _epoch_seconds(ax, epochs: Sequence[int], seconds: Sequence[float]) -> None:
    """Each epoch's seconds as a bar. Where some epochs took more than ``LONG_EPOCH`` × the median (a process
    paused and resumed, a shared machine, the first epoch's compiling), the axis stops a little above the other
    epochs and each long bar ends in a triangle at the top, the longest three labelled with their seconds: one
    paused epoch of 1153 s otherwise flattened 581 epochs of 11–18 s onto the axis."""
    ax.bar(epochs, seconds, color="C7", width=0.8)
    ax.set_ylabel("seconds of the epoch's steps")
    top = epoch_seconds_cut(seconds)
    if top is None:
        return
    cut = [(e, s) for e, s in zip(epochs, seconds) if s > top]
    ax.set_ylim(0, top)
    ax.plot([e for e, _ in cut], [top] * len(cut), marker="^", color="C3", linestyle="none", clip_on=False)
    ax.set_title(f"▲ {len(cut)} epoch{'s' * (len(cut) > 1)} above the axis", fontsize=7, color="C3", loc="left",
                 pad=9)
    span = max(epochs) - min(epochs) or 1
    labelled: list[int] = []
    for epoch, value in sorted(cut, key=lambda pair: -pair[1]):
        if len(labelled) == 3:
            break
        if all(abs(epoch - other) > 0.15 * span for other in labelled):     # labels that would overlap: the longest
            ax.annotate(f"{value:.0f} s", (epoch, top), xytext=(0, -11), textcoords="offset points", ha="center",
                        fontsize=7, color="C3")
            labelled.append(epoch)


def training_figure(metrics: Sequence[dict], width: float | None = None):
    """Panels against epoch, every epoch shown: the ELBO (train, validation, test; a star at the best validation
    ELBO, whose weights model-best.safetensors holds and early stopping counts from), its two parts
    (−reconstruction = −E_q log p(x|z) and KL), the seconds of each epoch's steps (the long ones above a cut axis,
    ``_epoch_seconds``), the learning rate and β where either changes, and with --clip-grad-norm the mean gradient
    norm before clipping and the steps clipped. An inset zooms on the later epochs where the first ones dwarf them."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in metrics]
    marker = "." if len(epochs) <= 60 else None
    schedule = len({row.get("lr") for row in metrics}) > 1 or len({row.get("beta") for row in metrics}) > 1
    clipped_rows = [row for row in metrics if row.get("gradient_norm_mean", math.nan) == row.get("gradient_norm_mean")]
    clipping = bool(clipped_rows)
    panels = 3 + schedule + clipping
    width = width or (4.3 * panels)
    cols = _columns(width, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width, (2.6 if cols == 1 else 3.4) * rows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[panels:]:
        ax.set_visible(False)
    series = [([row[key] for row in metrics], {"marker": marker, "label": label, "color": color})
              for key, label, color in (("train_elbo", "train", "C0"), ("validation_elbo", "validation", "C2"),
                                        ("test_elbo", "test", "C1")) if key in metrics[0]]
    for values, style in series:
        axes[0].plot(epochs, values, **style)
    axes[0].set_ylabel("ELBO (nats per digit)")
    inset = _with_inset(axes[0], epochs, series)
    validated = [row for row in metrics if row.get("validation_elbo", math.nan) == row.get("validation_elbo")]
    if validated:                            # the weights model-best.safetensors holds (the first of equal bests)
        best = max(validated, key=lambda row: (row["validation_elbo"], -row["epoch"]))
        for ax in (axes[0], inset) if inset is not None else (axes[0],):
            ax.plot([best["epoch"]], [best["validation_elbo"]], marker="*", markersize=11 if ax is axes[0] else 8,
                    color="C2", markeredgecolor="black", markeredgewidth=0.6, linestyle="none",
                    label=f"best validation, epoch {best['epoch']}")
    parts = []
    for split, line in (("train", "-"), ("test", "--")):
        parts.append(([-row[f"{split}_reconstruction"] for row in metrics],
                      {"linestyle": line, "color": "C0", "marker": marker, "label": f"−reconstruction, {split}"}))
        parts.append(([row[f"{split}_kl"] for row in metrics],
                      {"linestyle": line, "color": "C3", "marker": marker, "label": f"KL, {split}"}))
    for values, style in parts:
        axes[1].plot(epochs, values, **style)
    axes[1].set_ylabel("nats per digit")
    _epoch_seconds(axes[2], epochs, [row["epoch_seconds"] for row in metrics])
    if schedule:
        axes[3].plot(epochs, [row["lr"] for row in metrics], color="C4", label="learning rate")
        axes[3].set_ylabel("learning rate")
        axes[3].set_yscale("log")
        beta = axes[3].twinx()
        beta.plot(epochs, [row["beta"] for row in metrics], color="C5", linestyle="--", label="β")
        beta.set_ylabel("β (KL weight)")
        beta.set_ylim(0, max(1.0, max(row["beta"] for row in metrics)) * 1.05)
        lines = axes[3].get_lines() + beta.get_lines()
        axes[3].legend(lines, [l.get_label() for l in lines], fontsize=8, loc="lower right")
    if clipping:
        ax = axes[3 + schedule]
        clipped_epochs = [row["epoch"] for row in clipped_rows]                # where the run clipped
        ax.plot(clipped_epochs, [row["gradient_norm_mean"] for row in clipped_rows], color="C6", marker=marker,
                label="mean norm before clipping")
        ax.set_ylabel("gradient norm (mean of the steps)")
        clipped = ax.twinx()
        clipped.bar(clipped_epochs, [row["clipped_steps"] for row in clipped_rows], color="C3", alpha=0.35, width=0.8,
                    label="steps clipped")
        clipped.set_ylabel("steps clipped")
        clipped.set_ylim(0, max(1, max(row["clipped_steps"] for row in clipped_rows)) * 1.1)
        handles = ax.get_lines() + list(clipped.containers)
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper right")
    for ax in axes[:panels]:
        _integer_epochs(ax)
        ax.grid(alpha=0.3)
    if inset is not None:                                           # the legend as in plot_elbo
        inset.legend(fontsize=7, loc="best")
    else:
        axes[0].legend(fontsize=8, loc="best")
    axes[1].legend(fontsize=7)
    _tight_layout(fig)
    return fig


def histogram_figure(values: np.ndarray, xlabel: str, title: str, width: float | None = None):
    plt = _pyplot()
    width = width or 6.0
    fig, ax = plt.subplots(figsize=(width, width * 0.55))
    ax.hist(values, bins=60, color="C0", alpha=0.85)
    ax.axvline(float(np.mean(values)), color="black", linewidth=1, label=f"mean {np.mean(values):.2f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test digits")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def digit_rows_figure(rows: Sequence[np.ndarray], labels: Sequence[str], title: str, width: float | None = None):
    """Rows of digits ((n, 784) each, values in [0, 1]) with a label on the left of each row (legible: 9 pt at the
    natural width)."""
    plt = _pyplot()
    cols = max(len(r) for r in rows)
    natural = (cols * 0.62 + 2.2, len(rows) * 0.7 + 0.6)
    scale = (width / natural[0]) if width else 1.0
    fig, axes = plt.subplots(len(rows), 1, figsize=(natural[0] * scale, natural[1] * scale), squeeze=False)
    for ax, images, label in zip(axes[:, 0], rows, labels):
        ax.imshow(image_grid(np.asarray(images), 1, cols), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=max(5.0, 9 * scale))
        for spine in ax.spines.values():
            spine.set_visible(False)
    title_size = max(6.0, 10 * scale)
    axes[0, 0].set_title(title, fontsize=title_size)
    # room above the rows for the title and its pad (at 3.25 in the default top margin was 7 of its 12 points)
    fig.subplots_adjust(top=max(0.5, 1 - (title_size + 9) / 72 / fig.get_figheight()))
    return fig


KL_FLOOR = 1e-5          # the KL and Cov_x E_q[u] of a collapsed unit are drawn at this value on the log axes


def kl_figure(layers: Sequence[dict], width: float | None = None):
    """Per stochastic layer, every unit visible on log axes: its mean KL (left; bars with SVG ids kl-unit-L-I) and
    the variance over digits of its posterior mean Cov_x E_q[u] (right) with the 0.01 line of the active-unit
    criterion; active units blue, inactive grey. Values below 1e-5 are drawn at 1e-5. A layer whose activity was
    not counted (of one digit, no variance over digits) is all grey, its right panel saying so."""
    plt = _pyplot()
    width = width or 11.0
    cols = _columns(width, 2)
    per_layer = 2 // cols
    fig, axes = plt.subplots(len(layers) * per_layer, cols, figsize=(width, 2.5 * len(layers) * per_layer),
                             squeeze=False)
    panels = axes.reshape(len(layers), 2)
    for (kl_ax, var_ax), layer in zip(panels, layers):
        counted = layer["active"] is not None
        active = set(layer["active"] or ())
        units = np.arange(layer["latent"])
        colours = ["C0" if i in active else "0.7" for i in units]
        title = (f"layer {layer['layer']}: {layer['active_units']} of {layer['latent']} units active (blue), "
                 if counted else f"layer {layer['layer']}: active units not counted, ") + f"KL {layer['kl']:.2f} nats"
        if layer.get("kl_per_dimension") is None:
            kl_ax.text(0.5, 0.5, "no per-unit KL:\nq or p does not factorise", ha="center", va="center",
                       transform=kl_ax.transAxes, fontsize=9)
            kl_ax.set_xticks([])
            kl_ax.set_yticks([])
        else:
            bars = kl_ax.bar(units, np.maximum(np.asarray(layer["kl_per_dimension"]), KL_FLOOR), color=colours)
            for i, bar in enumerate(bars):
                bar.set_gid(f"kl-unit-{layer['layer']}-{i}")
            kl_ax.set_yscale("log")
            kl_ax.set_ylabel("KL (nats)")
            kl_ax.grid(alpha=0.3, axis="y")
            kl_ax.set_xlabel("latent unit")
        kl_ax.set_title(title, fontsize=9)
        if counted:
            var_ax.bar(units, np.maximum(np.asarray(layer["posterior_mean_variance"]), KL_FLOOR), color=colours)
            var_ax.axhline(1e-2, color="C3", lw=1, ls="--", label="0.01: active above")
            var_ax.set_yscale("log")
            var_ax.set_ylabel("Cov_x E_q[u]")
            var_ax.set_xlabel("latent unit")
            var_ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
            var_ax.grid(alpha=0.3, axis="y")
        else:
            var_ax.text(0.5, 0.5, "no Cov_x E_q[u]: a variance over\ndigits needs two, and there is one",
                        ha="center", va="center", transform=var_ax.transAxes, fontsize=9)
            var_ax.set_xticks([])
            var_ax.set_yticks([])
        shown = [ax for ax, drawn in ((kl_ax, layer.get("kl_per_dimension") is not None), (var_ax, counted)) if drawn]
        for ax in shown:
            # units are whole numbers: each of a small layer, else as the locator spaces them
            if len(units) <= 16:
                ax.set_xticks(units)
            else:
                _whole_ticks(ax.xaxis)
    _tight_layout(fig)
    return fig


def scatter_2d_figure(points: np.ndarray, labels: np.ndarray, title: str, axis_labels: tuple[str, str] = ("", ""),
                      width: float | None = None, most: int = 3000):
    """Points (N, 2) coloured by digit class 0–9: at most ``most`` of them (a fixed random subset), small and
    translucent, so that the classes can be told apart where they overlap."""
    plt = _pyplot()
    if len(points) > most:
        keep = np.random.default_rng(0).choice(len(points), most, replace=False)
        points, labels = points[keep], labels[keep]
        title += f" ({most} of them shown)"
    width = width or 5.6
    fig, ax = plt.subplots(figsize=(width, width * 0.85))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=5, alpha=0.45,
                         linewidths=0)
    cbar = fig.colorbar(scatter, ax=ax, ticks=range(10))
    cbar.set_label("digit")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.tick_params(labelsize=7)
    return fig


def curves_figure(runs: Sequence[tuple[str, Sequence[dict]]], width: float | None = None, split: str = "test"):
    """The ELBO on ``split``'s digits (solid; a run without a validation split has none of them) and the train ELBO
    (dotted) against epoch for several runs, one colour each, every epoch shown (where the first ones dwarf the
    rest, an inset zooms on the later epochs of every run's solid curve, or of the train curves where no run has
    one)."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    width = width or 9.0
    key = f"{split}_elbo"
    # the legend beside the axes holds a row of 9-point text (about 0.2 in) per run and two more: taller than the
    # axes from 17 runs on, where the figure grows with it (until 2026-12-07 tight_layout shrank the axes
    # instead, to a strip at 30 runs, and gave up at 60 with a warning, the legend running past the figure)
    fig, ax = plt.subplots(figsize=(width, max(width * 0.5, 0.21 * (len(runs) + 2) + 0.6)))
    colours = run_colours(len(runs))
    # each run's line thinner than the one before: where two runs' curves coincide (a run beside its bf16 twin, a run
    # compared with itself) the earlier shows as a border around the later (until 2026-12-07 it was hidden under it)
    # (widths for the 9-inch page; a narrower figure, one column of a paper, scales them down by √ of its share)
    widths = (np.linspace(3.5, 1.5, len(runs)) if len(runs) > 1 else np.array([1.5])) * min(1.0, width / 9.0) ** 0.5
    styles = [{"color": colour, "linewidth": w, "markersize": 2 * w + 1} for colour, w in zip(colours, widths)]
    for index, (name, metrics) in enumerate(runs):
        epochs = [row["epoch"] for row in metrics]
        marker = "." if len(epochs) <= 60 else None          # as in training_figure: a run of one epoch is a point
        if all(row.get(key) is not None for row in metrics):
            ax.plot(epochs, [row[key] for row in metrics], marker=marker, label=f"{name}, {split}", **styles[index])
        ax.plot(epochs, [row["train_elbo"] for row in metrics], ":", marker=marker, label=f"{name}, train",
                **styles[index])
    epochs = sorted({row["epoch"] for _, metrics in runs for row in metrics})
    solid = [(i, m) for i, (_, m) in enumerate(runs) if all(row.get(key) is not None for row in m)]
    zoomed = key if solid else "train_elbo"
    values = [(i, {row["epoch"]: row[zoomed] for row in m}) for i, m in (solid or enumerate(r[1] for r in runs))]
    _with_inset(ax, epochs, [([by_epoch.get(e, math.nan) for e in epochs], styles[i])       # NaN: not drawn
                             for i, by_epoch in values])
    _integer_epochs(ax)
    ax.set_ylabel("ELBO (nats per digit)")
    ax.grid(alpha=0.3)
    # one entry per run (its colour), then what solid and dotted mean: two per run ran past the axes' height
    handles = [Line2D([], [], color=style["color"], linewidth=style["linewidth"], label=name)
               for style, (name, _) in zip(styles, runs)]
    handles += [Line2D([], [], color="0.35", label=f"{split} ELBO")] if solid else []
    handles += [Line2D([], [], color="0.35", linestyle=":", label="train ELBO")]
    ax.legend(handles=handles, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _tight_layout(fig)
    return fig


def run_colours(n: int) -> list:
    """A colour for each of ``n`` runs, all told apart: matplotlib's ten (C0 … C9) up to ten runs (they repeated from
    the eleventh); up to twenty, tab20's light shades of the same hues after them; beyond, evenly along turbo."""
    import matplotlib

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        tab20 = matplotlib.colormaps["tab20"].colors              # dark, light, dark, …: the dark ones are C0 … C9
        return [tab20[2 * i] for i in range(10)] + [tab20[2 * i + 1] for i in range(n - 10)]
    return [matplotlib.colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]


def save_vector(fig, path: Path) -> None:
    """``fig`` as PDF (TrueType fonts embedded, type 42) or SVG (text kept as text, so that its labels can be
    searched and edited), by the suffix of ``path``, at its exact size with everything it draws inside it
    (``fit_inside``); closes it."""
    import matplotlib

    with matplotlib.rc_context({"pdf.fonttype": 42, "svg.fonttype": "none"}), _every_script_drawn(fig):
        fit_inside(fig)                               # (with the texts' fonts it will draw them in)
        _save(fig, path, tight=False)


def fit_inside(fig, rounds: int = 6) -> None:
    """Lay ``fig`` out so that all it draws lies inside its size: a figure for a paper keeps its width (3.25 in, one
    column), where long titles, axis labels and legends ran off its edges (they were cut off in the PDF). Each
    round lays it out (tight_layout, or its constrained layout), then wraps every sentence that runs off an edge at
    its spaces (to the room from its anchor to the edges), or, where none does, scales every font by how far the
    drawing overflows (to 60 % at most a round); the figure's size never changes. A figure that fits is left as
    its function laid it out."""
    import textwrap
    import warnings

    from matplotlib.layout_engine import ConstrainedLayoutEngine
    from matplotlib.text import Text

    def lay_out() -> None:
        if constrained:                               # constrained layout lays the figure out as it draws
            fig.draw_without_rendering()
            return
        with warnings.catch_warnings():               # "not compatible with tight_layout": it still helps
            warnings.simplefilter("ignore", UserWarning)
            fig.tight_layout()                        # (inside save_vector's _every_script_drawn: the texts' fonts)

    constrained = isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)   # (tight_layout leaves a placeholder)
    for round_ in range(rounds):
        if round_ or constrained:
            lay_out()
        renderer = fig.canvas.get_renderer()
        width, height = fig.bbox.width, fig.bbox.height
        drawn = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)        # pixels, all it draws
        # two pixels inside: a layout engine lays the figure out again as the file is written, a little differently
        if drawn.x0 >= 2 and drawn.y0 >= 2 and drawn.x1 <= width - 2 and drawn.y1 <= height - 2:
            return
        if not round_:
            continue                                  # laid out anew before anything is wrapped or scaled
        wrapped = False
        for text in fig.findobj(lambda artist: isinstance(artist, Text) and artist.get_visible()):
            box = text.get_window_extent(renderer)
            vertical = abs(text.get_rotation() % 180 - 90) < 1
            low, high, size = (box.y0, box.y1, height) if vertical else (box.x0, box.x1, width)
            # the room from where it is anchored to the edges: a label centred on its axes stays centred
            anchor = "center" if vertical else text.get_horizontalalignment()
            room = {"left": size - low, "right": high}.get(anchor, 2 * min((low + high) / 2, size - (low + high) / 2))
            room -= 6
            words = text.get_text()
            runs_off = low < 2 or high > size - 2
            if runs_off and room < high - low and " " in words and "$" not in words:
                longest = max(len(line) for line in words.splitlines())
                text.set_text(textwrap.fill(" ".join(words.split()),
                                            max(8, int(longest * max(room, 0.3 * size) / (high - low)))))
                wrapped = True
        if not wrapped:
            scale = max(0.6, min(1.0, width / drawn.width, height / drawn.height) * 0.97)
            for text in fig.findobj(Text):
                text.set_fontsize(text.get_fontsize() * scale)
            for ax in fig.axes:                       # and the tick labels a later layout makes
                for axis in (ax.xaxis, ax.yaxis):
                    labels = axis.get_ticklabels()
                    if labels:
                        axis.set_tick_params(which="both", labelsize=labels[0].get_fontsize())
    lay_out()                                         # after the last round's wrapping or scaling


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
    _whole_ticks(ax.xaxis)              # slots: one trial finished was ticked −0.04 … 0.04
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _tight_layout(fig)
    return fig


def sweep_parameter_figure(name: str, values: Sequence, objective: Sequence[float], label: str, log: bool,
                           order: Sequence[str] | None = None):
    """One searched parameter against the objective of the complete trials (choices spread on their own axis, in
    ``order`` where given: the spec's, as the texts ``str(value)``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 3.0))
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        ax.scatter(values, objective, color="C0")
        if log:
            ax.set_xscale("log")
            _log_ticks(ax.xaxis)
        elif all(isinstance(v, int) for v in values):         # whole numbers (steps, components): whole ticks
            _whole_ticks(ax.xaxis)
        else:                                                 # rates: as many as their labels fit
            ax.xaxis.set_major_locator(_fitting_locator()())
    else:
        seen = {str(v) for v in values}
        names = [n for n in order if n in seen] if order is not None else sorted(seen)
        ax.scatter([names.index(str(v)) for v in values], objective, color="C0")
        # choices written out (lists of widths) are long: slanted when together they would not fit side by side
        slanted = sum(len(n) for n in names) > 24
        ax.set_xticks(range(len(names)), names, fontsize=7 if slanted else 8, rotation=30 if slanted else 0,
                      ha="right" if slanted else "center")
        ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xlabel(name)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    _tight_layout(fig)
    return fig


def importance_figure(importances: dict[str, float]):
    """Optuna's parameter importances as horizontal bars (they sum to 1)."""
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(5.5, 0.5 + 0.45 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.set_xlabel("importance (PED-ANOVA, sums to 1)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3, axis="x")
    _tight_layout(fig)
    return fig


def gaps_figure(entries: Sequence[tuple[str, dict]], width: float | None = None):
    """Where the nats go, one stacked bar per run: from ELBO[q] up to log p̂(x), the amortisation gap (to ELBO[q*])
    and the approximation gap (the rest), nats per digit; each bar's sum under its name (their standard errors are
    in the table the figure goes with)."""
    plt = _pyplot()
    width = width or 6.5
    # constrained layout with the legend outside below: beside a narrow axes (3.25 in, one column) tight_layout
    # squeezed the bars to a hairline to make room for a legend anchored under them
    fig, ax = plt.subplots(figsize=(width, 2.0 + 0.55 * len(entries)), layout="constrained")
    names = [name for name, _ in entries]
    amortisation = [g["amortisation_gap"]["mean"] for _, g in entries]
    approximation = [g["approximation_gap"]["mean"] for _, g in entries]
    y = np.arange(len(entries))
    ax.barh(y, amortisation, color="C1", label="amortisation gap: ELBO[q*] − ELBO[q]")
    # a negative approximation gap (log p̂(x) below ELBO[q*]: IWAE-K not converged) hatched, drawn back over the
    # amortisation bar from its end
    ax.barh(y, np.maximum(approximation, 0), left=np.maximum(amortisation, 0), color="C0",
            label="approximation gap: log p̂(x) − ELBO[q*]")
    negative = [i for i, a in enumerate(approximation) if a < 0]
    if negative:
        ax.barh(negative, [approximation[i] for i in negative], left=[max(amortisation[i], 0) for i in negative],
                color="none", edgecolor="C0", hatch="///",
                label="approximation gap < 0: log p̂(x) below ELBO[q*], IWAE-K not converged")
    # each bar's sum under its name, not right of the bar, where a fixed margin of the axis did not hold it in a
    # column-wide figure and the text ran off the figure
    ax.set_yticks(y, [f"{name}\n{a:.2f} {'−' if b < 0 else '+'} {abs(b):.2f} = {a + b:.2f}"
                      for name, a, b in zip(names, amortisation, approximation)], fontsize=8)
    ax.set_xlabel("nats per digit below log p̂(x), from the encoder's ELBO[q]")
    fig.legend(fontsize=7, loc="outside lower center", ncol=1, frameon=False)
    ax.grid(alpha=0.3, axis="x")
    # what the bars cover: a negative amortisation gap left of 0, a negative approximation gap back from its end
    low = min(min(0, a, max(a, 0) + b) for a, b in zip(amortisation, approximation))
    high = max(max(a, 0) + max(b, 0) for a, b in zip(amortisation, approximation))
    margin = 0.05 * (high - low) + 0.2
    ax.set_xlim(low - margin * (low < 0), high + margin)
    ax.xaxis.set_major_locator(_fitting_locator()())            # as many ticks as their labels fit
    return fig


def k_curve_figure(points: Sequence[dict], width: float | None = None):
    """IWAE-K against K on nested draws, with ± one standard error over digits."""
    plt = _pyplot()
    width = width or 5.5
    fig, ax = plt.subplots(figsize=(width, width * 0.6))
    ks = [p["k"] for p in points]
    ax.errorbar(ks, [p["mean"] for p in points], yerr=[p["stderr"] or 0 for p in points], marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples; nested draws)")
    ax.set_ylabel("IWAE-K, mean log p̂(x) (nats)")
    ax.grid(alpha=0.3, which="both")
    _tight_layout(fig)
    return fig


def latent_heatmap_figure(history: Sequence[dict], width: float | None = None, one_draw_overcounts: bool = False):
    """Per stochastic layer, units × epochs: the mean KL of each unit over training (log colour scale; the
    variance of its posterior mean where the layer has no per-unit KL), collapsed units dark. Each title says how
    its active units were counted where not from the exact E_q[u|x]: two draws' covariance on n digits, or
    (``one_draw_overcounts``: a model whose means depend on the draws, recorded before the second draw) one draw's
    variance, which counts the draw's noise as activity (evaluation.elbo_summary)."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    layers = len(history[0]["layers"])
    width = width or 10.0
    fig, axes = plt.subplots(layers, 1, figsize=(width, 0.9 + 2.4 * layers), squeeze=False)
    epochs = [entry["epoch"] for entry in history]
    for index, ax in enumerate(axes[:, 0]):
        per_unit = [entry["layers"][index] for entry in history]
        use_kl = per_unit[-1]["kl"] is not None
        last = per_unit[-1]
        if not use_kl and last["posterior_mean_variance"] is None:    # one test digit: evaluation.unit_activity
            ax.text(0.5, 0.5, f"layer {index + 1}: no per-unit KL, and no Cov_x E_q[u]\n(a variance over digits "
                    "needs two; the run evaluates one test digit)", ha="center", va="center", transform=ax.transAxes,
                    fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        grid = np.array([(layer["kl"] if use_kl else layer["posterior_mean_variance"]) for layer in per_unit]).T
        image = ax.imshow(np.maximum(grid, 1e-5), aspect="auto", origin="lower", cmap="viridis",
                          norm=LogNorm(vmin=1e-4, vmax=max(1e-3, float(grid.max()))),
                          extent=(epochs[0] - 0.5, epochs[-1] + 0.5, -0.5, grid.shape[0] - 0.5), interpolation="nearest")
        bar = fig.colorbar(image, ax=ax)
        bar.set_label("KL (nats)" if use_kl else "Cov_x E_q[u]")
        ax.set_ylabel(f"layer {index + 1}: unit")
        _whole_ticks(ax.yaxis)
        _integer_epochs(ax)
        how = ("" if last["active_units"] is None else
               f" (Cov_x E_q[u] from two draws per digit, {last['variance_digits']} digits)"
               if last.get("variance_draws") == 2 else
               " (recorded from one draw per digit: may count the draws' noise as activity)"
               if one_draw_overcounts and "variance_draws" not in last else "")
        counted = (f"{last['active_units']} of {grid.shape[0]} units active at epoch {epochs[-1]}"
                   if last["active_units"] is not None else f"active units not counted at epoch {epochs[-1]} "
                   "(Cov_x E_q[u] needs two digits; the run evaluates one)")
        ax.set_title(f"layer {index + 1}: {counted}{how}", fontsize=9)
    _tight_layout(fig)
    return fig
