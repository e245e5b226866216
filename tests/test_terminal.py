"""What ``latentx train`` prints: our bars and phase lines only, no library bars or warnings; --quiet: nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TINY = [
    "--steps", "2", "--set", "warm_start.steps=3", "--set", "warm_start.num_examples=16",
    "--set", "rollout.prompts_per_step=2", "--set", "rollout.samples_per_prompt=4",
    "--set", "rollout.max_new_tokens=12", "--set", "rollout.micro_batch_size=8", "--set", "relax.fit_batch_size=4",
    "--set", "eval.instances=3", "--set", "eval.n=2", "--set", "eval.ks=[1,2]", "--set", "checkpoint_every=1",
    "--set", "logging.plots=false",
]

#: every line `latentx train` may print (rich's table aside)
ALLOWED = re.compile(
    r"^(warm start\b|relax\b|evaluating the \w+ policy on \d+ held-out problems|  (starting|final) policy: "
    r"|Koopman dictionary fitted|resuming at step \d+ from |run directory: |TensorBoard: |\s*held-out evaluation"
    r"|[┏┃┡│└])"
)


def _train(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LATENTX_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    code = "import sys; from latentx.cli import app; sys.argv = ['latentx', *sys.argv[1:]]; app()"
    return subprocess.run([sys.executable, "-c", code, "train", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_train_prints_only_its_own_bars_and_phase_lines(tmp_path):
    run = tmp_path / "run"
    first = _train("--out", str(run), *TINY, cache=tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-2000:]
    # resumed (loads a checkpoint: transformers' "Loading weights" bar) and extended by one step
    (run / "summary.json").unlink()
    second = _train("--resume", str(run), "--steps", "3", "--report-to", "tensorboard", cache=tmp_path / "cache")
    assert second.returncode == 0, second.stderr[-2000:]
    for result in (first, second):
        text = result.stdout + result.stderr
        for noise in ("Writing model shards", "Loading weights", "it/s]", "Warning", "warn("):
            assert noise not in text, f"{noise!r} leaked into the output:\n{text}"
        lines = [line for line in text.splitlines() if line.strip()]
        stray = [line for line in lines if not ALLOWED.match(line)]
        assert not stray, f"unexpected lines: {stray}"
        assert len(lines) <= 24, f"{len(lines)} lines do not fit on one screen"
    out1 = first.stdout
    assert re.search(r"^warm start .*3/3", out1, re.M), "the warm start has a bar"
    assert re.search(r"^relax .*2/2", out1, re.M), "the RL steps have a bar"
    assert re.search(r"^  starting policy: Mean@1 [\d.]+, Pass@1 .*\(\d+\.\d s\)$", out1, re.M)
    assert re.search(r"^  final policy: Mean@1 [\d.]+, .*\(\d+\.\d s\)$", out1, re.M)
    assert "Koopman dictionary fitted on step 1's rollouts" in out1
    assert re.search(r"^resuming at step 2 from .*step_000002$", second.stdout, re.M)
    assert "starting policy" not in second.stdout, "a resumed run does not re-evaluate its start"


def test_quiet_prints_nothing(tmp_path):
    result = _train("--out", str(tmp_path / "run"), "--quiet", *TINY, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "" and result.stderr == ""
    assert (tmp_path / "run" / "summary.json").is_file()


def test_wandb_without_login_is_a_one_line_error(tmp_path):
    import pytest

    pytest.importorskip("wandb", reason="wandb is not installed (optional extra: pip install 'latentx[wandb]')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), LATENTX_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    # A fresh HOME has no matplotlib font cache, and building it prints a line of its own: build it first.
    subprocess.run([sys.executable, "-c", "import matplotlib.pyplot"], capture_output=True, env=env, timeout=300, check=True)
    code = "import sys; from latentx.cli import app; sys.argv = ['latentx', *sys.argv[1:]]; app()"
    result = subprocess.run([sys.executable, "-c", code, "train", "--out", str(tmp_path / "run"), *TINY,
                             "--report-to", "wandb"], capture_output=True, text=True, env=env, timeout=600,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: logging.report_to=wandb: wandb.init failed"), errors
    assert "WANDB_MODE=offline" in errors[0] and "Traceback" not in result.stderr
