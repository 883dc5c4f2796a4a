"""`vaelab report` and `vaelab compare`: self-contained HTML pages (Jinja2 templates in templates/, every
picture embedded as a PNG data URI, no request to any server) and the terminal table of a comparison."""

from __future__ import annotations

import base64
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vaelab import checkpoint as ckpt
from vaelab import plots
from vaelab.config import UNUSED
from vaelab.errors import UsageError
from vaelab.evaluation import SECOND_DRAW_DIGITS, draws_move_means, reconstructions, summarize
from vaelab.gaps import gap_warning
from vaelab.laplace import STALLED_CAUSE
from vaelab.presets import changed_fields, changed_mark, preset_label
from vaelab.runs import (RunInfo, digits_label, distinct_labels, estimator_label, format_duration,
                         of_best_weights, per_digit, pictured_weights, read_run, stale_weights,
                         uncheckpointed_changes, weights_label)
from vaelab.tables import plural, shell_word, text_table

# Pairs of digit classes whose interpolations the report shows (through the latent means).
INTERPOLATION_PAIRS = ((0, 1), (2, 7), (3, 8), (4, 9), (5, 6))
# what the latent section takes from each layer of an evaluation (evaluation.latent_statistics writes them all)
PAGE_LAYER_FIELDS = {"layer", "latent", "active_units", "active", "posterior_mean_variance", "kl_per_dimension", "kl"}


def _environment():
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader("vaelab", "templates"),
                                     autoescape=jinja2.select_autoescape(["html", "j2"]),
                                     undefined=jinja2.StrictUndefined)
    environment.filters["shell_word"] = shell_word            # a path in a command to paste: quoted where needed
    environment.filters["plural"] = plural                    # {{ n | plural("test digit") }}: "1 test digit", "2 …s"
    environment.filters["code_spans"] = _code_spans           # text's `commands` as <code>, the rest escaped
    return environment


def _code_spans(text: str):
    """``text`` for a page: escaped, with each `…` (a command in the terminal's text) set as <code>…</code>."""
    import markupsafe

    parts = str(markupsafe.escape(text)).split("`")
    return markupsafe.Markup("".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts)))


def data_uri(fig) -> str:
    return "data:image/png;base64," + base64.b64encode(plots.figure_png(fig)).decode()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


@dataclass
class Figure:
    title: str
    uri: str
    note: str = ""
    key: str = ""
    wide: bool = False             # rows of digits: the page's full width, so that their labels stay legible


class FigureSet:
    """The page's figures, each made by a function of its width in inches (None: the page's size): embedded as
    PNG, and, with ``directory``, also written there as PDF and SVG for a single column (3.25 in) and a full
    width (6.75 in), fonts embedded (`vaelab report RUN --figures DIR`); ``raster`` ones as 300-dpi PNG too."""

    WIDTHS = {"column": 3.25, "full": 6.75}

    def __init__(self, directory: Path | None = None, bar=None):
        self.directory = directory
        self.written: list[Path] = []
        self.bar = bar                  # a progress bar the figure being made is shown on (tqdm), or None

    def make(self, key: str, title: str, build, note: str = "", raster: bool = False, wide: bool = False) -> Figure:
        if self.bar is not None:
            self.bar.set_postfix_str(title)
        if self.directory is not None:
            for name, width in self.WIDTHS.items():
                for suffix in ("pdf", "svg"):
                    path = self.directory / f"{key}-{name}.{suffix}"
                    plots.save_vector(build(width), path)
                    self.written.append(path)
            if raster:
                path = self.directory / f"{key}.png"
                plots._save(build(None), path, dpi=300)
                self.written.append(path)
        figure = Figure(title, data_uri(build(None)), note, key, wide)
        if self.bar is not None:
            self.bar.update()
        return figure


# ------------------------------------------------------------------------------------------------
# The report of one run.


