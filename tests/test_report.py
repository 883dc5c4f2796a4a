"""The report, the comparison, the list of runs, TensorBoard and the Python API (issue: Look inside a run)."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import one_line, run
from vaelab import checkpoint as ckpt
from vaelab.cli import build_parser, main
from vaelab.report import REPORT_SECTIONS

SMALL = ["--hidden", "32", "--latent", "6", "--test-examples", "60", "--train-examples", "600", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Two one-layer runs (another seed) and a two-layer run, the first two evaluated on the same digits."""
    root = tmp_path_factory.mktemp("report")
    common = ["--data-dir", str(data_dir), *SMALL]
    assert main(["train", "--out", str(root / "a"), "--epochs", "3", *common]) == 0
    assert main(["train", "--out", str(root / "b"), "--epochs", "2", "--seed", "1", "--lr", "2e-3", *common]) == 0
    assert main(["train", "--out", str(root / "two"), "--epochs", "2", "--model", "mlp2", "--hidden", "24",
                 "--hidden-top", "12", "--latent", "6", "3", "--data-dir", str(data_dir), *SMALL[4:]]) == 0
    for name in ("a", "b"):
        assert main(["evaluate", str(root / name), "--k", "20", "--test-examples", "60", "--data-dir", str(data_dir),
                     "--no-progress"]) == 0
    return root


def check_self_contained(html: str) -> int:
    """No src or href that loads anything from elsewhere; every embedded image decodes; no text holds a command the
    terminal's way, `…`, instead of as <code> (until 2026-12-07 the report's latent-unit caption ended "`vaelab
    evaluate` stores them with more"); returns the images' count."""
    from PIL import Image

    prose = re.sub(r"<(script|style|code|pre)\b.*?</\1>", "", html, flags=re.S)
    assert "`" not in prose, re.findall(r".{0,80}`.{0,80}", prose)

    for attribute, value in re.findall(r'\b(src|href)="([^"]*)"', html):
        assert value.startswith("data:image/png;base64,") if attribute == "src" else value.startswith("#"), value
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    for payload in images:
        image = Image.open(io.BytesIO(base64.b64decode(payload)))
        image.load()
        assert image.size[0] > 50 and image.size[1] > 30
    return len(images)


