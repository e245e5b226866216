"""Kill -9 at every write step of a run, then resume: no step is lost or repeated (issue 18, items 1-4).

A hook on :mod:`latentx.crashpoints` copies the run directory at every point between two write steps of
an uninterrupted run.  Each copy is exactly what ``kill -9`` at that moment leaves on disk (no cleanup
code has run), so resuming every copy covers every kill point, with no timing involved.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings

import digits_task  # noqa: F401  (registers the "test_digits" task)
import pytest

from latentx.checkpoint import MetricsWarning, latest_checkpoint, read_metrics, truncate_metrics
from latentx.config import ConfigError, apply_overrides
from latentx.crashpoints import watch
from latentx.trainer import TrainConfig, Trainer, resolve_config


def _config(out, *extra: str) -> TrainConfig:
    return resolve_config(apply_overrides(TrainConfig(), [
        "objective=relax", "steps=3", f"out={out}", "task.name=test_digits", "task.train_size=32",
        "warm_start.enabled=false", "eval.enabled=false", "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8", "rollout.micro_batch_size=4",
        "relax.fit_batch_size=4", "checkpoint_every=2", "keep_checkpoints=1", *extra,
    ]))


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def _leftovers(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.startswith(".") and
                  (p.name.startswith(".tmp-") or p.name.endswith(".tmp")))


def _tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    """Training-curve plots take most of a 3-step run's time and are not what is tested here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "plot", lambda self: [], raising=False)
        yield


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, no_plots):
    """One uninterrupted run and a copy of its directory at every crash point."""
    root = tmp_path_factory.mktemp("kills")
    cfg = _config(root / "run")
    snapshots: list[tuple[str, object]] = []

    def snapshot(name, path):
        dest = root / f"{len(snapshots):02d}-{name.replace(':', '-')}"
        shutil.copytree(cfg.run_dir, dest, symlinks=True)
        snapshots.append((name, dest))

    with watch(snapshot):
        Trainer(cfg, progress=False).run()
    return cfg, _strip_times(read_metrics(cfg.run_dir)), snapshots


def test_crash_points_cover_every_write_step(killed_runs):
    _, rows, snapshots = killed_runs
    assert [r["step"] for r in rows] == [1, 2, 3]
    names = {name for name, _ in snapshots}
    assert names >= {"metrics:appended", "checkpoint:model_written", "checkpoint:state_written",
                     "checkpoint:renamed", "checkpoint:latest_written", "checkpoint:moved_aside",
                     "checkpoint:done", "atomic_write:temporary_written"}
    assert len(snapshots) >= 15


def _copy(source, tmp_path, name):
    directory = tmp_path / name
    shutil.copytree(source, directory, symlinks=True)
    return directory


def _resume(cfg, directory, *extra):
    trainer = Trainer(resolve_config(apply_overrides(cfg, [f"out={directory}", *extra])), progress=False)
    start = trainer.step
    trainer.run()
    return start


def test_every_kill_point_resumes_without_repeating_or_losing_a_step(killed_runs, tmp_path):
    """Items 1 and 2: metrics repeat no step whatever the kill point; a complete step_N is used even when
    LATEST still names N-1; temporary files and folders are swept."""
    cfg, full, snapshots = killed_runs
    for index, (name, source) in enumerate(snapshots):
        directory = _copy(source, tmp_path, f"kill{index}")
        # the newest step_N folder on disk, found here without latentx's own lookup
        steps = [int(p.name[5:]) for p in (directory / "checkpoints").glob("step_*") if (p / "trainer_state.pt").is_file()]
        start = _resume(cfg, directory)
        assert start == max(steps, default=0), (index, name)
        got = _strip_times(read_metrics(directory))
        assert [r["step"] for r in got] == [1, 2, 3], (index, name)
        assert got == full, (index, name)  # the resumed run is the uninterrupted one
        assert _leftovers(directory) == [], (index, name)
        assert latest_checkpoint(directory).name == "step_000003"


