"""Every user error of the command line is one `error: ...` line and exit code 2 (issue 18, items 4 and 9)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from latentx.cli import app
from latentx.config import save_yaml
from latentx.trainer import TrainConfig, resolve_config


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"problem": "1+1", "answer": ')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("  \n\n")
    (tmp_path / "broken.json").write_text('{"a": ')
    (tmp_path / "latin.yaml").write_bytes("steps: caf\xe9\n".encode("latin-1"))
    return tmp_path


@pytest.mark.parametrize("args, fragment", [
    (["train", "--model", "/nonexistent/dir"], "/nonexistent/dir"),
    (["train", "--model", "missing.gguf"], "missing.gguf"),
    (["train", "--task", "math", "--set", "task.data_path={d}/broken.jsonl"], "broken.jsonl"),
    (["train", "--task", "math", "--set", "task.data_path={d}/empty.jsonl"], "empty.jsonl"),
    (["train", "--task", "math", "--set", "task.data_path={d}/blank.jsonl"], "blank.jsonl"),
    (["train", "--task", "math", "--set", "task.data_path={d}/broken.json"], "broken.json"),
    (["train", "--config", "{d}/latin.yaml"], "latin.yaml"),
    (["train", "--set", "model.reference=maybe"], "model.reference"),
    (["train", "--bogus"], "--bogus"),
    (["train", "--steps", "x"], "--steps"),
    (["nosuchcommand"], "nosuchcommand"),
    (["eval", "--model", "tiny", "--timeout", "-1", "--out", "{d}/eval"], "timeout"),
    (["eval", "--model", "/nonexistent/dir", "--out", "{d}/eval"], "/nonexistent/dir"),
])
def test_user_errors_are_one_line_and_exit_2(files, args, fragment, monkeypatch):
    monkeypatch.chdir(files)  # a run directory that a buggy validation would create lands here
    monkeypatch.delenv("LATENTX_DEBUG", raising=False)
    result = CliRunner().invoke(app, [a.format(d=files) for a in args])
    assert fragment in _one_error_line(result)
    assert not (files / "eval").exists() and not (files / "runs").exists(), "validated before anything ran"


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_disagreeing_model_for_an_existing_run_changes_nothing(tmp_path, monkeypatch):
    """Item 4: `latentx train --out EXISTING_RUN --model /nonexistent/dir` exited 0 and rewrote the run."""
    monkeypatch.delenv("LATENTX_DEBUG", raising=False)
    run = tmp_path / "run"
    cfg = resolve_config(TrainConfig(out=str(run), checkpoint_every=1))
    run.mkdir()
    save_yaml(cfg, run / "config.yaml")
    (run / "summary.json").write_text("{}")
    before = _digest(run)
    result = CliRunner().invoke(app, ["train", "--out", str(run), "--model", "/nonexistent/dir"])
    line = _one_error_line(result)
    assert "model.name is 'tiny' there, '/nonexistent/dir' now" in line and "checkpoint_every" in line
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--model", "/nonexistent/dir"])
    assert "model.name is 'tiny' there, '/nonexistent/dir' now" in _one_error_line(result)
    assert _digest(run) == before


def test_unexpected_errors_are_one_line_unless_debugging(tmp_path, monkeypatch):
    import latentx.trainer

    def boom(cfg, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(latentx.trainer, "train", boom)
    monkeypatch.delenv("LATENTX_DEBUG", raising=False)
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: RuntimeError: boom second line (an internal error; "
                                     "LATENTX_DEBUG=1 shows the traceback)")
    monkeypatch.setenv("LATENTX_DEBUG", "1")
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r")])
    assert isinstance(result.exception, RuntimeError)


def test_console_script_prints_one_line():
    """The real entry point (not only the test runner): no rich traceback box on stderr."""
    env = {k: v for k, v in os.environ.items() if k != "LATENTX_DEBUG"}
    out = subprocess.run([sys.executable, "-m", "latentx.cli", "train", "--model", "/nonexistent/dir"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: "), out.stderr