def test_the_report_says_why_a_run_has_no_commit(tmp_path, data_dir, monkeypatch):
    """A vaelab installed from a wheel has no commit (provenance.git_commit): the page said "None" until 2026-12-07."""
    from vaelab import provenance

    monkeypatch.setattr(provenance, "git_commit", lambda: None)
    assert main(["train", "--out", str(tmp_path / "r"), "--epochs", "1", "--data-dir", str(data_dir), *SMALL]) == 0
    assert main(["report", str(tmp_path / "r"), "--data-dir", str(data_dir), "--no-progress"]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert re.search(r"<td>commit</td><td class=\"hash\">— \(vaelab was not run from a git checkout of its own\)</td>",
                     html)
    assert ">None<" not in html


def test_report_holds_every_section_and_is_self_contained(runs, data_dir, capsys):
    out = runs / "a" / "report.html"
    assert main(["report", str(runs / "a"), "--data-dir", str(data_dir)]) == 0
    html = out.read_text()
    for section, title in REPORT_SECTIONS:
        assert f'<section id="{section}">' in html and title in html
    assert check_self_contained(html) >= 9
    for text in ("finished", "3 of 3 epochs", "IWAE-20, q(z|x)", "worst- and best-explained", "per-digit log p(x)",
                 "samples from p(x)", "KL and posterior-mean variance per latent unit", "traversals", "interpolations", "principal components",
                 "train.batch_size", "provenance", "Of model.safetensors after epoch 3, as this page was made",
                 "The views below are of model.safetensors after epoch 3"):
        assert text in html, text
    captured = capsys.readouterr()
    assert "made in" in captured.out and "figures made" not in captured.err      # stderr is no terminal here


def test_the_report_shows_on_a_terminal_what_it_makes(runs, data_dir, monkeypatch, capsys):
    """A large model's page took a minute without a word until its last line; on a terminal a bar now names the part
    being made (the latent statistics, each figure) and counts the figures, and clears itself at the end."""
    from vaelab import cli

    monkeypatch.setattr(cli, "_progress", lambda args: not args.no_progress)     # as on a terminal
    out = runs / "progress.html"
    assert main(["report", str(runs / "a"), "--data-dir", str(data_dir), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "report of a: figures made 0, " in err and "the weights and the test digits" in err, err
    assert ", samples from p(x)" in err and "KL and posterior-mean variance per latent unit" in err
    made = [int(part.split(",")[0]) for part in err.split("figures made ")[1:]]
    assert made == sorted(made) and max(made) >= 9
    assert main(["report", str(runs / "a"), "--data-dir", str(data_dir), "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_report_of_a_two_layer_run_has_views_per_layer_and_says_how_to_evaluate(runs, data_dir):
    assert main(["report", str(runs / "two"), "--data-dir", str(data_dir), "--out", str(runs / "two.html")]) == 0
    html = (runs / "two.html").read_text()
    for layer in (1, 2):
        assert f"layer {layer}: posterior means" in html
        assert f"layer {layer}: traversals" in html or f"layer {layer}: no traversals" in html   # none active
    assert f"vaelab evaluate {runs / 'two'}" in html and "has not been evaluated yet" in html
    # the model row names the model trained, then the preset its flags changed (it said "seed" for an mlp2)
    assert re.search(r"<td>model</td><td>mlp2 \(preset seed, changed by flags: [^<]*model\.name", html)
    check_self_contained(html)


def test_compare_pairs_runs_on_the_same_digits_and_says_when_it_cannot(runs, data_dir, capsys, tmp_path):
    assert main(["compare", str(runs / "a"), str(runs / "b"), "--out", str(tmp_path / "c.html")]) == 0
    out = capsys.readouterr().out
    assert "paired: NLL(b) − NLL(a) =" in out and "over 60 digits" in out
    assert re.search(r"train\.lr\s+0\.001\s+0\.002", out) and re.search(r"train\.seed\s+0\s+1", out)
    assert "train.threads" not in out
    html = (tmp_path / "c.html").read_text()
    assert "Paired differences" in html and "ELBO curves" in html
    check_self_contained(html)
    # evaluated with another K: shown, and the mismatch said plainly
    assert main(["evaluate", str(runs / "b"), "--k", "30", "--test-examples", "60", "--data-dir", str(data_dir),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(runs / "a"), str(runs / "b"), str(runs / "two"), "--out", str(tmp_path / "d.html")]) == 0
    out = capsys.readouterr().out
    # only the settings that differ are named (not "fp32 vs fp32")
    assert "evaluated with different settings (K 20 vs 30); the NLLs are shown" in out and "paired:" not in out
    assert "two: no paired difference" in out


def test_runs_lists_state_epochs_and_the_headline_nll(runs, tmp_path, data_dir, capsys):
    interrupted = tmp_path / "all" / "interrupted"
    shutil.copytree(runs / "b", interrupted)
    config = json.loads((interrupted / ckpt.CONFIG).read_text())
    config["train"]["epochs"] = 5
    (interrupted / ckpt.CONFIG).write_text(json.dumps(config))
    shutil.copytree(runs / "a", tmp_path / "all" / "busy")
    with ckpt.RunLock(tmp_path / "all" / "busy"):
        assert main(["runs", str(tmp_path / "all")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "preset/model", "epochs", "status"]      # as compare names it
    # the report's headline NLL (the most digits, then the largest K), not the lowest: "best NLL" until 2026-12-07
    assert "headline NLL" in lines[0] and "best NLL" not in lines[0]
    busy = next(line for line in lines if "busy" in line)
    assert "training now" in busy and "3/3" in busy and "seed" in busy
    assert "interrupted" in next(line for line in lines if "interrupted" in line)
    assert re.search(r"\d+\.\d\d \(K 20, 60 test digits, epoch 3\)", busy)
    code = main(["runs", str(tmp_path / "nowhere")])
    assert code == 2
    # the training "so far" only where it goes on (until 2026-12-07 a finished run's too)
    for name, words in (("interrupted", "of training so far.</p>"), ("busy", "of training.</p>")):
        assert main(["report", str(tmp_path / "all" / name), "--data-dir", str(data_dir)]) == 0
        assert words in (tmp_path / "all" / name / "report.html").read_text()


def test_tensorboard_events_can_be_read_back(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "2", "--tensorboard", "--data-dir", str(data_dir), *SMALL,
                 "--clip-grad-norm", "5"]) == 0
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"nats/test_elbo", "nats/train_kl", "schedule/lr", "seconds/epoch_seconds"} <= set(tags["scalars"])
    # the clipping's columns are no nats (they were nats/clipped_steps, nats/gradient_norm_mean)
    assert {"gradient/clipped_steps", "gradient/gradient_norm_mean"} <= set(tags["scalars"])
    assert {tag.split("/")[1] for tag in tags["scalars"] if tag.startswith("nats/")} <= {
        f"{split}_{part}" for split in ("train", "test") for part in ("objective", "elbo", "reconstruction", "kl")}
    assert [e.step for e in events.Scalars("nats/test_elbo")] == [1, 2]
    metrics = [line.split(",") for line in (run / ckpt.METRICS).read_text().splitlines()]
    column = metrics[0].index("test_elbo")
    # TensorBoard keeps float32 (half a unit in the last place: 1.5e-5 near 500 nats), metrics.csv six decimals
    expected = float(metrics[2][column])
    assert events.Scalars("nats/test_elbo")[-1].value == pytest.approx(expected, rel=2.0 ** -24, abs=1e-6)
    assert {"samples", "reconstructions"} <= set(tags["images"]) and len(events.Images("samples")) == 2
    image = events.Images("reconstructions")[-1]
    assert (image.height, image.width) == (8 * 30 + 2, 8 * 30 + 2)          # 4 rows of digits over 4 of theirs
    # fewer test digits than the 32 the grid shows (it raised a reshape error after the first epoch)
    few = tmp_path / "few"
    assert main(["train", "--out", str(few), "--epochs", "1", "--tensorboard", "--data-dir", str(data_dir),
                 *SMALL, "--test-examples", "20"]) == 0
    events = EventAccumulator(str(few / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    image = events.Images("reconstructions")[-1]
    assert (image.height, image.width) == (6 * 30 + 2, 8 * 30 + 2)          # 20 digits: 3 rows, each over its own
    assert "pseudo_inputs" not in events.Tags()["images"]                    # a standard prior has none


def test_tensorboard_shows_the_vampprior_pseudo_inputs(tmp_path, data_dir):
    """A VampPrior run logs its pseudo-inputs uₖ each epoch as a grid of rows of 10, pixel for pixel (TensorBoard's
    PNG holds 8 bits: white ink on black, 1 − the grid's value), as the report shows them."""
    import numpy as np
    import torch
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vaelab.api import load_run

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "2", "--tensorboard", "--data-dir", str(data_dir), *SMALL,
                 "--prior", "vampprior", "--prior-components", "12"]) == 0
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    grids = events.Images("pseudo_inputs")
    assert [e.step for e in grids] == [1, 2] and (grids[-1].height, grids[-1].width) == (2 * 30 + 2, 10 * 30 + 2)
    pixels = np.asarray(Image.open(io.BytesIO(grids[-1].encoded_image_string)).convert("L"), dtype=np.float64) / 255
    model = load_run(run).model
    with torch.no_grad():
        u = model.prior.pseudo_inputs().double().numpy()                    # (12, 784)
    for k in (0, 9, 10, 11):
        r, c = divmod(k, 10)
        cell = pixels[2 + 30 * r:30 + 30 * r, 2 + 30 * c:30 + 30 * c]
        assert np.abs(cell - u[k].reshape(28, 28)).max() <= 1 / 255 + 1e-9
    assert pixels[32:60, 2 + 30 * 2:30 + 30 * 2].max() == 0                 # the second row's third cell is empty


def test_tensorboard_missing_is_a_one_line_error(tmp_path, data_dir, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    code = main(["train", "--out", str(tmp_path / "run"), "--tensorboard", "--data-dir", str(data_dir), *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'vaelab[tensorboard]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_the_readme_example_runs(tmp_path, data_dir, monkeypatch):
    """The Python example in README.md, executed as written (on the synthetic data set)."""
    import torch

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VAELAB_DATA", str(data_dir))
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    run = namespace["run"]
    assert run.status == "finished" and len(run.metrics) == run.config.train.epochs
    assert bool(torch.isfinite(namespace["log_px"]).all())
    assert namespace["same"].weights == "model.safetensors after epoch 2"          # as the example's comment says


def test_the_readme_synopsis_lists_every_flag_of_every_command():
    """The README's block of commands against the parser: --early-stopping, --no-batch-norm, and evaluate's --device,
    --data-dir and --no-progress were missing from it (they were in the help, not in the block)."""
    from vaelab.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```\n(vaelab train .*?)```", readme, re.S).group(1)
    lines = re.split(r"^(?=vaelab )", block, flags=re.M)
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert sorted(re.match(r"vaelab (\S+)", line).group(1) for line in lines if line.strip()) == \
        sorted([*commands, "--version"])
    for line in lines:
        name = re.match(r"vaelab (\S+)", line).group(1) if line.strip() else None
        if name not in commands:
            continue
        shown = {f"--{flag}" for flag in re.findall(r"--(?:\[no-\])?([a-z][a-z0-9-]*)", line)}
        shown |= {f"--no-{flag}" for flag in re.findall(r"--\[no-\]([a-z][a-z0-9-]*)", line)}
        flags = {option for action in commands[name]._actions for option in action.option_strings
                 if option.startswith("--") and option != "--help"}
        assert flags == shown, (name, sorted(flags - shown), sorted(shown - flags))


def test_api_load_run(runs):
    import torch

    import vaelab

    run = vaelab.load_run(runs / "a")
    assert repr(run).startswith("Run(") and run.epochs_done == 3 and run.evaluations
    assert run.weights == "model.safetensors after epoch 3"
    x = (torch.rand(4, 784, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    mu, logvar = run.encode(x)
    assert mu.shape == (4, 6) and run.decode(mu).shape == (4, 784) and run.sample(5).shape == (5, 784)
    assert run.log_likelihood(x, k=10).shape == (4,)


def test_the_citation_file_is_valid_and_names_this_version_and_the_papers_in_the_readme():
    """CITATION.cff (how to cite vaelab) against the Citation File Format 1.2.0's required keys, the version vaelab
    reports, and the README's list of the papers it cites."""
    yaml = pytest.importorskip("yaml", reason="PyYAML (installed with optuna, a test extra)")
    import vaelab

    root = Path(__file__).resolve().parents[1]
    cff = yaml.safe_load((root / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and {"message", "title", "authors"} <= cff.keys()
    assert cff["version"] == vaelab.__version__ and cff["license"] == "MIT"
    readme = (root / "README.md").read_text(encoding="utf-8")
    citing = " ".join(readme[readme.index("## Citing"):readme.index("## Benchmark")].split())
    for reference in cff["references"]:
        assert {"type", "title", "authors", "year"} <= reference.keys()
        first, many = reference["authors"][0]["family-names"], len(reference["authors"])
        named = {1: first, 2: f"{first} & {reference['authors'][1]['family-names']}"}.get(many, f"{first} et al.")
        assert f"{named} {reference['year']}" in citing, named


def test_version_and_every_option_has_a_help_string(capsys):
    import vaelab

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and vaelab.__version__ in capsys.readouterr().out

    def actions(parser):
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for sub in action.choices.values():
                    yield from actions(sub)
            elif action.dest not in ("help", "version"):
                yield parser.prog, action

    missing = [f"{prog} {action.dest}" for prog, action in actions(build_parser()) if not action.help]
    assert not missing, missing
    # an option with a default says it (`evaluate --k` did not say 5000, nor `stirling --terms` 2)
    silent = [f"{prog} {action.dest}" for prog, action in actions(build_parser())
              if action.default not in (None, False) and "default" not in action.help]
    assert not silent, silent
    # the presets whose default engine is the compiled one, each named (cpu-hour-vampprior was not, until 2026-12-07)
    from vaelab.config import RunConfig
    from vaelab.presets import PRESETS, apply_preset

    engine = next(a for _, a in actions(build_parser()) if "--engine" in a.option_strings)
    named = re.search(r"the default of the presets (.*)\)$", " ".join(engine.help.split())).group(1)
    compiled = {name for name in PRESETS if apply_preset(RunConfig(), name).train.engine == "compiled"}
    assert set(re.split(r", | and ", named)) == compiled and "cpu-hour-vampprior" in compiled


def test_help_version_and_a_mistyped_command_start_without_torch():
    """`vaelab --help`, `--version` and a command's name mistyped need no command's flags, whose choices come from
    registries that import torch: until 2026-12-07 each took 1.5 s on the Zen 4, now 0.07 s; the same words."""
    script = ("import sys\n"
              "from vaelab.cli import main\n"
              "try:\n"
              "    main(sys.argv[1:])\n"
              "except SystemExit as exc:\n"
              "    print('exit', exc.code, 'torch' in sys.modules)\n")
    for words, code, said in ((["--version"], 0, "vaelab 0."), (["--help"], 0, "stirling"),
                              (["trian"], 2, "invalid choice: 'trian'"), ([], 2,
                              "the following arguments are required: command")):
        done = subprocess.run([sys.executable, "-c", script, *words], capture_output=True, text=True)
        assert done.stdout.splitlines()[-1] == f"exit {code} False" and said in done.stdout + done.stderr, done
    done = subprocess.run([sys.executable, "-c", script, "runs", "--help"], capture_output=True, text=True)
    assert done.stdout.splitlines()[-1] == "exit 0 True"           # a command's flags: the whole parser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (.ci/run installs Debian's chromium)")
@pytest.mark.parametrize("page", ["report", "compare"])
def test_pages_render_in_a_real_browser(runs, data_dir, tmp_path, page):
    """Headless Chromium opens the page from disk: every section is laid out one after the other within the
    page's height, every image loads, and the screenshot of the whole page is not blank."""
    from PIL import Image, ImageStat

    html = tmp_path / f"{page}.html"
    args = ["report", str(runs / "a"), "--data-dir", str(data_dir), "--out", str(html)] if page == "report" else \
        ["compare", str(runs / "a"), str(runs / "b"), "--out", str(html)]
    assert main(args) == 0
    profile = str(tmp_path / "profile")
    dom = chromium(f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", html.as_uri())
    layout = json.loads(re.search(r'data-layout="([^"]*)"', dom.stdout).group(1).replace("&quot;", '"'))
    sections = layout["sections"]
    expected = [s for s, _ in REPORT_SECTIONS] if page == "report" else ["runs", "differences", "config", "curves"]
    assert [s["id"] for s in sections] == expected
    assert all(a["top"] + a["height"] <= b["top"] for a, b in zip(sections, sections[1:]))
    assert sections[-1]["top"] + sections[-1]["height"] <= layout["height"]
    assert layout["images"] == layout["total_images"] > 0
    # in a narrow window (a phone) a wide table scrolls in its place: the page itself never scrolls sideways (the
    # report's evaluation table and the comparison's tables made it 561 px wide in a 485 px window)
    narrow = chromium(f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--window-size=420,900",
                      "--dump-dom", html.as_uri())
    small = json.loads(re.search(r'data-layout="([^"]*)"', narrow.stdout).group(1).replace("&quot;", '"'))
    assert small["width"] <= small["window"] < 600, small
    shot = tmp_path / f"{page}.png"
    chromium(f"--user-data-dir={profile}", f"--window-size=1280,{layout['height']}", f"--screenshot={shot}",
             html.as_uri())
    image = Image.open(shot).convert("L")
    assert image.size == (1280, layout["height"])
    assert ImageStat.Stat(image).stddev[0] > 20            # text and pictures, not a blank page
    keep = os.environ.get("VAELAB_SCREENSHOTS")             # a directory to keep the screenshots in, to look at
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)


def test_compare_on_the_validation_split_pairs_validation_records_and_never_the_test_set(data_dir, tmp_path, capsys):
    """`compare --split validation` pairs the runs' `evaluate --split validation` records digit by digit, and says
    so on the page; by default the same runs, evaluated on validation digits only, have no test NLL to pair."""
    for name, seed in (("a", "0"), ("b", "1")):
        assert main(["train", "--out", str(tmp_path / name), "--epochs", "2", "--seed", seed, "--validation", "100",
                     "--data-dir", str(data_dir), *SMALL]) == 0
        assert main(["evaluate", str(tmp_path / name), "--split", "validation", "--k", "20", "--data-dir",
                     str(data_dir), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--split", "validation",
                 "--out", str(tmp_path / "v.html")]) == 0
    out = capsys.readouterr().out
    assert "paired: NLL(b) − NLL(a) =" in out and "over 100 digits" in out and "100 validation digits" in out
    html = (tmp_path / "v.html").read_text()
    assert "on the same validation digits" in html
    assert "Validation ELBO\n  (solid)" in html and "so no test curve is drawn" in html and "Test ELBO" not in html
    a = json.loads(next((tmp_path / "a").glob("eval-validation-*.json")).read_text())
    assert f"{a['nll']:.3f} ± " in out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--split", "validation", "--format", "markdown",
                 "--out", str(tmp_path / "v.html")]) == 0
    assert "IWAE-20 on 100 validation digits" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "t.html")]) == 0
    out = capsys.readouterr().out
    assert "Test ELBO\n  (solid)" in (tmp_path / "t.html").read_text()
    assert "paired:" not in out and "no paired differences: no run was evaluated on the test digits" in out
    assert "b: no paired difference" not in out                   # one line for all (it was one per run)
    # a test evaluation with the gap decomposition is left out of the comparison on validation digits
    assert main(["evaluate", str(tmp_path / "a"), "--gaps", "--gap-steps", "3", "--k", "20", "--data-dir",
                 str(data_dir), "--no-progress"]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "t.html")]) == 0
    out = capsys.readouterr().out
    assert "where the nats go" in out and re.search(r"^a\s+IWAE-20, \d+ digits\s+-\d", out, re.M)  # which log p̂
    assert "<td>IWAE-20, " in (tmp_path / "t.html").read_text()
    # a decomposition whose log p̂(x) fell below ELBO[q*] carries its warning into the comparison: made from the
    # record's numbers (``gaps.gap_warning``), whatever text the record kept
    record = next((tmp_path / "a").glob("eval-*gaps*.json"))
    saved = json.loads(record.read_text())
    saved["gaps"].update(warning="", approximation_gap={"mean": -1.5, "stderr": 0.1},
                         amortisation_gap={"mean": 0.5, "stderr": 0.1})
    record.write_text(json.dumps(saved))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "t.html")]) == 0
    assert "a: warning: log p̂(x) by IWAE-20 with the encoder's q is below ELBO[q*] by 1.5 nats" in \
        capsys.readouterr().out
    assert "a: warning: log p̂(x) by IWAE-20 with the encoder&#39;s q" in (tmp_path / "t.html").read_text()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--split", "validation",
                 "--out", str(tmp_path / "v.html")]) == 0
    assert "where the nats go" not in capsys.readouterr().out and "Where the nats go" not in \
        (tmp_path / "v.html").read_text()
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["compare", "a", "b", "--split", "train"])
    assert refused.value.code == 2


