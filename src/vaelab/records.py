"""Evaluation records: which weights an evaluation measured (read once, the same on every rank; where they stand
in their run is ``runs.weights_position``), the record and its per-digit values written beside the run without
replacing another's, and the record as a table (text, LaTeX, Markdown, CSV). `vaelab evaluate` (cli.py) runs the
evaluation itself."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from vaelab import atomic
from vaelab import checkpoint as ckpt
from vaelab import distributed
from vaelab.atomic import WriteError
from vaelab.errors import CheckpointError
from vaelab.runs import digits_label, weights_label
from vaelab.tables import plural, render_table, shell_word, text_table


def load_the_same_weights(run_dir: Path, device, weights: str, world, attempts: int = 3):
    """``checkpoint.load_model_weights`` on every rank, read again where the ranks read different versions of the
    file (a training of the run wrote a checkpoint between their reads, and each rank would estimate its shard
    with other weights); a CheckpointError after ``attempts`` reads that differed."""
    for _ in range(attempts):
        config, model, loaded = ckpt.load_model_weights(run_dir, device, weights)
        digest = torch.tensor([int(loaded.sha256[:15], 16)], dtype=torch.int64)       # 60 bits of the SHA-256
        if len({int(part) for part in distributed.gather(digest, world)}) == 1:
            return config, model, loaded
    raise CheckpointError(f"{run_dir / weights} changed while the {world.size} processes read it, {attempts} times "
                          f"(a training of this run writes it); evaluate again when it pauses, or evaluate a copy")


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by null, so that the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def digits_path(record_path: Path) -> Path:
    """Where the per-digit values of the record ``….json`` go: ``….digits.csv`` beside it."""
    return record_path.with_name(record_path.name.removesuffix(".json") + ".digits.csv")


def someone_elses(digits: Path) -> bool:
    """Whether ``digits`` is a file that is not vaelab's per-digit values (their header begins 'digit,label,'): a
    per-digit file left without its record may be replaced, someone's own file of that name never."""
    try:
        with open(digits, "rb") as handle:
            return not handle.read(12).startswith(b"digit,label,")
    except FileNotFoundError:
        return False
    except OSError:
        return True


def write_evaluation(out: Path, record: dict, per_digit: dict, labels, run_dir: Path,
                     overwrite: bool) -> tuple[Path, Path]:
    """The record ``out`` (JSON) and its per-digit estimates beside it (``….digits.csv``); returns where the two
    went. Without ``overwrite`` the record never replaces a file: where another evaluation wrote that name while
    this one ran (it was free when this one started), this one is written as ``…-2.json`` (the next free name);
    the two evaluations may have measured different weights (a training between them), and both records are kept.
    The record is written first, so that its name is this evaluation's before its per-digit file is written (a
    per-digit file without its record, left by a deleted record, is replaced); a reader that comes in between
    finds the record without per-digit values for a moment, as after a crash there. Where the run's directory
    cannot take them, both go to the temporary directory and the WriteError says where."""
    names = list(per_digit)
    columns = [per_digit[name].tolist() for name in names]
    lines = [",".join(["digit", "label", *names])]
    for index, (label, *values) in enumerate(zip(labels.tolist(), *columns)):
        lines.append(",".join([str(index), str(label), *(f"{v:.6f}" for v in values)]))

    def text_naming(digits: Path) -> str:         # the record, naming its per-digit file
        return json.dumps(strict_json({**record, "per_digit": digits.name}), indent=2, allow_nan=False) + "\n"

    def place(wanted: Path, overwrite: bool) -> tuple[Path, Path]:
        """The record at ``wanted``, or (a name taken) at the next free ``…-N.json``, and its per-digit file."""
        stem = wanted.name.removesuffix(".json")
        for attempt in range(1, 1000):
            out = wanted if attempt == 1 else wanted.with_name(f"{stem}-{attempt}.json")
            digits = digits_path(out)
            if someone_elses(digits) and not overwrite:
                continue                                   # made while this one ran: its name is taken
            try:
                atomic.write_text(out, text_naming(digits), replace=overwrite)
            except FileExistsError:
                continue
            try:
                atomic.write_text(digits, "\n".join(lines) + "\n")
            except WriteError:
                out.unlink(missing_ok=True)                # both go elsewhere (below), as one record
                raise
            return out, digits
        raise WriteError(f"{wanted} and 998 names after it are taken; pass --out another file")

    try:
        return place(out, overwrite)
    except WriteError as exc:
        # a folder of the run's name in the temporary directory, the files named as in the run: moved into the run
        # (until 2026-12-05 they were /tmp/vaelab-RUN-eval-….json, which a run does not read as a record, and a second
        # such evaluation replaced the first); the next free name there, so that no earlier one is replaced
        elsewhere = Path(tempfile.gettempdir()) / f"vaelab-{run_dir.resolve().name}-evaluations"
        try:
            try:
                elsewhere.mkdir(exist_ok=True)
            except OSError as error:
                raise WriteError(f"cannot make {elsewhere}: {error.strerror}") from error
            fallback, digits = place(elsewhere / out.name, False)
            saved = (f"the record was saved to {fallback} instead, with {digits.name}: move both into "
                     f"{shell_word(run_dir)} once it takes files (mv -n {shell_word(fallback.with_suffix(''))}.* "
                     f"{shell_word(run_dir)}/), where runs, report and compare read them")
        except WriteError:
            saved = "nothing could be saved (the results are printed above)"
        raise WriteError(f"{exc}; {saved}; next time pass --out FILE in a writable place") from exc


