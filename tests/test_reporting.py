"""TensorBoard / W&B reporting, read back with the trackers' own readers and checked against metrics.jsonl."""

from __future__ import annotations

import json
import math
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from latentx.checkpoint import latest_checkpoint
from latentx.config import ConfigError, apply_overrides
from latentx.reporting import LoggingConfig, eval_scalars, tag_for
from latentx.trainer import TrainConfig, Trainer, read_metrics, resolve_config

import digits_task  # noqa: F401  (registers the "test_digits" task)


def _config(out: Path, *extra: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), [
        "objective=relax", f"out={out}", "task.name=test_digits", "task.train_size=64",
        "warm_start.enabled=false", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=12", "rollout.micro_batch_size=8", "relax.fit_batch_size=4",
        "eval.instances=3", "eval.n=2", "eval.ks=[1,2]", "checkpoint_every=2", "logging.plots=false", *extra,
    ])


def _train(cfg: TrainConfig, steps: int) -> dict:
    return Trainer(resolve_config(apply_overrides(cfg, [f"steps={steps}"])), progress=False, log=lambda *a, **k: None).run()


def _interrupted_then_resumed(out: Path, *extra: str) -> TrainConfig:
    """Run 4 steps, lose the step-4 checkpoint (as if killed after logging steps 3-4), resume to 5."""
    cfg = _config(out, *extra)
    _train(cfg, 4)
    assert latest_checkpoint(cfg.run_dir).name == "step_000004"
    shutil.rmtree(cfg.run_dir / "checkpoints" / "step_000004")
    (cfg.run_dir / "checkpoints" / "LATEST").unlink(missing_ok=True)
    assert latest_checkpoint(cfg.run_dir).name == "step_000002"
    _train(cfg, 5)
    return cfg


# -- key names and config ------------------------------------------------------------------------


def test_keys_are_namespaced_like_trl_and_cleanrl():
    assert tag_for("reward_mean") == "train/reward"
    assert tag_for("accuracy") == "train/accuracy"
    assert tag_for("entropy_mean") == "train/entropy"
    assert tag_for("dsd_mean") == "latent/dsd_mean"
    assert tag_for("er_std") == "latent/er_std"
    assert tag_for("verl_bonus_mean") == "latent/verl_bonus_mean"
    assert tag_for("xp") == "losses/xp"
    assert tag_for("clip_frac") == "losses/clip_frac"
    assert tag_for("time_step") == "time/step"
    assert tag_for("grad_norm") == "train/grad_norm"
    assert tag_for("grad_share/xp") == "grads/share/xp"
    assert tag_for("grad_cos_pg/kl") == "grads/cos_pg/kl"
    assert tag_for("step") is None
    ev = {"instances": 3, "n": 2, "mean@1_greedy": 0.5, "mean@2": 0.25, "pass@k": {"1": 0.25, "2": 0.4},
          "correct_counts": [1, 0, 0]}
    assert eval_scalars(ev) == {"eval/mean@1_greedy": 0.5, "eval/mean@2": 0.25, "eval/pass@1": 0.25, "eval/pass@2": 0.4}


def test_report_to_accepts_a_comma_list_and_names_the_field_on_error():
    cfg = apply_overrides(TrainConfig(), ["logging.report_to=tensorboard,wandb"])
    assert cfg.logging.report_to == ("tensorboard", "wandb")
    assert LoggingConfig(report_to="none").trackers == ()
    with pytest.raises(ConfigError, match="logging.report_to.*mlflow"):
        apply_overrides(TrainConfig(), ["logging.report_to=mlflow"])
    with pytest.raises(ConfigError, match="logging.report_to.*'none' cannot be combined"):
        apply_overrides(TrainConfig(), ["logging.report_to=none,tensorboard"])


# -- TensorBoard ---------------------------------------------------------------------------------


def _tensorboard_scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, acc


