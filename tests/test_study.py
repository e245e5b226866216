"""``latentx study`` end to end on a tiny config: runs, tuning, report, plots, resume, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from latentx.cli import app
from latentx.config import ConfigError
from latentx.study import StudyConfig, StudyError, check_metric, evaluate_policy, load_study_config, run_study
from latentx.tasks import FunctionTask, register_task
from latentx.trainer import Trainer, resolve_config


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    """One torch thread (tiny forwards gain nothing from more) and no per-run training-curve PNGs
    (the trainer's own plots, not the study's)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(Trainer, "plot", lambda self: [])
    yield
    torch.set_num_threads(threads)


def _digit_reward(inst, response: str) -> float:
    """Correct when the response holds a digit: a random tiny policy solves some problems, not all."""
    return float(any(ch.isdigit() for ch in response))


def _make(rng):
    a, b = rng.randint(1, 40), rng.randint(1, 40)
    return f"{a} {b}>", str(a + b)


register_task(
    "test_study_digits",
    lambda **options: FunctionTask("test_study_digits", reward_fn=_digit_reward, generate=_make, **options),
    overwrite=True,
)

TINY = [
    "steps=1", "task.name=test_study_digits", "task.train_size=32", "warm_start.enabled=false",
    "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6",
    "rollout.micro_batch_size=8", "checkpoint_every=1", "relax.fit_batch_size=4",
    "eval.instances=4", "eval.n=4", "eval.ks=1,2,4", "study.workers=1",
]