@torch.no_grad()
def _latent_views(model, images: torch.Tensor, labels: np.ndarray, layers: list[dict],
                  figures: FigureSet) -> list[Figure]:
    """Per stochastic layer: PCA (and t-SNE/UMAP when installed) of the posterior means with the variance each
    component explains, traversals of the most informative active units from several digits, interpolations
    between digits of different classes."""
    out = []
    x = images.float()
    full = model.posterior_start(x)                                     # (N, D) every layer's mean under q
    means = _posterior_means(model, x)                                  # per layer (N, d_l)
    offsets = np.cumsum([0, *model.config.latent])
    starts = [int(np.flatnonzero(labels == c)[0]) for c in (0, 4, 7) if (labels == c).any()][:3] or [0]
    for index, mean in enumerate(means):
        layer, z_name = layers[index], f"z{index + 1}"
        centred = mean - mean.mean(0)
        if mean.shape[1] == 1:          # one unit: its posterior mean against the digit class (no plane to project to)
            jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(mean))
            points = np.stack([centred[:, 0].numpy(), labels + jitter], 1)
            out.append(figures.make(f"pca-layer{index + 1}", f"layer {index + 1}: posterior means of its one unit, by "
                                    f"digit", lambda w, p=points, z=z_name: plots.scatter_2d_figure(
                                        p, labels, f"E_q[{z}|x] (centred), {plural(len(p), 'test digit')}",
                                        (f"E_q[{z}|x] − its mean", "digit (jittered)"), width=w)))
            embedded = None
        else:
            _, singular, v = torch.linalg.svd(centred, full_matrices=False)
            explained = (singular.square() / singular.square().sum()).tolist() + [0.0, 0.0]
            points = (centred @ v[:2].T).numpy()
            axis_labels = (f"PC1 ({100 * explained[0]:.0f} % of the variance)", f"PC2 ({100 * explained[1]:.0f} %)")
            out.append(figures.make(f"pca-layer{index + 1}", f"layer {index + 1}: posterior means, first two "
                                    f"principal components", lambda w, p=points, a=axis_labels, z=z_name:
                                    plots.scatter_2d_figure(p, labels, f"PCA of E_q[{z}|x], "
                                                            f"{plural(len(p), 'test digit')}", a, width=w)))
            embedded = _nonlinear_embedding(mean.numpy()[:2000])
        if embedded is not None:
            name, points2 = embedded
            out.append(figures.make(f"{name.lower()}-layer{index + 1}", f"layer {index + 1}: {name} of the posterior "
                                    f"means (first 2000 digits)", lambda w, p=points2, n=name: plots.scatter_2d_figure(
                                        p, labels[:2000], n, (f"{n} 1", f"{n} 2"), width=w)))
        # the active units, most informative first (by KL where the layer has a per-unit KL, else by the spread
        # of their posterior means)
        ranking = layer["kl_per_dimension"] if layer.get("kl_per_dimension") is not None else \
            layer["posterior_mean_variance"]
        order = [] if layer["active"] is None else \
            [int(i) for i in np.argsort(-np.asarray(ranking)) if int(i) in set(layer["active"])][:4]
        spread = mean.std(0)
        steps = torch.linspace(-3, 3, 11)
        rows, names = [], []
        for dim in order:
            for start in starts:
                base = full[start]
                z = base.repeat(len(steps), 1)
                z[:, offsets[index] + dim] = base[offsets[index] + dim] + steps * spread[dim]
                rows.append(torch.sigmoid(model.decode_layer(index, z)).numpy())
                names.append(f"unit {dim}, a {labels[start]}")
        what = "largest KL" if layer.get("kl_per_dimension") is not None else "most varied posterior means"
        if rows:
            out.append(figures.make(
                f"traversals-layer{index + 1}", f"layer {index + 1}: traversals of the {len(order)} active units "
                f"with the {what}", lambda w, r=rows, n=names: plots.digit_rows_figure(
                    r, n, "each row: one unit from −3 to +3 standard deviations (over digits) around a test digit's "
                          "posterior mean", width=w),
                "Decoder means; the other units held at that digit's posterior mean.", wide=True))
        elif layer["active"] is None:
            out.append(Figure(f"layer {index + 1}: no traversals", "", "Which units are active was not counted: "
                              "Cov_x E_q[u] is a variance over digits, and there is one."))
        else:
            out.append(Figure(f"layer {index + 1}: no traversals", "", "No unit of this layer is active "
                              "(Cov_x E_q[u] ≤ 0.01 for all): varying one changes nothing the decoder uses."))
        rows, names = [], []
        for a, b in INTERPOLATION_PAIRS:
            ia, ib = np.flatnonzero(labels == a), np.flatnonzero(labels == b)
            if len(ia) and len(ib):
                t = torch.linspace(0, 1, 10).unsqueeze(1)
                z = full[ia[0]].repeat(len(t), 1)
                z[:, offsets[index]:offsets[index + 1]] = (1 - t) * mean[ia[0]] + t * mean[ib[0]]
                rows.append(torch.sigmoid(model.decode_layer(index, z)).numpy())
                names.append(f"{a} → {b}")
        if rows:
            out.append(figures.make(f"interpolations-layer{index + 1}", f"layer {index + 1}: interpolations between "
                                    f"test digits of different classes", lambda w, r=rows, n=names:
                                    plots.digit_rows_figure(r, n, "straight lines between posterior means, decoded",
                                                            width=w), wide=True))
    return out


def _posterior_means(model, x: torch.Tensor) -> list[torch.Tensor]:
    """E_q-path means per layer (each layer at the mean of q given the means of the layers it depends on)."""
    return list(model.posterior_start(x).split(list(model.config.latent), dim=-1))


def _nonlinear_embedding(points: np.ndarray):
    """UMAP if the optional package umap-learn is installed, else t-SNE from scikit-learn if installed."""
    try:
        import umap  # type: ignore

        return "UMAP", umap.UMAP(random_state=0).fit_transform(points)
    except ImportError:
        pass
    try:
        from sklearn.manifold import TSNE  # type: ignore

        return "t-SNE", TSNE(random_state=0, init="pca").fit_transform(points)
    except ImportError:
        return None


def _evaluation_section(run: RunInfo, model, images: torch.Tensor, figures: FigureSet) -> dict:
    from vaelab.data import idx_sha256

    record = run.headline_evaluation()
    section: dict[str, Any] = {"record": record, "figures": [], "rows": [], "warning": "",
                               "records": [{"file": r["file"], "split": r.get("split", "test"), "k": r["k"],
                                            "digits": r["n_examples"], "nll": _fmt(r["nll"], 2),
                                            "weights": weights_label(r), "stale": bool(r["stale"]),
                                            "headline": r is record} for r in run.evaluations],
                               "notes": run.notes,
                               # a run with a validation split keeps its best weights: those are the ones to evaluate
                               "command": f"vaelab evaluate {shell_word(run.path)}"
                                          + (" --checkpoint best" if run.best_validation else "")}
    if record is None:
        # why the records there are not a test NLL of these weights: on the validation digits, or of earlier weights
        reasons = [(any(not r["stale"] and r.get("split", "test") != "test" for r in run.evaluations),
                    "of the validation digits")] + \
            [(True, f"of {what}") for what in dict.fromkeys(stale_weights(r) for r in run.evaluations if r["stale"])]
        section["elsewhere"] = " or ".join(text for holds, text in reasons if holds)
        return section
    section["measured"] = weights_label(record)
    estimates = record.get("estimates", [])
    top = max((e["mean"] for e in estimates if e.get("mean") is not None), default=None)
    for entry in estimates:
        gap = None if top is None or entry.get("mean") is None else top - entry["mean"]
        section["rows"].append({"name": entry["name"], "mean": _fmt(entry.get("mean")),
                                "stderr": _fmt(entry.get("stderr")), "kind": entry["kind"], "gap": _fmt(gap)})
    values = per_digit(run.path, record)
    if values is None:
        section["warning"] = (f"this evaluation's per-digit values ({record['per_digit']}) are missing or damaged"
                              if record.get("per_digit") else "this evaluation has no per-digit values (written by "
                              "vaelab 0.1)") + "; evaluate again for the histogram and the worst and best digits"
        return section
    n = len(values["iwae"])
    if record.get("data_sha256") not in (None, idx_sha256(images[:n].cpu().numpy())) or n > len(images):
        section["warning"] = "the evaluation's digits are not this test set's first digits; no per-digit views"
        return section
    iwae = values["iwae"]
    section["figures"].append(figures.make("log-px-histogram", "per-digit log p(x)", lambda w: plots.histogram_figure(
        iwae, f"{estimator_label(record)} estimate of log p(x) (nats)", digits_label(record),
        width=w)))
    order = np.argsort(iwae)
    worst, best = order[:10], order[-10:][::-1]
    rows, names = [], []
    with torch.no_grad():
        for title, picked in (("worst", worst), ("best", best)):
            x = images[torch.as_tensor(picked.copy())].float()
            rows += [x.numpy(), reconstructions(model, x).numpy()]
            names += [f"{title}: digits", "reconstructions"]
    section["figures"].append(figures.make("worst-and-best", "the worst- and best-explained test digits",
                                           lambda w: plots.digit_rows_figure(
                                               rows, names, "worst: lowest log p(x) first; best: highest first", width=w),
                                           "worst log p(x): " + ", ".join(f"{iwae[i]:.1f}" for i in worst[:5])
                                           + " …; best: " + ", ".join(f"{iwae[i]:.1f}" for i in best[:5]) + " …",
                                           wide=True))
    return section