def test_compare_and_the_report_call_a_field_the_run_never_reads_unused(tmp_path, data_dir, capsys):
    """A mixture's K beside the standard prior is not a difference between runs: compare shows "unused" for a run
    that never reads it, and no row where no two runs differ but in values never read; the report's configuration
    says why the value is not read."""
    common = ["--epochs", "1", "--hidden", "16", "--latent", "3", "--train-examples", "200", "--test-examples", "40",
              "--data-dir", str(data_dir), "--no-progress"]
    for name, flags in [("k3", ["--prior", "mog", "--prior-components", "3"]),
                        ("k5", ["--prior", "mog", "--prior-components", "5"]),
                        ("plain", ["--prior-components", "7"]), ("plain2", [])]:
        assert main(["train", "--out", str(tmp_path / name), *common, *flags]) == 0
    capsys.readouterr()
    assert main(["compare", *(str(tmp_path / n) for n in ("k3", "k5", "plain")), "--out", str(tmp_path / "c.html")]) == 0
    assert re.search(r"model\.prior_components\s+3\s+5\s+unused", capsys.readouterr().out)
    assert main(["compare", str(tmp_path / "plain"), str(tmp_path / "plain2"), "--out", str(tmp_path / "d.html")]) == 0
    out = capsys.readouterr().out
    assert "prior_components" not in out                 # K 7 against 500, neither read: no difference
    assert main(["compare", str(tmp_path / "plain"), str(tmp_path / "plain2"), str(tmp_path / "k3"),
                 "--out", str(tmp_path / "e.html")]) == 0
    assert re.search(r"model\.prior_components\s+unused\s+unused\s+3", capsys.readouterr().out)
    assert main(["report", str(tmp_path / "plain"), "--data-dir", str(data_dir)]) == 0
    assert "7 (unused: the standard prior has no components)" in (tmp_path / "plain" / "report.html").read_text()