def test_study_runs_reports_and_resumes(tmp_path):
    base, study = load_study_config(None, TINY + ["study.objectives=grpo,verl", "study.seeds=2"])
    assert study.seeds == [0, 1]
    out = tmp_path / "study"
    results = run_study(base, study, out, progress=False)

    for objective in ("grpo", "verl"):
        for seed in (0, 1):
            run = out / "runs" / objective / f"s{seed}"
            assert (run / "summary.json").is_file() and (run / "study_eval.json").is_file()
            ev = json.loads((run / "study_eval.json").read_text())
            assert len(ev["correct_counts"]) == 4 and all(0 <= c <= 4 for c in ev["correct_counts"])
            assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    for name in ("pass_at_k.png", "signals.png", "final_metrics.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name
    report = (out / "report.md").read_text()
    assert "| grpo |" in report and "| verl |" in report and "| starting policy |" in report
    assert "Differences against grpo" in report and "low power" in report
    assert "Pass@4" in report and "paired t p" in report and "Steps with a learning signal" in report
    summary = results["summary"]["verl"]
    assert summary["seeds"] == [0, 1] and len(summary["pass_curve"]["mean"]) == 4
    assert summary["mean@1_greedy"]["n"] == 2
    assert {"entropy_mean_trajectory", "er_mean_trajectory", "dsd_mean_trajectory"} <= set(summary)
    assert [c["metric"] for c in results["comparisons"] if c["headline"]][:2] == ["mean@1_greedy", "mean@4"]
    assert json.loads((out / "results.json").read_text())["settings"]["seeds"] == [0, 1]

    # Resume: finished runs are skipped (their files untouched); a deleted evaluation is redone alone.
    done = out / "runs" / "grpo" / "s0" / "summary.json"
    stamp = done.stat().st_mtime_ns
    (out / "runs" / "verl" / "s1" / "study_eval.json").unlink()
    again = run_study(base, study, out, progress=False)
    assert again["invocations"][-1]["runs"] == 1
    assert done.stat().st_mtime_ns == stamp
    assert again["summary"]["verl"]["mean@4"] == results["summary"]["verl"]["mean@4"]
    third = run_study(base, study, out, progress=False)
    assert [inv["runs"] for inv in third["invocations"]] == [4, 1, 0]
    assert "over 2 invocation(s)" in (out / "report.md").read_text()  # the idle rerun adds no wall time

    # A moved study directory still resumes; a changed setting must not mix into existing runs.
    moved = tmp_path / "moved"
    out.rename(moved)
    assert run_study(base, study, moved, progress=False)["invocations"][-1]["runs"] == 0
    changed, _ = load_study_config(None, TINY + ["optim.lr=0.01"])
    with pytest.raises(StudyError, match="different config.*optim.lr"):
        run_study(changed, study, moved, progress=False)


def test_tuning_picks_per_objective_on_validation_seeds(tmp_path):
    base, study = load_study_config(None, TINY + [
        "study.objectives=relax", "study.baseline=relax", "study.seeds=[0]", "study.validation_seeds=[100]",
    ])
    study = StudyConfig(**{**vars(study), "tune": {"relax.alpha": "0.05,0.2"}})
    out = tmp_path / "tuned"
    results = run_study(base, study, out, progress=False)
    choice = json.loads((out / "tune" / "choice.json").read_text())
    relax = choice["objectives"]["relax"]
    assert relax["key"] == "relax.alpha" and relax["runs"] == 2
    means = {e["value"]: e["mean"] for e in relax["grid"]}
    assert relax["value"] == max(means, key=means.get)
    for value in (0.05, 0.2):
        cfg = (out / "tune" / "relax" / f"alpha={value}" / "s100" / "config.yaml").read_text()
        assert "seed: 100" in cfg and "seed: 1235" in cfg  # validation seed and validation eval instances
    study_cfg = (out / "runs" / "relax" / "s0" / "config.yaml").read_text()
    assert f"alpha: {relax['value']}" in study_cfg
    report = (out / "report.md").read_text()
    assert "## Tuning" in report and "`relax.alpha`" in report and "same budget" in report
    assert (out / "plots" / "tuning.png").is_file() and results["tuning"]["metric"] == "mean@1_greedy"


def test_study_eval_counts_agree_with_the_trainer_numbers(tmp_path, monkeypatch):
    from latentx.stats import pass_at_k_curve

    base, _ = load_study_config(None, TINY)
    cfg = resolve_config(base)
    cfg.out = str(tmp_path / "run")
    trainer = Trainer(cfg, progress=False)
    ev = evaluate_policy(trainer)
    assert len(ev["correct_counts"]) == 4 and ev["seed"] == cfg.eval.seed and ev["time_s"] > 0
    assert sum(ev["correct_counts"]) / (4 * 4) == pytest.approx(ev["mean@4"])
    curve = pass_at_k_curve(ev["correct_counts"], 4)
    assert [ev["pass@k"][str(k)] for k in (1, 2, 4)] == pytest.approx([curve[0], curve[1], curve[3]])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"mean@1_greedy": 0.0})
    with pytest.raises(StudyError, match="correct_counts"):
        evaluate_policy(trainer)


def test_study_config_errors():
    with pytest.raises(ConfigError, match="disjoint"):
        load_study_config(None, ["study.seeds=[0,1]", "study.validation_seeds=[1,2]",
                                 "study.objectives=grpo,relax", "study.tune={relax.alpha: [0.1, 0.2]}"])
    with pytest.raises(ConfigError, match="same budget"):
        load_study_config(None, ["study.objectives=grpo,relax,verl",
                                 "study.tune={relax.alpha: [0.1, 0.2], verl.coef: [1, 2, 3]}"])
    with pytest.raises(ConfigError, match="shared by every objective"):
        load_study_config(None, ["study.tune={grpo.clip_high: [0.2, 0.3]}"])
    with pytest.raises(ConfigError, match="not among the study's objectives"):
        load_study_config(None, ["study.objectives=grpo,verl", "study.tune={relax.alpha: [0.1, 0.2]}"])
    with pytest.raises(ConfigError, match="unknown objective"):
        load_study_config(None, ["study.objectives=grpo,relaxx"])
    with pytest.raises(ConfigError, match="baseline"):
        load_study_config(None, ["study.objectives=relax,verl"])
    check_metric("pass@64", 64)
    check_metric("mean@8", 8)
    for bad in ("pass@65", "mean@4", "accuracy", "pass@x"):
        with pytest.raises(StudyError, match="known: mean@1_greedy"):
            check_metric(bad, 8 if bad == "mean@4" else 64)


