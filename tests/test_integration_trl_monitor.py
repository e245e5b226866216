"""The latent monitor in the TRL adapter (``latent_monitor=True``): TRL's GRPO stays bit-identical, and the
logged ``latent/`` statistics equal latentx.dynamics recomputed independently on the same hidden states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402

from latentx.dynamics import KoopmanDictionary, dsd, rank_dynamics, token_entropy  # noqa: E402
from latentx.integrations.trl import LatentGRPOConfig  # noqa: E402
from latentx.objectives import RelaxConfig  # noqa: E402
from test_integration_trl import digit_reward, make_trainer, tiny_dir  # noqa: E402,F401  (tiny_dir: the fixture)

MONITOR = dict(latent_monitor=True, latent_monitor_every=1, relax_m=8, relax_fit_batch_size=4, verl_stride=4)


class GradientRecorder(TrainerCallback):
    """A copy of every parameter's gradient just before each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def run(tiny_dir: Path, out: Path, **options):
    trainer = make_trainer(tiny_dir, out, **{"latent_objective": "grpo", **options})
    recorder = GradientRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return trainer, recorder.steps, params, losses


@pytest.mark.parametrize(
    "layout",
    [
        # TRL runs no old-log-prob forward: the monitor reads half of the batch from TRL's loss forward.
        dict(latent_monitor_fraction=0.5),
        # The same with the generation batch split into 2 shuffled loss micro-batches (one optimizer step).
        dict(latent_monitor_fraction=0.5, per_device_train_batch_size=4, steps_per_generation=2,
             gradient_accumulation_steps=2),
        # TRL runs its old-log-prob forward (2 micro-batches per generation): the monitor reads it.
        dict(per_device_train_batch_size=4, steps_per_generation=2, max_steps=4),
    ],
    ids=["loss_forward", "loss_forward_2_micro", "trl_forward"],
)
def test_monitor_leaves_trl_grpo_bit_identical(tiny_dir, tmp_path, layout):
    _, grads_off, params_off, losses_off = run(tiny_dir, tmp_path / "off", **layout)
    trainer, grads_on, params_on, losses_on = run(tiny_dir, tmp_path / "on", **MONITOR, **layout)
    assert losses_on == losses_off and len(losses_on) == layout.get("max_steps", 2)
    assert len(grads_on) == len(grads_off) == len(losses_on)
    for on, off in zip(grads_on, grads_off):
        assert on.keys() == off.keys() and on
        assert all(torch.equal(on[n], off[n]) for n in on)
    assert params_on.keys() == params_off.keys()
    assert all(torch.equal(params_on[n], params_off[n]) for n in params_on)
    initial = _initial(tiny_dir)
    assert any(not torch.equal(params_on[n], initial[n]) for n in initial.keys() & params_on.keys())  # it trained

    rollouts = [r for r in trainer.latent_records if r["kind"] == "monitor_rollout"]
    finished = [r for r in trainer.latent_records if r["kind"] == "monitor_finish"]
    from_loss = "gradient_accumulation_steps" in layout or "steps_per_generation" not in layout
    assert len(rollouts) == len(finished) == 2  # one per generation batch
    logged = [log for log in trainer.state.log_history if "latent/er_mean" in log]
    assert len(logged) == 2 and all(log["latent/monitor/loss_forward"] == float(from_loss) for log in logged)