def evaluation_export(record: dict, kind: str) -> str:
    """The estimators of an evaluation as a LaTeX (booktabs), Markdown or CSV table, with what it measured (which
    digits, K, and the weights with their epoch): with ``--k-curve`` the smaller K on the nested draws, with
    ``--gaps`` ELBO[q*] and, in the caption, the two gaps (paired differences; until 2026-12-07 neither was in
    the table, nor anywhere in the output of `evaluate --gaps --k-curve --format …`)."""
    caption = f"{digits_label(record)}, K = {record['k']}, {weights_label({**record, 'stale': False})}"
    rows = [[e["name"], e["mean"], e["stderr"], e["kind"]] for e in record["estimates"]]
    rows += [[f"IWAE-{p['k']}, q(z|x), the first {p['k']} of the {record['k']} draws", p["mean"], p["stderr"],
              "stochastic lower bound"] for p in record.get("k_curve", []) if p["k"] < record["k"]]
    gaps = record.get("gaps")
    if gaps:
        from vaelab.gaps import gap_warning
        on = "" if gaps["digits"] == record.get("n_examples") else f" (its first {gaps['digits']} digits)"
        rows.append([f"ELBO[q*], q optimised for each digit{on}", gaps["elbo_optimised"]["mean"],
                     gaps["elbo_optimised"]["stderr"], "stochastic lower bound"])
        if "log_px_optimised" in gaps:
            rows.append([f"{gaps['log_px_optimised_estimator']}{on}", gaps["log_px_optimised"]["mean"],
                         gaps["log_px_optimised"]["stderr"], "stochastic lower bound"])

        def gap(name):
            mean, stderr = gaps[name]["mean"], gaps[name]["stderr"]
            return "—" if mean is None else f"{mean:.2f}" + ("" if stderr is None else f" ± {stderr:.2f}")

        caption += (f"; where the nats go, over {plural(gaps['digits'], 'digit')}: approximation gap "
                    f"{gaps['log_px_estimator']} − ELBO[q*] {gap('approximation_gap')}, amortisation gap ELBO[q*] − "
                    f"ELBO[q] {gap('amortisation_gap')} nats, each paired over the digits"
                    # the warning from the numbers, as `evaluate`, the report and compare show it (until 2026-12-07
                    # "q* stopped short of convergence" wherever the record kept any warning, none where it kept none)
                    + (f"; warning: {warning}" if (warning := gap_warning(gaps)) else ""))
    if modes := record.get("laplace_modes"):
        # how far the Laplace rows can be trusted, as `evaluate` and the report say it (the table said nothing of it
        # until 2026-12-07: a Laplace estimate of 131 stalled and 65 unconverged modes of 200 read like any other)
        caption += (f"; Laplace modes: {modes['converged']} converged, {modes['stalled']} stalled (no Newton step "
                    f"increased log p(x, z)), {modes['not converged']} not converged in {modes['newton_steps']} steps")
    return render_table(["estimator of log p(x)", "nats", "± s.e.", "kind"], rows, kind, caption)