def test_cli_rejects_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["study", "--seeds", "a,b", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "--seeds" in result.output
    result = runner.invoke(app, ["study", "--tune", "relax.alpha", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "relax.alpha=0.05" in result.output
    result = runner.invoke(app, ["study", "--preset", "tpu", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "cpu, gpu-math" in result.output


def test_presets_load():
    from latentx.study import preset_path

    base, study = load_study_config(preset_path("cpu"))
    assert study.objectives == ["grpo", "relax", "verl"] and study.seeds == [0, 1, 2]
    assert base.eval.n >= 64 and max(base.eval.ks) == 64 and base.model.name == "tiny"
    assert not set(study.validation_seeds) & set(study.seeds)
    from latentx.tasks.benchmarks import find_data_dir

    data = find_data_dir()
    if data is None or not (data / "gsm8k.jsonl").is_file():
        pytest.skip("the shared benchmark files are not here")
    shared = data / "gsm8k.jsonl"  # any existing problem file stands in for the user's MATH train file
    base, study = load_study_config(preset_path("gpu-math"), [f"task.data_path={shared}"])
    assert base.task.name == "math" and base.eval.n == 64 and base.model.device == "cuda"
    assert len({len(v) for v in study.tune.values()}) == 1  # the same tuning budget for every objective
    assert any(o.startswith("task.options.eval_path") for o in study.validation_overrides)


# ---- the pure aggregate, objective variants, the issue-14 presets ----

def _synthetic_record(pass64: float, mean1: float, counts: list[int], grad_share: float | None = None,
                      kl: float | None = None) -> dict:
    """A run record as run_record() makes it, with chosen numbers (n = 4 samples per problem here)."""
    from latentx.stats import pass_at_k_curve, pass_at_k_eval_se

    rec = {"mean@1_greedy": mean1, "mean@4": sum(counts) / (4 * len(counts)), "pass@4": pass64,
           "distinct_correct_per_problem": 1.0, "pass_curve": pass_at_k_curve(counts, 4).tolist(),
           "eval_se": {"pass@4": pass_at_k_eval_se(counts, 4, 4)}, "train_time_s": 1.0, "eval_time_s": 0.1,
           "signal_steps": 1.0, "reward_mean_series": [0.1, 0.2], "reward_mean_final": 0.2}
    if grad_share is not None:
        rec["grad_share"] = {"pg": 1.0 - grad_share, "xp": grad_share}
    if kl is not None:
        rec["kl_set_size"], rec["kl_set_steps"] = kl, 0.5
    return rec


def test_aggregate_is_pure_and_gives_power_verdicts():
    import numpy as np

    from latentx.stats import min_detectable_difference, paired_test
    from latentx.study import aggregate

    base, study = load_study_config(None, TINY + ["study.objectives=grpo,relax", "study.seeds=8",
                                                   "study.target_difference=0.05"])
    rng = np.random.default_rng(0)
    grpo = [0.6 + 0.02 * rng.standard_normal() for _ in range(8)]
    relax = [g + 0.01 * rng.standard_normal() for g in grpo]  # no real difference, small paired spread
    counts = [0, 2, 4, 1]
    per_run = {"grpo": {s: _synthetic_record(grpo[s], 0.3, counts) for s in range(8)},
               "relax": {s: _synthetic_record(relax[s], 0.3, counts, grad_share=0.1 + 0.01 * s, kl=2.0) for s in range(8)}}
    start = {"mean@1_greedy": 0.25, "mean@4": 0.4, "pass@4": 0.55, "distinct_correct_per_problem": 1.0,
             "correct_counts": counts, "n": 4}
    results = aggregate(base, study, per_run, start, None)
    c = next(c for c in results["comparisons"] if c["objective"] == "relax" and c["metric"] == "pass@4")
    test = paired_test(relax, grpo)
    assert c["diff"] == pytest.approx(test.diff.mean) and c["sd"] == pytest.approx(test.diff.std)
    assert c["mde"] == pytest.approx(min_detectable_difference(test.diff.std, 8))
    assert c["verdict"] == ("difference found" if test.t_p < 0.05 else "no difference larger than")
    entry = results["summary"]["relax"]
    assert entry["grad_share"]["xp"] == pytest.approx(np.mean([0.1 + 0.01 * s for s in range(8)]))
    assert entry["kl_set_size"]["mean"] == pytest.approx(2.0) and "kl_set_size" not in results["summary"]["grpo"]
    assert entry["noise"]["pass@4"]["seed_sd"] == pytest.approx(float(np.std(relax, ddof=1)))
    # Three seeds with a wide spread: underpowered, never "not significant".
    few = {o: {s: per_run[o][s] for s in range(3)} for o in per_run}
    few["relax"] = {s: _synthetic_record(grpo[s] + d, 0.3, counts) for s, d in zip(range(3), (0.1, -0.08, 0.02))}
    study3 = load_study_config(None, TINY + ["study.objectives=grpo,relax", "study.seeds=3"])[1]
    c3 = next(c for c in aggregate(base, study3, few, start, None)["comparisons"] if c["metric"] == "pass@4")
    assert c3["verdict"] == "cannot tell (underpowered)" and c3["seeds_for_target"] > 3


def test_objective_variants_and_presets_by_name():
    from latentx.study import objective_of

    assert objective_of("relax") == ("relax", [])
    assert objective_of("verl@enabled") == ("verl", ["verl.preset=enabled"])
    assert objective_of("q", {"q": ["objective=relax", "relax.xi_mode=quantile"]}) == ("relax", ["relax.xi_mode=quantile"])
    with pytest.raises(ValueError, match="no presets"):
        objective_of("grpo@paper")
    with pytest.raises(ValueError, match="unknown objective"):
        objective_of("relaxx")
    with pytest.raises(ValueError, match="objective=NAME"):
        objective_of("q", {"q": ["relax.xi=0.2"]})
    with pytest.raises(ConfigError, match="study.variants"):
        load_study_config(None, TINY + ["study.variants={q: 5}"])


def test_study_runs_objective_presets_as_separate_entries(tmp_path):
    base, study = load_study_config(None, TINY + ["study.objectives=grpo,verl@release,verl@enabled"])
    results = run_study(base, study, tmp_path / "s", progress=False)
    assert set(results["summary"]) == {"grpo", "verl@release", "verl@enabled"}
    cfg = (tmp_path / "s" / "runs" / "verl@enabled" / "s0" / "config.yaml").read_text()
    assert "preset: enabled" in cfg



def test_objective_presets_are_separate_objectives(tmp_path):
    """`verl@paper` and `verl@enabled` run as two objectives of one study (METHODS.md §3b presets)."""
    import yaml

    base, study = load_study_config(None, TINY + ["steps=2", "study.objectives=grpo,verl@paper,verl@enabled", "study.seeds=1"])
    out = tmp_path / "study"
    results = run_study(base, study, out, progress=False)
    for label, preset in (("verl@paper", "paper"), ("verl@enabled", "enabled")):
        saved = yaml.safe_load((out / "runs" / label / "s0" / "config.yaml").read_text())
        assert saved["objective"] == "verl" and saved["verl"]["preset"] == preset
        assert label in results["summary"]
    report = (out / "report.md").read_text()
    assert "| verl@paper |" in report and "| verl@enabled |" in report
    # tuning keys name the label; a bad preset or a preset on a method without presets is one line
    StudyConfig(objectives=["grpo", "verl@enabled"], tune={"verl@enabled.coef": "0.5,1"}, validation_seeds=[9])
    for bad, pattern in ((["grpo", "verl@bogus"], r"verl\.preset must be one of"),
                         (["grpo", "grpo@paper"], "has no presets")):
        with pytest.raises(ValueError, match=pattern):
            StudyConfig(objectives=bad)


def test_issue14_presets_load():
    from latentx.study import preset_path

    base, study = load_study_config(preset_path("cpu-full"))
    assert study.objectives == ["grpo", "relax", "relax@authors", "relax-quantile", "verl", "entropy_bonus", "kl_cov"]
    assert len({len(v) for v in study.tune.values()}) == 1 and study.target_difference == 0.03
    assert base.diagnostics.term_grads_every == 10 and base.eval.n == 64
    hard, _ = load_study_config(preset_path("cpu-hard"))
    assert hard.task.options["num_operands"] == 4


def test_relax_runs_carry_dsd_against_xi_into_the_summary_and_a_plot(tmp_path):
    """Issue 14 item 5: DSD with the ξ in use, from the runs' metrics.jsonl rows (ReLaX only)."""
    import numpy as np

    from latentx.study.aggregate import aggregate, run_record
    from latentx.study.plots import write_plots

    base, study = load_study_config(None, TINY + ["study.objectives=grpo,relax", "study.seeds=2"])
    counts = [0, 2, 4, 1]
    ev = {"correct_counts": counts, "n": 4, "mean@1_greedy": 0.25, "mean@4": 0.4375,
          "distinct_correct_per_problem": 1.0, "time_s": 0.1}
    rows = [{"step": t, "reward_mean": 0.1, "dsd_q50": 0.05 + 0.001 * t, "dsd_q90": 0.1, "dsd_max": 0.2,
             "xi_used": 25.0, "kl_set_size": 0.0} for t in range(1, 6)]
    record = run_record(ev, rows, 4)
    assert record["xi_used_series"] == [25.0] * 5 and record["dsd_q50_series"][0] == pytest.approx(0.051)
    assert "xi_used_series" not in run_record(ev, [{"step": 1, "reward_mean": 0.1}], 4)
    per_run = {"grpo": {s: _synthetic_record(0.7, 0.3, counts) for s in (0, 1)},
               "relax": {s: {**_synthetic_record(0.7, 0.3, counts),
                             **{k: v for k, v in record.items() if k.endswith("_series")}} for s in (0, 1)}}
    start = {"mean@1_greedy": 0.25, "mean@4": 0.4, "pass@4": 0.55, "distinct_correct_per_problem": 1.0,
             "correct_counts": counts, "n": 4}
    results = aggregate(base, study, per_run, start, None)
    assert "dsd_xi" not in results["summary"]["grpo"]
    series = results["summary"]["relax"]["dsd_xi"]
    assert series["xi_used"] == [25.0] * 5 and np.allclose(series["dsd_q50"], [0.05 + 0.001 * t for t in range(1, 6)])
    written = write_plots(results, tmp_path)
    assert "dsd_xi.png" in written and (tmp_path / "dsd_xi.png").stat().st_size > 1000


def test_no_tune_lets_objectives_narrow_a_preset(tmp_path, monkeypatch):
    """`--preset cpu-full --objectives grpo,relax --no-tune`: the preset's grid names objectives that were
    left out; without --no-tune that is the config error naming the entry, with it the grid is dropped."""
    import latentx.study.command as command

    seen = {}

    def fake_run(base, study, out, progress=True):
        seen["study"] = study
        (out).mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text("report")
        return {"wall_time_s": 0.0}

    monkeypatch.setattr(command, "run_study", fake_run)
    runner = CliRunner()
    args = ["study", "--preset", "cpu-full", "--objectives", "grpo,relax", "--seeds", "2", "--out", str(tmp_path / "s")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "not among the study's objectives" in result.output and not seen
    result = runner.invoke(app, [*args, "--no-tune"])
    assert result.exit_code == 0, result.output
    assert seen["study"].objectives == ["grpo", "relax"] and seen["study"].tune == {}