def test_complete_checkpoint_is_found_when_latest_lags(killed_runs, tmp_path):
    """Item 2: killed between renaming step_3 into place and updating LATEST (which still names step_2)."""
    cfg, full, snapshots = killed_runs
    renamed = [d for name, d in snapshots if name == "checkpoint:renamed"]
    directory = _copy(renamed[-1], tmp_path, "lagging")
    assert (directory / "checkpoints" / "LATEST").read_text().strip() == "step_000002"
    assert latest_checkpoint(directory).name == "step_000003"
    assert _resume(cfg, directory) == 3
    assert _strip_times(read_metrics(directory)) == full


def test_torn_metrics_line_is_dropped_with_a_warning(killed_runs, tmp_path):
    """Item 3: a kill during the append left half a JSON line, and --resume crashed on it."""
    cfg, full, snapshots = killed_runs
    appended = [d for name, d in snapshots if name == "metrics:appended"]
    for i, source in enumerate(appended):
        directory = _copy(source, tmp_path, f"torn{i}")
        metrics = directory / "metrics.jsonl"
        text = metrics.read_text()
        last_start = text.rstrip("\n").rfind("\n") + 1
        metrics.write_text(text[: last_start + (len(text) - last_start) // 2])  # half of the last row
        with pytest.warns(MetricsWarning, match="torn"):
            _resume(cfg, directory)
        assert _strip_times(read_metrics(directory)) == full


def test_malformed_metrics_line_in_the_middle_is_a_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "x": \n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2"):
        truncate_metrics(tmp_path, 3)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}')  # no final newline: rewritten
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in truncate_metrics(tmp_path, 5)] == [1, 2]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_disagreeing_settings_are_refused_and_change_nothing(killed_runs, tmp_path):
    """Item 4: `--out EXISTING --model /nonexistent/dir` silently resumed and rewrote config.yaml."""
    cfg, _, snapshots = killed_runs
    directory = _copy(snapshots[-1][1], tmp_path, "run")
    before = _tree_digest(directory)
    for override, key, old, new in [
        ("model.name=/nonexistent/dir", "model.name", "'tiny'", "'/nonexistent/dir'"),
        ("checkpoint_every=20", "checkpoint_every", "2", "20"),
        ("relax.alpha=0.5", "relax.alpha", "", "0.5"),
    ]:
        with pytest.raises(ConfigError) as err:
            Trainer(resolve_config(apply_overrides(cfg, [f"out={directory}", override])), progress=False)
        message = str(err.value)
        assert "\n" not in message and key in message and new in message and old in message
        assert "--resume" in message
    assert _tree_digest(directory) == before
    # The settings a run may be continued with: more steps, another location, another device.
    moved = _copy(directory, tmp_path, "moved")
    _resume(cfg, moved, "steps=4", "model.device=cpu")
    assert [r["step"] for r in read_metrics(moved)] == [1, 2, 3, 4]


def test_resume_refuses_a_dictionary_saved_with_other_settings(killed_runs, tmp_path):
    """Issue 17: a checkpoint's Koopman dictionary saved with other settings than the run's is a one-line
    error naming the field (here m), not a silent reload of a dictionary the run never fitted."""
    from latentx.dynamics import KoopmanDictionary

    cfg, _, snapshots = killed_runs
    directory = _copy(snapshots[-1][1], tmp_path, "run")
    path = latest_checkpoint(directory) / "koopman.safetensors"
    saved = KoopmanDictionary.load(path)
    KoopmanDictionary(saved.hidden_size, m=saved.m + 1, seed=saved.seed, **saved.settings.as_dict()).save(path)
    with pytest.raises(ValueError, match=rf"saved with m={saved.m + 1} but this run has m={saved.m}") as err:
        _resume(cfg, directory, "steps=4")
    assert "\n" not in str(err.value) and "koopman.safetensors" in str(err.value)