def format_eval_table(result: dict) -> str:
    def number(value):
        return "—" if value is None else f"{value:.3f}"

    # "s.e.", not "± stderr" (until 2026-12-05): no cell under it holds a ±, and where a terminal has it spelled
    # "+/-" (cli.legible_streams) the header alone grew two characters past its column
    rows = [(entry["name"], number(entry["mean"]), number(entry["stderr"]), entry["kind"])
            for entry in result["estimates"]]
    lines = text_table(("estimator", "log p(x) (nats)", "s.e.", "bound?"), rows, rule=True)
    products = "" if result["precision"] == "fp32" else f" with {result['precision']} decoder products"
    products += ", log weights compiled" if result.get("compiled") else ""
    lines.append(f"NLL = {number(result['nll'])} ± {number(result['nll_stderr'])} nats (IWAE-{result['k']}{products}, "
                 f"{digits_label(result)}, {result['seconds']:.1f} s)")
    for layer in result["layers"]:
        counted = (f"{layer['active_units']} of {layer['latent']} units active (Cov_x E_q[u] > 0.01)"
                   if layer["active_units"] is not None else
                   "active units not counted (Cov_x E_q[u], a variance over digits, needs 2 or more)")
        lines.append(f"layer {layer['layer']}: {counted}, KL {layer['kl']:.2f} nats")
    for point in result.get("k_curve", []):
        lines.append(f"IWAE-{point['k']:<5d} {number(point['mean'])} ± {number(point['stderr'])} (nested draws: the "
                     f"first {point['k']} of {result['k']})")
    gaps = result.get("gaps")
    if gaps:
        def pm(name):
            return f"{number(gaps[name]['mean'])} ± {number(gaps[name]['stderr'])}"

        lines += [f"where the nats go ({plural(gaps['digits'], 'digit')}; q* is {gaps['family']}):",
                  f"  log p̂(x) ({gaps['log_px_estimator']}) {pm('log_px')}   ELBO[q*] {pm('elbo_optimised')}   "
                  f"ELBO[q] {pm('elbo_encoder')}" + (f"   ELBO[Laplace] {pm('elbo_laplace')}" if "elbo_laplace" in gaps
                                                     else ""),
                  f"  approximation gap {pm('approximation_gap')}   amortisation gap {pm('amortisation_gap')} nats",
                  *([f"  log p̂(x) ({gaps['log_px_optimised_estimator']}) {pm('log_px_optimised')}"]
                    if "log_px_optimised" in gaps else []),
                  f"  stopping rule: {gaps['rule']}; {100 * gaps['converged_fraction']:.1f} % of the digits converged, "
                  f"{gaps['mean_steps']:.0f} steps on average (at most {gaps['max_steps']})"]
        from vaelab.gaps import gap_warning

        if warning := gap_warning(gaps):
            lines.append(f"warning: {warning}")
    modes = result.get("laplace_modes")
    if modes and (modes["stalled"] or modes["not converged"]):
        from vaelab.laplace import STALLED_CAUSE

        lines.append(f"warning: of the Laplace modes, {modes['converged']} converged, {modes['stalled']} stalled (no "
                     f"step along the Newton direction increases log p(x, z) while its gradient is not small: "
                     f"{STALLED_CAUSE}) and {modes['not converged']} did not converge in {modes['newton_steps']} "
                     f"steps; their Laplace estimates are less reliable")
    return "\n".join(lines)