def test_the_report_of_a_layer_of_one_unit_plots_it_against_the_digit(tmp_path, data_dir):
    """A stochastic layer of one unit has no two principal components: its posterior means are drawn against the
    digit class (the report raised an IndexError before)."""
    run = tmp_path / "one"
    assert main(["train", "--out", str(run), "--model", "hvae", "--latent", "1", "1", "--blocks", "8", "8",
                 "--inference", "top-down", "--epochs", "1", "--train-examples", "200", "--test-examples", "40",
                 "--data-dir", str(data_dir), "--no-progress"]) == 0
    assert main(["report", str(run), "--data-dir", str(data_dir)]) == 0
    html = (run / "report.html").read_text()
    for layer in (1, 2):
        assert f"layer {layer}: posterior means of its one unit, by digit" in html
    check_self_contained(html)


def test_compare_of_one_run_or_a_missing_record_says_what_compare_takes(runs, tmp_path, capsys):
    """"compare needs two or more runs" named no fix, and a record that does not exist was "not a directory written
    by `vaelab train`"; both now say what compare takes."""
    code, _, err = run(capsys, "compare", runs / "a", "--out", tmp_path / "c.html")
    assert code == 2 and one_line(err) and f"got 1: give another run directory (or an eval-….json record in one) to " \
        f"compare {runs / 'a'} with" in err
    code, _, err = run(capsys, "compare", runs / "a", runs / "b" / "eval-missing.json", "--out", tmp_path / "c.html")
    assert code == 2 and one_line(err) and "eval-missing.json does not exist; compare takes run directories or the " \
        "eval-….json records in them" in err
    assert not (tmp_path / "c.html").exists()