def _headline_weights(run_dir: str | Path, tries: int = 3):
    """(the run, its headline test evaluation or None, ``load_model_weights`` of the weights that evaluation measured)
    — model-best.safetensors where the best weights were evaluated, else model.safetensors — so that the page's
    number, statistics and pictures are all of one set of weights. A training that replaces the file between the
    run's reading and the load (the digest differs from the record's) makes the record stale: read again."""
    for _ in range(tries):
        run = read_run(run_dir)
        record = run.headline_evaluation()
        config, model, loaded = ckpt.load_model_weights(run.path, weights=(record or {}).get("weights") or ckpt.WEIGHTS)
        if record is None or record.get("weights_sha256") in (None, loaded.sha256):
            break
    return run, record, (config, model, loaded)


def build_report(run_dir: str | Path, data_dir: str | None = None, figures_dir: Path | None = None,
                 progress: bool = False) -> tuple[str, float, list[Path]]:
    """The HTML of the report of ``run_dir``, the seconds it took, and the files written to ``figures_dir``: with it
    every figure is also written there as PDF and SVG (``FigureSet``); without it, none. ``progress``: a bar on
    stderr naming the part being made (the latent statistics, each figure): a large model's page takes a minute.

    The pictures are of the weights the headline evaluation measured (``_headline_weights``), and the latent
    layers' statistics (active units, KL per unit, Cov_x E_q[u]) are taken from that evaluation where it covers every
    test digit (`vaelab evaluate` stores them in its record); otherwise they are computed here with 16 draws per
    digit, and the page says so."""
    from vaelab.data import load_mnist, prepare
    from vaelab.evaluation import latent_statistics

    from tqdm import tqdm

    start = time.perf_counter()
    bar = tqdm(desc=f"report of {Path(run_dir).name}", leave=False, disable=not progress, dynamic_ncols=True,
               bar_format="{desc}: figures made {n_fmt}, {elapsed}{postfix}",   # postfix: ", " and what is made now
               postfix="the weights and the test digits")
    figures = FigureSet(figures_dir, bar)
    run, record, (config, model, loaded) = _headline_weights(run_dir)
    pictured = pictured_weights(loaded, run)              # which weights the pictures and statistics below are of
    data_config = dataclasses.replace(run.config.data, test_examples=None, validation=0, train_examples=1,
                                      data_dir=data_dir or run.config.data.data_dir)
    data = prepare(load_mnist(data_config.data_dir), data_config)
    images, labels = data.test_binary, data.test_labels.numpy()
    # the evaluation's own statistics where it has all the page draws from (a record written by hand may hold only
    # what runs.LAYER_FIELDS asks; until 2026-12-06 the page then ended in a KeyError)
    if record is not None and record["n_examples"] == len(images) and record.get("layers") and \
            all(PAGE_LAYER_FIELDS <= set(layer) for layer in record["layers"]) and \
            record.get("weights_sha256") in (None, loaded.sha256):
        layers, layers_from = record["layers"], f"from {record['file']} ({plural(record['n_examples'], 'test digit')})"
        active_note = None                                     # the headline's own evaluation: it says which digits
    else:
        bar.set_postfix_str(f"the latent units' statistics on the {plural(len(images), 'test digit')}")
        layers = latent_statistics(model, images, 16, 0)
        layers_from = (f"of {pictured}, computed for this page on the {plural(len(images), 'test digit')} (16 draws "
                       f"per digit "
                       f"where a layer needs draws); `vaelab evaluate` stores them with more")
        active_note = f"computed for this page on the {plural(len(images), 'test digit')}"
        if record is not None and _active(record.get("layers") or []):   # the headline's counted them on other digits
            active_note += (f"; the evaluation above counted {_active(record['layers'])} on its "
                            f"{record['n_examples']}")
    with torch.no_grad():
        samples = model.sample(80, torch.Generator().manual_seed(0)).numpy()
    generation = [figures.make("samples", "samples from p(x)", lambda w: plots.digit_rows_figure(
        list(samples.reshape(8, 10, 784)), [""] * 8, "decoder means, z ~ p(z), seed 0", width=w), raster=True)]
    with torch.no_grad():
        x = images[:30].float()
        recon = reconstructions(model, x).numpy()
    rows = [r for i in range(3) for r in (x[10 * i:10 * i + 10].numpy(), recon[10 * i:10 * i + 10])]
    # across the page, after the others: in a grid column its row labels were drawn at 55 %, 7 px
    reconstructed = figures.make("reconstructions", "test digits and their reconstructions",
                                 lambda w: plots.digit_rows_figure(rows, ["digits", "reconstructions"] * 3,
                                                                   "decoder means at the posterior means", width=w),
                                 wide=True)
    latent = _latent_views(model, images, labels, layers, figures)
    pseudo = getattr(model.prior, "pseudo_inputs", None)
    if pseudo is not None:
        with torch.no_grad():
            u = pseudo().numpy()                                             # (K, 784)
        shown = u[:100]
        pseudo_rows = [shown[i:i + 10] for i in range(0, len(shown), 10)]    # rows of 10, the last maybe shorter
        # the prior of the top layer: p(z_L) in a hierarchy (until 2026-12-07 "p(z)" there too)
        levels = len(run.config.model.latent)
        top = "z" + ("" if levels == 1 else str(levels).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")))
        generation.append(figures.make("pseudo-inputs", f"the VampPrior's pseudo-inputs ({len(shown)} of {len(u)})",
                                       lambda w: plots.digit_rows_figure(
                                           pseudo_rows, [""] * len(pseudo_rows),
                                           f"pseudo-inputs uₖ in pixel space, p({top}) = (1/K) Σₖ q({top} | uₖ)",
                                           width=w)))
    generation.append(reconstructed)
    evaluation = _evaluation_section(run, model, images, figures)
    nats = _nats_section(run, figures, run.config.data.test_examples or len(images))
    training = [figures.make("training", "training", lambda w: plots.training_figure(run.metrics, width=w),
                             raster=True)] if run.metrics else []
    provenance = run.meta.get("provenance", {})
    changed = changed_fields(config)
    html = _environment().get_template("report.html.j2").render(
        run=run, stalled_cause=STALLED_CAUSE, config_rows=_config_rows(config, changed), provenance=provenance, changed=changed,
        started=run.meta.get("started", ""), amendments=run.meta.get("amendments", []), training=training,
        pending=uncheckpointed_changes(run),
        metrics=run.metrics[-1] if run.metrics else None,
        evaluation=evaluation, generation=generation, latent=latent, pictured=pictured,
        summary=_summary(run, record, layers, active_note), nats=nats,
        kl=figures.make("kl-per-unit", "KL and posterior-mean variance per latent unit",
                        lambda w: plots.kl_figure(layers, width=w)), layers=layers, layers_from=layers_from,
        fmt=_fmt, duration=format_duration, generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        sections=REPORT_SECTIONS)
    bar.close()
    return html, time.perf_counter() - start, figures.written


def _long_epochs_note(metrics: Sequence[dict]) -> str:
    """How much of the training time lies in the epochs drawn above the training figure's cut seconds' axis (each
    over ``plots.LONG_EPOCH`` × the median epoch: a process paused, a shared machine, compiling), so that the time is
    not read as the model's cost alone (`vampprior-2`'s 8.0 h held 4.1 h in 39 such epochs); '' where none is."""
    seconds = [float(s) if isinstance(s := row.get("epoch_seconds"), (int, float)) else math.nan for row in metrics]
    top = plots.epoch_seconds_cut(seconds)
    if top is None:
        return ""
    long = [s for s in seconds if s > top]
    median = float(np.median([s for s in seconds if s == s]))
    return (f"{format_duration(sum(long))} of it in {plural(len(long), 'epoch')} drawn above the seconds' axis below, "
            f"each over {plots.LONG_EPOCH:g} × the median epoch ({format_duration(median)}): a paused process, a "
            f"shared machine or compiling")


def _active(layers: list[dict]) -> str:
    """Active units per layer, "63 + 2 + 0"; "" where they were not counted (of one digit, no variance over
    digits: evaluation.unit_activity)."""
    if any(layer["active_units"] is None for layer in layers):
        return ""
    return " + ".join(str(layer["active_units"]) for layer in layers)


def _summary(run: RunInfo, record: dict | None, layers: list[dict], active_note: str | None = None) -> dict:
    """The results-first block: the headline NLL with what it measured, the ELBO, the bound's gap, the active
    units per layer (``active_note``: where they were counted, when not by the headline's evaluation), the epochs,
    the training time, the best validation ELBO (where there is a validation split) and the status (for a run that
    stopped early, where and why)."""
    metrics = run.metrics[-1] if run.metrics else {}
    active = _active(layers)                                 # "" where not counted: of one digit
    summary = {"status": run.status, "epochs": f"{run.epochs_done} of {run.epochs_total}",
               "time": format_duration(run.training_seconds), "time_note": _long_epochs_note(run.metrics),
               "active": active or "—",
               "active_note": active_note if active else "not counted: a variance over digits needs two",
               "latent": " + ".join(str(l["latent"]) for l in layers), "test_elbo": metrics.get("test_elbo"),
               "record": record, "best": None}
    best_epoch = 0
    if run.best_validation:                        # a validation split: the weights model-best.safetensors holds
        best_epoch, best = run.best_validation
        summary["best"] = {"epoch": best_epoch, "elbo": best,
                           "command": f"vaelab evaluate {shell_word(run.path)} --checkpoint best"}
    if run.status == "pruned":
        summary["status"] = (f"pruned by its sweep after epoch {run.epochs_done}: the median pruner found its "
                             f"validation ELBO worse than the median of the sweep's trials at that epoch")
    if run.status == "diverged":          # what diverged, and how to go on: not the plain resume, which repeats it
        summary["status"] = (f"diverged: {run.diverged['what']}; the weights are those of the last good "
                             f"checkpoint ({run.epochs_done} of {run.epochs_total} epochs); go on from it with "
                             f"{run.resume_command} --lr X (lower) or --clip-grad-norm C")
    if run.status == "stopped early":
        patience, warmup = run.config.train.early_stopping, run.config.objective.warmup_epochs
        summary["status"] = (f"stopped early: no better validation ELBO in the {plural(patience, 'epoch')} "
                             f"after epoch {max(best_epoch, warmup)} (--early-stopping {patience})")
    if record is not None:
        summary.update(nll=record["nll"], nll_stderr=record.get("nll_stderr"), elbo=record.get("elbo"),
                       elbo_stderr=record.get("elbo_stderr"),
                       what=f"{estimator_label(record)}, {digits_label(record)}, {weights_label(record)}",
                       gap=None if record.get("elbo") is None else -record["nll"] - record["elbo"])
    return summary


REPORT_SECTIONS = (("summary", "Results"), ("training", "Training"), ("evaluation", "Evaluation"),
                   ("nats", "Where the nats go"), ("generation", "Generation"), ("latent", "The latent space"),
                   ("run", "Configuration and provenance"))


def newest_with(run: RunInfo, key: str, split: str = "test") -> dict | None:
    """The newest evaluation of ``split`` of the current weights that holds ``key`` (gaps, k_curve)."""
    records = [r for r in run.evaluations if key in r and not r["stale"] and r.get("split", "test") == split]
    return max(records, key=lambda r: r.get("date") or "", default=None)


def _nats_section(run: RunInfo, figures: FigureSet, trained_test_digits: int) -> dict:
    """The gap decomposition (`evaluate --gaps`), the estimate's convergence in K (`--k-curve`) and the latent
    units over training (latent.csv: the weights after each epoch on the ``trained_test_digits`` test digits the run
    evaluates as it trains), each where the run has it."""
    headline = run.headline_evaluation()            # the hints evaluate the weights the headline NLL measured
    best = headline is not None and of_best_weights(headline)
    section: dict[str, Any] = {"figures": [], "gaps": None, "k_curve": None, "notes": [],
                               "command": f"vaelab evaluate {shell_word(run.path)}"
                                          + (" --checkpoint best" if best else "")}
    gaps = newest_with(run, "gaps")
    if gaps is not None:
        g = gaps["gaps"]
        section["gaps"] = {"record": gaps["file"], "family": g["family"], "rule": g["rule"], "digits": g["digits"],
                           "warning": gap_warning(g),
                           "converged": f"{100 * g['converged_fraction']:.1f} %", "steps": f"{g['mean_steps']:.0f}",
                           "rows": [(label, _fmt(g[key]["mean"], 2), _fmt(g[key]["stderr"], 2))
                                    for key, label in (("log_px", f"log p̂(x), {g['log_px_estimator']}"),
                                                       ("log_px_optimised", "log p̂(x), "
                                                        + g.get("log_px_optimised_estimator", "")),
                                                       ("elbo_optimised", "ELBO[q*], q optimised per digit"),
                                                       ("elbo_encoder", "ELBO[q], the encoder's q"),
                                                       ("elbo_laplace", "ELBO of the Laplace Gaussian N(z*, H⁻¹)"),
                                                       ("approximation_gap", "approximation gap"),
                                                       ("amortisation_gap", "amortisation gap")) if key in g]}
        # across the page, as the K curve below: in a grid column their labels were drawn at half their size. Not
        # where a gap's mean is null (not finite when it was written, ``records.strict_json``): its table says "—"
        # (until 2026-12-06 the figure ended the report in a TypeError)
        if None not in (g["approximation_gap"]["mean"], g["amortisation_gap"]["mean"]):
            section["figures"].append(figures.make("gaps", "where the nats go: the gap decomposition",
                                                   lambda w: plots.gaps_figure([(run.name, g)], width=w), wide=True))
        else:
            section["notes"].append(f"No figure of the gaps: {gaps['file']} holds a gap whose mean was not finite "
                                    f"(—).")
    curve = newest_with(run, "k_curve")
    if curve is not None:
        section["k_curve"] = curve["file"]
        # the points whose mean was finite when written (null: ``records.strict_json``); until 2026-12-06 a null one
        # ended the report in a TypeError, and an empty curve was drawn as an empty figure
        points = [point for point in curve["k_curve"] if point["mean"] is not None]
        if points:
            section["figures"].append(figures.make("k-curve", f"IWAE-K against K, nested draws ({curve['file']})",
                                                   lambda w: plots.k_curve_figure(points, width=w), wide=True))
        else:
            section["notes"].append(f"No figure of the convergence curve in K: {curve['file']} holds no point whose "
                                    f"mean is finite.")
    history = run.meta.get("latent") or []
    if history:
        title = (f"the latent units over training: the weights after each epoch, on the {trained_test_digits} test "
                 f"digits the run evaluates as it trains")
        overcounts = draws_move_means(run.config.model)
        if overcounts:
            title += (f"; where a layer's posterior mean depends on the draws, Cov_x E_q[u] is the covariance of two "
                      f"independent draws' means over about the first {SECOND_DRAW_DIGITS} of them (whole batches; the "
                      f"layer's title gives the count), since one draw's variance would count its own noise")
        section["figures"].append(figures.make(
            "latent-over-training", title,
            lambda w: plots.latent_heatmap_figure(history, width=w, one_draw_overcounts=overcounts), wide=True))
    return section


def _config_rows(config, changed: Sequence[str] = ()) -> list[tuple[str, str, bool]]:
    """(section.field, value, whether flags changed it from the preset's) for every field; — for none; a field the
    run never reads says so beside its value."""
    import json

    unused = config.unused()
    return [(key, ("—" if value is None else json.dumps(value))
             + (f" ({UNUSED}: {unused[key]})" if key in unused else ""), key in changed)
            for key, value in config.flat().items()]


# ------------------------------------------------------------------------------------------------
# Comparing runs.


@dataclass
class Comparison:
    runs: list[RunInfo]
    differences: list[tuple[str, list[str]]]      # field, its value in each run
    rows: list[dict[str, str]]                    # one per run
    paired: list[dict[str, str]]                  # paired NLL differences against the first run
    notes: list[str]
    gaps: list[dict] = dataclasses.field(default_factory=list)   # each run's gap decomposition, paired differences
    split: str = "test"                           # the digits the NLLs and paired differences are on
    records: list[str | None] = dataclasses.field(default_factory=list)   # per run, the record file given, or None
    unpaired: dict[str, str] = dataclasses.field(default_factory=dict)   # run → why it has no paired difference

    @property
    def what(self) -> str:
        """What is compared, for a title: "3 runs", or "2 evaluations" where records were given."""
        count = len(self.runs)
        return f"{count} {'evaluations' if any(self.records) else 'runs'}"

    @property
    def mark(self) -> str | None:
        """What the * of a preset/model cell means, where one has it (``changed_mark``)."""
        return changed_mark(row["preset"] for row in self.rows)


def compare_runs(paths: Sequence[str | Path], split: str = "test") -> Comparison:
    """The runs side by side on their headline evaluations of ``split`` (test, or validation: `evaluate --split
    validation`, for choosing among runs without touching the test set), paired against the first run. A path may
    also be one evaluation record of a run (``RUN/eval-….json``): that record is compared, whatever weights the run
    holds now (two evaluations of one run, at two epochs, paired digit by digit)."""
    for path in paths:
        if not Path(path).exists():     # said of what compare takes (it said "pass a directory written by vaelab train")
            raise UsageError(f"{path} does not exist; compare takes run directories or the eval-….json records in them")
    chosen = [_chosen_record(Path(p)) for p in paths]
    for path, (directory, file) in zip(paths, chosen):
        if file is not None and not ckpt.is_run(directory):      # said of the file given, not of its folder
            raise UsageError(f"{path} is not in a run directory ({directory} holds no config.json); compare takes "
                             f"run directories or the eval-….json records in them")
    runs = [read_run(directory) for directory, _ in chosen]
    for run, label, (_, file) in zip(runs, distinct_labels(paths), chosen):
        # two runs named h4 in different folders: one-hour-60/h4 and s35/h4; a record: vampprior-2/eval-….json
        run.label = label if file is None or "/" in label else f"{run.path.name}/{label}"
    # a field a run never reads (its prior has no components …) is "unused" there, not a value that differs: two
    # standard-prior runs never differ by K, a mixture's K beside a standard prior's shows as K against "unused"
    shown = [{key: UNUSED if key in unused else str(value) for key, value in run.config.flat().items()}
             for run, unused in ((run, run.config.unused()) for run in runs)]
    keys = sorted(set().union(*shown))
    differences = [(key, [f.get(key, "—") for f in shown]) for key in keys
                   if len({f.get(key, "—") for f in shown}) > 1 and key not in ("train.threads", "data.data_dir")]
    rows, records = [], []
    for run, (_, file) in zip(runs, chosen):
        record = run.headline_evaluation(split) if file is None else _named_record(run, file, split)
        records.append(record)
        layers = (record or {}).get("layers", [])
        # a record given by name: its weights' epoch and the training time to them, not the run's as it stands now
        epochs, seconds = (run.epochs_done, run.training_seconds) if file is None else _record_epoch(run, record)
        active = _active(layers)
        rows.append({"name": run.name, "preset": preset_label(run.config),
                     "epochs": f"{epochs}/{run.epochs_total}", "status": run.status,
                     "nll": "—" if record is None else f"{_fmt(record['nll'])} ± {_fmt(record.get('nll_stderr'))}",
                     "k": "—" if record is None else ", ".join([
                         estimator_label(record), plural(record["n_examples"], "digit" if split == "test" else
                                                         f"{split} digit"), weights_label(record)]),
                     "elbo": "—" if record is None else _fmt(record.get("elbo")),
                     "active": active or "—",
                     "time": format_duration(seconds),
                     "values": {"nll": None if record is None else record["nll"],
                                "nll_stderr": None if record is None else record.get("nll_stderr"),
                                "elbo": None if record is None else record.get("elbo"),
                                "active": active or None,
                                "estimator": None if record is None else
                                f"{estimator_label(record)} on {digits_label(record)}",
                                "weights": None if record is None else weights_label(record)}})
    paired, notes, unpaired = [], [], {}
    evaluate_split = "" if split == "test" else f" --split {split}"
    for run, record in zip(runs, records):
        notes += run.notes
        if pending := uncheckpointed_changes(run):      # its configuration differences are config.json's
            notes.append(f"{run.name}: config.json holds {'; '.join(pending)} from a resume that wrote no checkpoint "
                         f"(it diverged or was stopped first); its weights were trained with the former values")
        stale = run.stale_evaluations(split)
        if record is None and stale:
            measured = " or ".join(dict.fromkeys(stale_weights(r) for r in stale))
            notes.append(f"{run.name}: its evaluations ({', '.join(r['file'] for r in stale)}) measured {measured}, "
                         f"not the run's current ones: stale, not shown; evaluate it again "
                         f"(vaelab evaluate {shell_word(run.path)}{evaluate_split})")
    base, base_record = runs[0], records[0]
    unevaluated = all(record is None for record in records)
    if unevaluated:                                       # one line, not one per run
        notes.append(f"no paired differences: no run was evaluated on the {split} digits (vaelab evaluate "
                     f"RUN{evaluate_split})")
    for run, record in [] if unevaluated else zip(runs[1:], records[1:]):
        if base_record is None or record is None:
            notes.append(f"{run.name}: no paired difference, {'neither run was' if base_record is record else 'one run was not'} "
                         f"evaluated on the {split} digits (vaelab evaluate RUN{evaluate_split})")
            continue
        a, b = per_digit(base.path, base_record), per_digit(run.path, record)
        if why := _unpaired(base_record, record, a, b):
            notes.append(f"{run.name} against {base.name}: {why}; the NLLs are shown, not a paired difference")
            unpaired[run.name] = why
            continue
        diff = (-b["iwae"]) - (-a["iwae"])                        # NLL of run − NLL of the first run, per digit
        _, stderr = summarize(torch.from_numpy(diff))
        paired.append({"name": run.name, "base": base.name, "difference": _fmt(float(diff.mean())),
                       "stderr": _fmt(stderr), "digits": len(diff),
                       "values": (float(diff.mean()), stderr),
                       # √(s.e.₁² + s.e.₂²); of one digit neither has one (until 2026-12-06 "0.000" there)
                       "unpaired": _fmt(None if None in (base_record.get("nll_stderr"), record.get("nll_stderr")) else
                                        math.hypot(base_record["nll_stderr"], record["nll_stderr"]))})
    # the gap decompositions are of the runs' current weights: not beside a record of other weights
    return Comparison(runs, differences, rows, paired, notes,
                      _compare_gaps([run for run, (_, file) in zip(runs, chosen) if file is None], split), split,
                      [file for _, file in chosen], unpaired)


def _unpaired(base: dict, record: dict, a: dict | None, b: dict | None, extra: Sequence[tuple[bool, str]] = ()) -> str:
    """Why two evaluation records (and their per-digit values ``a``, ``b``) give no paired difference, or "" where
    they do: only what differs, and what is missing, is named. ``extra``: further settings, as (whether the two
    differ, what to say), e.g. the gap decomposition's step budget."""
    digits = base.get("data_sha256"), record.get("data_sha256")
    settings = [text for differs, text in (
        (record["k"] != base["k"], f"K {base['k']} vs {record['k']}"),
        (record["n_examples"] != base["n_examples"], f"{base['n_examples']} vs {plural(record['n_examples'], 'digit')}"),
        (record["precision"] != base["precision"], f"{base['precision']} vs {record['precision']}"),
        # the digits of a batch share their draws (common random numbers, ``evaluation._iwae_parts``): two seeds'
        # noise does not cancel digit by digit, and the paired standard error, which takes the digits' differences
        # as independent, missed it (identical weights, K = 10: −1.31 ± 0.29 nats; until 2026-12-06)
        (record.get("seed") != base.get("seed"), f"seed {base.get('seed')} vs {record.get('seed')}"),
        (record["n_examples"] == base["n_examples"] and None not in digits and digits[0] != digits[1], "other digits"),
        *extra) if differs]
    missing = [text for absent, text in ((None in digits, "a record without its digits' checksum"),
                                         (a is None or b is None, "no per-digit values (missing or damaged)"))
               if absent]
    why = [f"evaluated with different settings ({', '.join(settings)})"] if settings else []
    return "; ".join(why + missing)


def _chosen_record(path: Path) -> tuple[Path, str | None]:
    """(the run directory, the record file's name) of a path given to compare: a run, or one record of a run."""
    if path.suffix == ".json" and path.is_file():
        return path.parent, path.name
    return path, None


def _named_record(run: RunInfo, file: str, split: str) -> dict:
    """The evaluation record ``file`` of ``run``, of ``split``: a UsageError where it is not one."""
    record = next((r for r in run.evaluations if r["file"] == file), None)
    if record is None:
        why = next((note for note in run.notes if file in note), f"{run.path / file} is not an evaluation record")
        raise UsageError(f"{why}; compare takes run directories or their eval-….json records")
    if record.get("split", "test") != split:
        raise UsageError(f"{run.path / file} is an evaluation of the {record.get('split', 'test')} digits; compare it "
                         f"with --split {record.get('split', 'test')}")
    return record


def _compare_gaps(runs: list[RunInfo], split: str = "test") -> list[dict]:
    """The gap decompositions (`evaluate --gaps`) of ``split`` of the runs that have one for their current weights,
    side by side; against the first such run, the paired differences of both gaps over the same digits."""
    entries = []
    for run in runs:
        record = newest_with(run, "gaps", split)
        if record is None:
            continue
        values = per_digit(run.path, record, ("iwae", "elbo_optimised", "elbo_encoder"))
        g = record["gaps"]
        entries.append({"name": run.name, "gaps": g, "record": record, "values": values,
                        "with": f"{g['log_px_estimator']}, {plural(g['digits'], 'digit')}", "warning": gap_warning(g),
                        "cells": {key: f"{_fmt(g[key]['mean'], 2)} ± {_fmt(g[key]['stderr'], 2)}"
                                  for key in ("log_px", "elbo_optimised", "elbo_encoder", "approximation_gap",
                                              "amortisation_gap")}})
    if not entries:
        return []
    base = entries[0]
    for entry in entries[1:]:
        a, b = base["values"], entry["values"]
        # as compare's NLLs (above), and with the same optimiser's budget for q* (until 2026-12-06 paired with
        # other budgets, other precisions, and records without their digits' checksum)
        steps = base["gaps"].get("max_steps"), entry["gaps"].get("max_steps")
        if why := _unpaired(base["record"], entry["record"], a, b,
                            [(steps[0] != steps[1], f"q* in at most {steps[0]} vs {plural(steps[1], 'step')}")]):
            entry["paired"] = f"not paired with {base['name']}: {why}"
            continue
        cells = []
        for name, diff in (("approximation", (b["iwae"] - b["elbo_optimised"]) - (a["iwae"] - a["elbo_optimised"])),
                           ("amortisation", (b["elbo_optimised"] - b["elbo_encoder"])
                            - (a["elbo_optimised"] - a["elbo_encoder"]))):
            mean, stderr = summarize(torch.from_numpy(diff))
            cells.append(f"{name} {mean:+.2f} ± {_fmt(stderr, 2)}")
        entry["paired"] = f"minus {base['name']}, paired over {len(a['iwae'])} digits: " + ", ".join(cells)
    return entries


def comparison_table(comparison: Comparison) -> str:
    """The terminal view: the runs, what differs between their configs, the paired differences."""
    keys = ["name", "preset", "epochs", "status", "nll", "k", "elbo", "active", "time"]
    lines = text_table(["run", "preset/model", "epochs", "status", "NLL ± s.e.", "evaluated with", "ELBO",
                        "active units", "training time"], [[r[k] for k in keys] for r in comparison.rows], rule=True)
    if mark := comparison.mark:
        lines.append(mark)
    if comparison.differences:
        lines += ["", "config differences:"] + text_table(["field"] + [r.name for r in comparison.runs],
                                                          [[k, *v] for k, v in comparison.differences], rule=True)
    else:
        lines += ["", "the configs do not differ (apart from threads and the data directory)"]
    for p in comparison.paired:
        lines.append(f"paired: NLL({p['name']}) − NLL({p['base']}) = {p['difference']} ± {p['stderr']} nats over "
                     f"{plural(p['digits'], 'digit')} (unpaired standard error {p['unpaired']})")
    if comparison.gaps:
        lines += ["", "where the nats go (evaluate --gaps):"] + text_table(
            ["run", "log p̂(x) by", "log p̂(x)", "ELBO[q*]", "ELBO[q]", "approximation gap", "amortisation gap",
             "paired"],
            [[g["name"], g["with"], *(g["cells"][k] for k in ("log_px", "elbo_optimised", "elbo_encoder",
                                                              "approximation_gap", "amortisation_gap")),
              g.get("paired", "—")] for g in comparison.gaps], rule=True)
        lines += [f"{g['name']}: warning: {g['warning']}" for g in comparison.gaps if g["warning"]]
    lines += comparison.notes
    return "\n".join(lines)


def comparison_export(comparison: Comparison, kind: str) -> str:
    """The comparison as a table to paste (``kind`` latex, markdown or csv): one row per run with its NLL ± s.e.,
    ELBO, active units, training hours and the paired NLL difference against the first run (same digits, K and
    seed)."""
    from vaelab.tables import render_table

    paired = {p["name"]: p["values"] for p in comparison.paired}
    first = comparison.runs[0].name
    rows = []
    for run, row in zip(comparison.runs, comparison.rows):
        v = row["values"]
        difference = (0.0, None) if run.name == first and v["nll"] is not None else paired.get(run.name, (None, None))
        rows.append([run.name, row["preset"], v["nll"], v["nll_stderr"], v["elbo"], v["active"], row["time"],
                     difference[0], difference[1]])
    header = ["run", "model", "NLL", "± s.e.", "ELBO", "active units", "training",
              f"NLL − NLL({first}), paired", "± s.e."]
    # what each number measured, in the caption a table pasted into a paper carries: the estimator and digits, once
    # where every run shares them, else each run's by name (until 2026-12-07 the distinct ones in alphabetical
    # order, "IWAE-1000 on 50 test digits; IWAE-300 on 10000 test digits", whichever rows they were), the weights
    # of each run, and why a run has no paired difference (its cell "--" was not explained)
    by_run = [(row["name"], row["values"]) for row in comparison.rows]
    evaluated = [(name, v) for name, v in by_run if v["estimator"]]
    if evaluated:
        estimators = {v["estimator"] for _, v in evaluated}
        measured = estimators.pop() if len(estimators) == 1 else \
            ", ".join(f"{v['estimator']} ({name})" for name, v in evaluated)
        caption = (f"NLL and ELBO in nats, {measured}; weights: "
                   + ", ".join(f"{v['weights']} ({name})" for name, v in evaluated)
                   + "".join(f"; {name} not evaluated" for name, v in by_run if not v["estimator"])
                   + "; the paired difference is over the same digits, with the same K and seed of the draws"
                   + "".join(f"; {name} not paired with {first}: {why}" for name, why in comparison.unpaired.items()))
    else:
        caption = "not evaluated"
    if comparison.mark:         # a table pasted into a paper has no `vaelab report` beside it
        caption += "; * the run's flags changed fields of its preset"
    if kind == "csv":           # no caption there: each row says what it measured (estimator, digits, weights)
        header, caption = [*header, "measured"], ""      # and why it has no paired difference, where it has none
        rows = [[*values, None if row["values"]["nll"] is None else row["k"] + (
                    f"; not paired with {first}: {why}" if (why := comparison.unpaired.get(row["name"])) else "")]
                for values, row in zip(rows, comparison.rows)]
        # nor a note for the *: the cell says it ("seed, fields changed by its flags"; until 2026-12-08 "seed*")
        for values in rows:
            values[1] = values[1].replace("*", ", fields changed by its flags")
    return render_table(header, rows, kind, caption)


def _record_epoch(run: RunInfo, record: dict) -> tuple[int | str, float | None]:
    """The epoch of the weights a record measured (the best epoch for best weights, else the epochs trained) and the
    run's training time up to it (its metrics' cumulative seconds there; None where the run has no such row)."""
    epoch = record.get("best_epoch") if of_best_weights(record) else record.get("epochs_trained")
    if not isinstance(epoch, int):
        return "—", None
    seconds = next((row.get("elapsed_seconds") for row in run.metrics if row.get("epoch") == epoch), None)
    return epoch, seconds


def build_comparison(paths: Sequence[str | Path], split: str = "test") -> tuple[str, Comparison]:
    comparison = compare_runs(paths, split)
    drawn = {}                          # a run given by two of its records is drawn once, under its folder's name
    for r, record in zip(comparison.runs, comparison.records or [None] * len(comparison.runs)):
        if r.metrics:
            drawn.setdefault(r.path.resolve(), (r.path.name if record else r.name, r.metrics))
    curves = list(drawn.values())
    # the curves of the split compared: a choice made on the validation digits is shown no test curve
    figure = FigureSet().make("curves", "ELBO against epoch", lambda w: plots.curves_figure(curves, width=w,
                                                                                          split=split)) \
        if curves else None
    html = _environment().get_template("compare.html.j2").render(
        comparison=comparison, figure=figure, split=split,
        generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    return html, comparison