def _initial(tiny_dir: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    return {n: p.detach() for n, p in model.named_parameters()}


def independent_signals(tiny_dir: Path, params: dict, batch: dict, rows: torch.Tensor | None):
    """Plain-transformers forward of the monitored rows: (H, mask, per-response mean token entropy)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.eval()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    mask = batch["completion_mask"].bool()
    if rows is not None:
        ids, attention, mask = ids[rows], attention[rows], mask[rows]
    C = batch["completion_ids"].shape[1]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    H = out.hidden_states[-1][:, -(C + 1) : -1]
    entropy = token_entropy(out.logits[:, -(C + 1) : -1].float(), mask)
    return H, mask, entropy


def expected_stats(name: str, values: np.ndarray, rewards: np.ndarray) -> dict[str, float]:
    out = {
        f"{name}_mean": values.mean(),
        f"{name}_std": values.std(),
        f"{name}_q10": np.quantile(values, 0.1),
        f"{name}_q50": np.quantile(values, 0.5),
        f"{name}_q90": np.quantile(values, 0.9),
    }
    if values.std() > 1e-9 and rewards.std() > 1e-9:
        out[f"{name}_reward_corr"] = np.corrcoef(values, rewards)[0, 1]
    return out


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_monitor_metrics_equal_latentx_dynamics(tiny_dir, tmp_path, micro_batches):
    layout = {} if micro_batches == 1 else dict(
        per_device_train_batch_size=4, steps_per_generation=2, gradient_accumulation_steps=2
    )
    trainer = make_trainer(tiny_dir, tmp_path, latent_objective="grpo", latent_monitor_fraction=0.5, **MONITOR, **layout)
    trainer.train()
    tokenizer = trainer.processing_class
    rollouts = [r for r in trainer.latent_records if r["kind"] == "monitor_rollout"]
    finished = [r for r in trainer.latent_records if r["kind"] == "monitor_finish"]
    assert len(rollouts) == len(finished) == 2
    assert rollouts[0]["rows"] is None  # the fit step uses the whole batch
    assert rollouts[1]["rows"] is not None and len(rollouts[1]["rows"]) == 4
    logs = [log for log in trainer.state.log_history if "latent/er_mean" in log]
    assert len(logs) == 2

    dictionary = None
    for rec, done, log in zip(rollouts, finished, logs):
        batch, rows = rec["output"], rec["rows"]
        H, mask, entropy = independent_signals(tiny_dir, rec["params"], batch, rows)
        if dictionary is None:  # fitted once, on the first monitored batch, with the relax_* settings
            dictionary = KoopmanDictionary.from_config(RelaxConfig(m=8, fit_batch_size=4), H.shape[-1]).fit(H, mask)
            monitor_weight = trainer.latent_monitor.koopman.weight
            torch.testing.assert_close(monitor_weight, dictionary.weight, atol=1e-5, rtol=1e-4)
        rank = rank_dynamics(H, mask, stride=4, window=512)
        # the rewards of the monitored rows: the task reward of the decoded completions
        completions = tokenizer.batch_decode(batch["completion_ids"], skip_special_tokens=True)
        picked = rows.tolist() if rows is not None else list(range(len(completions)))
        rewards = np.array(digit_reward([completions[i] for i in picked]), dtype=np.float64)
        np.testing.assert_allclose(done["rewards"].numpy(), rewards, atol=1e-6)  # back in rollout order
        signals = {"er": rank.er, "erv": rank.erv, "era": rank.era, "dsd": dsd(H, mask, dictionary), "entropy": entropy}
        for name, values in signals.items():
            values = values.detach().double().numpy()
            for key, value in expected_stats(name, values, rewards).items():
                tolerance = 1e-4
                if key.endswith("_reward_corr"):  # float32 rounding of a signal, relative to its spread
                    tolerance += 1e-5 * abs(values.mean()) / values.std()
                assert log[f"latent/{key}"] == pytest.approx(value, rel=1e-4, abs=tolerance), key
        assert log["latent/monitor/responses"] == len(picked)
    assert "latent/entropy_reward_corr" in logs[0] and "latent/dsd_reward_corr" in logs[0]


def test_monitor_runs_every_nth_step_and_with_latent_objectives(tiny_dir, tmp_path):
    trainer = make_trainer(
        tiny_dir, tmp_path / "every", latent_objective="grpo", **{**MONITOR, "latent_monitor_every": 2}, max_steps=3
    )
    trainer.train()
    steps = [log["step"] for log in trainer.state.log_history if "latent/er_mean" in log]
    assert steps == [1, 3]  # global steps 0 and 2 are monitored (logged after their update as steps 1 and 3)

    # With the verl objective the monitor reads the forward the objective runs anyway, every step.
    trainer = make_trainer(tiny_dir, tmp_path / "verl", latent_objective="verl", **MONITOR)
    trainer.train()
    verl = [r for r in trainer.latent_records if r["kind"] == "verl_rollout"]
    logs = [log for log in trainer.state.log_history if "latent/dsd_q50" in log]
    assert len(logs) == 2 and len(verl) == 2
    for rec, log in zip(verl, logs):
        assert log["latent/er_q50"] == pytest.approx(float(np.quantile(rec["er"].double().numpy(), 0.5)), rel=1e-5)
        assert log["latent/er_mean"] == pytest.approx(log["latent/verl/m_er"] * 0 + float(rec["er"].mean()), rel=1e-5)


def test_monitor_reads_the_loss_forward_kl_cov_shares(tiny_dir, tmp_path):
    # kl_cov reads the loss forward for its own term too: one capture feeds both, and the run equals the
    # monitor-off run exactly.
    _, grads_off, params_off, losses_off = run(tiny_dir, tmp_path / "off", latent_objective="kl_cov")
    trainer, grads_on, params_on, losses_on = run(tiny_dir, tmp_path / "on", latent_objective="kl_cov", **MONITOR)
    assert losses_on == losses_off and len(grads_on) == len(grads_off) == 2
    assert all(torch.equal(on[n], off[n]) for on, off in zip(grads_on, grads_off) for n in on)
    assert all(torch.equal(params_on[n], params_off[n]) for n in params_on)
    logs = [log for log in trainer.state.log_history if "latent/er_mean" in log]
    assert len(logs) == 2 and all(log["latent/monitor/loss_forward"] == 1.0 for log in logs)
    assert all("latent/kl_cov/term" in log for log in logs)


def test_monitor_options_are_validated():
    with pytest.raises(ValueError, match="latent_monitor_every must be an integer >= 1"):
        LatentGRPOConfig(output_dir="unused", use_cpu=True, report_to=[], latent_monitor_every=0)
    with pytest.raises(ValueError, match=r"latent_monitor_fraction must be a number in \(0, 1\]"):
        LatentGRPOConfig(output_dir="unused", use_cpu=True, report_to=[], latent_monitor_fraction=1.5)
    with pytest.raises(ValueError, match="verl_stride"):
        LatentGRPOConfig(output_dir="unused", use_cpu=True, report_to=[], latent_objective="grpo",
                         latent_monitor=True, verl_stride=0)