def _assert_matches_metrics(scalars: dict[str, list[tuple[int, float]]], rows: list[dict], summary: dict) -> None:
    steps = [r["step"] for r in rows]
    for key in ("reward_mean", "accuracy", "entropy_mean", "dsd_mean", "er_mean", "xp", "pg", "time_step"):
        tag = tag_for(key)
        assert tag in scalars, f"{tag} missing from the TensorBoard run"
        logged = scalars[tag]
        assert [s for s, _ in logged] == steps, f"{tag}: steps {[s for s, _ in logged]} != metrics.jsonl {steps}"
        for (_, value), row in zip(logged, rows):
            assert math.isclose(value, row[key], rel_tol=1e-6, abs_tol=1e-7), (tag, value, row[key])
    start, final = summary["warm_start"]["eval"], summary["eval"]
    for tag, value in eval_scalars(final).items():
        points = scalars[tag]
        assert [s for s, _ in points] == [0, rows[-1]["step"]], f"{tag}: {points}"
        assert math.isclose(points[-1][1], value, abs_tol=1e-7)
        assert math.isclose(points[0][1], eval_scalars(start)[tag], abs_tol=1e-7)


def test_tensorboard_run_matches_metrics_jsonl_across_a_resume(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    cfg = _interrupted_then_resumed(tmp_path / "run", "logging.report_to=tensorboard")
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    log_dir = cfg.run_dir / "tensorboard"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2, "the resumed session appends to the same run"
    scalars, acc = _tensorboard_scalars(log_dir)
    _assert_matches_metrics(scalars, rows, summary)
    # the resolved config is there as hyper-parameters and as text
    from tensorboard.plugins.hparams import metadata as hp_metadata

    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    session = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    assert session.hparams["relax.alpha"].number_value == pytest.approx(cfg.relax.alpha)
    assert session.hparams["objective"].string_value == "relax"
    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    assert "eval/pass@2" in {m.name.tag for m in experiment.metric_infos}
    assert "config/text_summary" in acc.Tags()["tensors"]


# -- W&B ------------------------------------------------------------------------------------------


def _wandb_records(path: Path):
    """The records of an offline ``run-<id>.wandb`` file (wandb's LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb data file"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == checksum, f"{path}: bad record checksum"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_history(path: Path) -> tuple[dict, dict[int, dict[str, float]], dict[str, float]]:
    run, config, history, summary = None, {}, {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history[int(items.pop("_step"))] = items
        elif kind == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.summary.update})
    return {"run": run, "config": config}, history, summary


def test_wandb_offline_run_matches_metrics_jsonl_across_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (optional extra: pip install 'latentx[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _interrupted_then_resumed(tmp_path / "relax-run", "logging.report_to=wandb")
    rows = read_metrics(cfg.run_dir)
    files = sorted((cfg.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, f"one offline file per session, got {files}"
    run_id = (cfg.run_dir / "wandb" / "latentx-run-id").read_text().strip()
    sessions = [_wandb_history(f) for f in files]
    for meta, history, _ in sessions:
        assert meta["run"].run_id == run_id, "the resumed session continues the same W&B run"
        assert meta["run"].display_name == "relax-run", "the W&B run is named after the run directory"
        assert meta["config"]["relax"]["alpha"] == pytest.approx(cfg.relax.alpha)
    (_, first, _), (_, second, summary) = sessions
    assert sorted(first) == [0, 1, 2, 3, 4] and sorted(second) == [3, 4, 5], (sorted(first), sorted(second))
    merged = {**first, **second}  # the later session's values for the steps it re-ran
    for row in rows:
        logged = merged[row["step"]]
        for key in ("reward_mean", "accuracy", "dsd_mean", "xp", "time_step"):
            assert math.isclose(logged[tag_for(key)], row[key], rel_tol=1e-6, abs_tol=1e-7), (row["step"], key)
    final = json.loads((cfg.run_dir / "summary.json").read_text())["eval"]
    for tag, value in eval_scalars(final).items():
        assert math.isclose(second[5][tag], value, abs_tol=1e-7) and math.isclose(summary[tag], value, abs_tol=1e-7)
    assert "eval/pass@1" in first[0], "the starting-policy evaluation is logged at step 0"


def test_wandb_missing_is_a_one_line_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    from latentx.reporting import Reporter, ReportingError

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ReportingError, match=r"wandb needs the wandb package: pip install 'latentx\[wandb\]'"):
        Reporter(LoggingConfig(report_to=("wandb",)), tmp_path)


def test_a_missing_tracker_library_is_reported_before_training(monkeypatch):
    import importlib.util

    from latentx.reporting import ReportingError, require_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    require_trackers(LoggingConfig(report_to=("none",)))
    with pytest.raises(ReportingError, match=r"tensorboard needs the tensorboard package: pip install 'latentx\[tensorboard\]'"):
        require_trackers(LoggingConfig(report_to=("tensorboard",)))
