"""``latentx plot`` on two short real runs: valid PNGs, labelled axes, one legend entry per run, index.html."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

import latentx.plots as plots
from latentx.cli import app
from latentx.config import apply_overrides
from latentx.reporting import headline
from latentx.trainer import TrainConfig, Trainer, resolve_config

import digits_task  # noqa: F401  (registers the "test_digits" task)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for objective in ("grpo", "relax"):
        cfg = apply_overrides(TrainConfig(), [
            f"objective={objective}", f"out={root / objective}", "steps=4", "task.name=test_digits",
            "task.train_size=64", "warm_start.enabled=false", "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=4", "rollout.max_new_tokens=12", "rollout.micro_batch_size=8",
            "relax.fit_batch_size=4", "eval.instances=3", "eval.n=4", "eval.ks=[1,2,4]", "checkpoint_every=4",
        ])
        Trainer(resolve_config(cfg), progress=False, log=lambda *a, **k: None).run()
        dirs.append(cfg.run_dir)
    return dirs


def _read_png(path):
    import matplotlib.image as mpimg

    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, image.shape
    assert image[..., :3].std() > 0.01, f"{path} is blank"
    return image


def test_train_writes_its_own_plots_through_the_same_path(two_runs):
    for run in two_runs:
        index = run / "plots" / "index.html"
        assert index.is_file(), "train ends by plotting its run directory"
        for name in ("reward.png", "accuracy.png", "entropy.png", "er.png", "pass_at_k.png"):
            _read_png(run / "plots" / name)
    assert (two_runs[1] / "plots" / "dsd.png").is_file() and (two_runs[1] / "plots" / "xp.png").is_file()


def test_plot_command_overlays_runs_with_labelled_axes_and_a_legend_per_run(two_runs, tmp_path, monkeypatch):
    figures = {}
    real_save = plots._save

    def capture(fig, path):
        ax = fig.axes[0]
        legend = ax.get_legend()
        figures[path.name] = dict(xlabel=ax.get_xlabel(), ylabel=ax.get_ylabel(), title=ax.get_title(),
                                  legend=[t.get_text() for t in legend.get_texts()] if legend else [])
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    out = tmp_path / "compare"
    result = CliRunner().invoke(app, ["plot", str(two_runs[0]), str(two_runs[1]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "index.html" in result.output
    for name in ("reward.png", "accuracy.png", "entropy.png", "er.png", "pass_at_k.png"):
        info = figures[name]
        assert info["xlabel"] and info["ylabel"] and info["title"], (name, info)
        assert any("grpo" in t for t in info["legend"]) and any("relax" in t for t in info["legend"]), (name, info)
        _read_png(out / name)
    # L_xp exists only in the relax run: the panel is still drawn, with that run alone
    assert figures["xp.png"]["legend"] == ["relax"]
    assert figures["pass_at_k.png"]["xlabel"].startswith("k")
    assert {"grpo after RL", "grpo start", "relax after RL", "relax start"} <= set(figures["pass_at_k.png"]["legend"])
    page = (out / "index.html").read_text()
    shown = set(re.findall(r'src="([^"]+\.png)"', page))
    assert shown == {p.name for p in out.glob("*.png")} and "reward.png" in shown
    summary = json.loads((two_runs[1] / "summary.json").read_text())
    assert f"{headline(summary['eval'])['mean@1_greedy']:.3f}" in page


def test_gradient_share_panel_appears_when_the_runs_logged_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward_mean": 0.1 * s} for s in range(1, 5)]
    for row in rows[1::2]:  # diagnostics.term_grads_every=2
        row.update({"grad_share/pg": 0.7, "grad_share/xp": 0.3, "grad_cos_pg/pg": 1.0, "grad_cos_pg/xp": -0.2})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plots.plot_runs([run], tmp_path / "out")
    names = [p.name for p in written]
    assert {"grad_shares.png", "grad_cos_pg.png", "reward.png"} <= set(names) and "pass_at_k.png" not in names
    _read_png(tmp_path / "out" / "grad_shares.png")
    _read_png(tmp_path / "out" / "grad_cos_pg.png")


def test_plot_command_bad_input_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no metrics.jsonl" in result.output and "Traceback" not in result.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    result = CliRunner().invoke(app, ["plot", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "metrics.jsonl:2: not a JSON line" in result.output
