"""The latent monitor in the verl plugin (``latentx.monitor=true``), with verl's own batch types: the actor's
log-probs / entropies, the loss function and the advantages are verl's, untouched; the driver's ``latent/``
statistics equal latentx.dynamics on the padded reference trajectories of the same forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")
pytest.importorskip("transfer_queue")

from omegaconf import OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils.padding import response_from_nested, response_to_nested  # noqa: E402

from latentx.dynamics import KoopmanDictionary, dsd, rank_dynamics, token_entropy  # noqa: E402
from latentx.integrations.verl.monitor import monitor_batch_metrics  # noqa: E402
from latentx.integrations.verl.settings import parse_settings, settings_to_dict  # noqa: E402
from latentx.objectives import RelaxConfig  # noqa: E402
from latentx.integrations.verl.worker import LatentxActorRolloutRefWorker, LatentxEngineHook  # noqa: E402
from test_integration_verl import (  # noqa: E402
    UIDS,
    FakeFSDPEngine,
    FakeTransferQueue,
    compose,
    engine_forward,
    left_right_batch,
    nested_micro_batch,
    tiny_model,
)

RELAX = {"m": 6, "fit_batch_size": 2}


def entropy_engine(model) -> FakeFSDPEngine:
    """The test file's engine plus what verl's __init__ sets up for entropies (calculate_entropy=True)."""
    from types import SimpleNamespace

    from verl.utils import torch_functional as verl_F

    engine = FakeFSDPEngine(model)
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    return engine
VERL = {"stride": 2, "window": 8}


def monitor_settings(objective: str = "grpo"):
    return parse_settings({"objective": objective, "monitor": True, "relax": RELAX, "verl": VERL})


def test_monitor_settings():
    s = monitor_settings()
    assert s.monitor and s.uses_worker and s.emits_rank_signals and s.needs_dictionary
    assert not s.needs_rank_signals and not s.needs_dsd  # no VERL shaping, no ReLaX loss
    assert parse_settings(settings_to_dict(s)) == s
    plain = parse_settings({"objective": "grpo"})
    assert not plain.monitor and not plain.uses_worker
    with pytest.raises(ValueError, match="latentx.monitor must be true or false"):
        parse_settings({"monitor": "yes"})


def test_hydra_monitor_override_prepares_the_worker_config(tmp_path):
    from latentx.integrations.verl.main import check_config
    from latentx.integrations.verl.trainer import DICTIONARY_FILE, prepare_config

    config = compose(["latentx.monitor=true", f"trainer.default_local_dir={tmp_path}"])
    check_config(config)
    settings = prepare_config(config)
    assert settings.monitor and settings.dictionary_path == str(tmp_path / DICTIONARY_FILE)
    assert config.actor_rollout_ref.latentx.monitor is True
    bypass = compose(["latentx.monitor=true", "algorithm.rollout_correction.bypass_mode=true"])
    with pytest.raises(ValueError, match="bypass_mode=False"):
        prepare_config(bypass)


def padded_reference(model, batch: TensorDict):
    """The ordinary padded forward: response trajectories, mask, per-response mean token entropy."""
    P, C = batch["prompts"].shape[1], batch["responses"].shape[1]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], output_hidden_states=True)
    mask = batch["response_mask"].bool()
    H = out.hidden_states[-1][:, P - 1 : P + C - 1]
    return H, mask, token_entropy(out.logits[:, P - 1 : P + C - 1].float(), mask)


def old_log_prob_pass(engine, hook, micro_batch):
    """One old-log-prob forward as the worker runs it (hook in "infer" mode, or off when hook is None)."""
    if hook is not None:
        hook.mode = "infer"
    try:
        with torch.no_grad():
            return engine_forward(engine, micro_batch)
    finally:
        if hook is not None:
            hook.mode = None


def store_rows(out: dict, micro_batch: TensorDict, rewards: torch.Tensor) -> dict[str, TensorDict]:
    """The TransferQueue rows the driver reads after verl's _compute_old_log_prob and reward step."""
    padded_mask = micro_batch["response_mask"]  # [B, C] here; verl's TransferQueue holds it nested
    lengths = padded_mask.sum(dim=1).long()
    mask = torch.nested.as_nested_tensor([torch.ones(int(n), dtype=torch.int64) for n in lengths], layout=torch.jagged)
    entropy = response_from_nested(out["entropy"], mask)
    scores = torch.zeros(len(lengths), int(lengths.max()))
    scores[torch.arange(len(lengths)), lengths - 1] = rewards
    fields = {
        "response_mask": mask, "entropy": entropy, "rm_scores": response_to_nested(scores, mask),
        **{key: out[key] for key in ("latentx_er", "latentx_erv", "latentx_era", "latentx_dsd")},
    }
    return {f"{u}_{i}": TensorDict({k: v[i] for k, v in fields.items()}, batch_size=[]) for i, u in enumerate(UIDS)}


def test_monitor_leaves_verl_outputs_untouched_and_logs_latentx_dynamics(monkeypatch):
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from latentx.integrations.verl import trainer as vtrainer

    model = tiny_model()
    micro_batch = nested_micro_batch(True)
    tu.assign_non_tensor(micro_batch, calculate_entropy=True)
    plain_engine = entropy_engine(model)
    plain = old_log_prob_pass(plain_engine, None, micro_batch)

    engine = entropy_engine(model)
    hook = LatentxEngineHook(engine, monitor_settings())
    first = old_log_prob_pass(engine, hook, micro_batch)
    # verl's own outputs of the forward are bit-identical with the monitor on
    assert set(plain) <= set(first)
    for key in plain:
        assert torch.equal(first[key].values(), plain[key].values()), key
    assert torch.isnan(first["latentx_dsd"].values()).all()  # no dictionary yet on the first step
    hook.state.finish_first_pass(32, torch.device("cpu"))
    second = old_log_prob_pass(engine, hook, micro_batch)
    for key in plain:
        assert torch.equal(second[key].values(), plain[key].values()), key

    # the dictionary: fitted on the first step's trajectories with the relax settings, as for ReLaX
    H, mask, entropy = padded_reference(model, left_right_batch())
    fitted = KoopmanDictionary.from_config(RelaxConfig(**RELAX), 32).fit(H, mask)
    torch.testing.assert_close(hook.state.dictionary.weight, fitted.weight, atol=1e-5, rtol=1e-4)

    # the driver: statistics from TransferQueue, nothing written back, verl's advantages untouched
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    rank = rank_dynamics(H, mask, stride=2, window=8)
    expected = {"er": rank.er, "erv": rank.erv, "era": rank.era, "entropy": entropy,
                "dsd": dsd(H, mask, hook.state.dictionary)}
    for step, out in enumerate((first, second)):
        store = FakeTransferQueue(store_rows(out, micro_batch, rewards))
        puts = []
        store.kv_batch_put = lambda keys, partition_id, fields: puts.append(fields)
        monkeypatch.setattr(vtrainer, "tq", store)
        monkeypatch.setattr(PPOTrainerSync, "_compute_advantage", lambda self, batch, metrics: "verl's batch")

        class Batch:
            keys, partition_id = list(store.rows), "train"
            tags = [{} for _ in UIDS]

            def __len__(self):
                return len(self.keys)

        trainer = object.__new__(vtrainer.LatentxPPOTrainerSync)
        trainer.latentx_settings = monitor_settings()
        trainer.latentx_shaper = None  # grpo: no VERL shaping
        metrics: dict = {}
        assert trainer._compute_advantage(Batch(), metrics) == "verl's batch" and not puts
        r = rewards.double().numpy()
        for name, values in expected.items():
            if name == "dsd" and step == 0:
                assert not any(key.startswith("latent/dsd_") for key in metrics)
                continue
            v = values.detach().double().numpy()
            assert metrics[f"latent/{name}_mean"] == pytest.approx(v.mean(), rel=1e-4, abs=1e-5), name
            assert metrics[f"latent/{name}_std"] == pytest.approx(v.std(), rel=1e-3, abs=1e-5), name
            for q in (10, 50, 90):
                assert metrics[f"latent/{name}_q{q}"] == pytest.approx(np.quantile(v, q / 100), rel=1e-4, abs=1e-5)
            tolerance = 1e-4 + 1e-5 * abs(v.mean()) / v.std()
            assert metrics[f"latent/{name}_reward_corr"] == pytest.approx(np.corrcoef(v, r)[0, 1], abs=tolerance)
        assert metrics["latent/monitor/responses"] == 6.0


def test_monitor_padding_rows_are_left_out():
    model = tiny_model()
    micro_batch = nested_micro_batch(True)
    tu.assign_non_tensor(micro_batch, calculate_entropy=True)
    engine = entropy_engine(model)
    hook = LatentxEngineHook(engine, monitor_settings())
    out = old_log_prob_pass(engine, hook, micro_batch)
    rows = store_rows(out, micro_batch, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]))
    data = FakeTransferQueue(rows).kv_batch_get(list(rows), "train", list(next(iter(rows.values())).keys()))
    keep = torch.tensor([True] * 5 + [False])
    metrics = monitor_batch_metrics(data, keep)
    H, mask, _ = padded_reference(model, left_right_batch())
    er = rank_dynamics(H, mask, stride=2, window=8).er[:5].double().numpy()
    assert metrics["latent/er_mean"] == pytest.approx(er.mean(), rel=1e-5) and metrics["latent/monitor/responses"] == 5
    del data["latentx_er"]
    with pytest.raises(ValueError, match="latentx_er"):
        monitor_batch_metrics(data)


def test_worker_keeps_verls_loss_and_update_with_the_monitor(monkeypatch):
    """init_model / compute_log_prob / update_actor of the latentx worker with grpo + monitor."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    monkeypatch.setattr(ActorRolloutRefWorker, "init_model", lambda self: None)
    seen_modes = []
    monkeypatch.setattr(ActorRolloutRefWorker, "compute_log_prob", lambda self, data: seen_modes.append(("lp", self.latentx.mode)))
    monkeypatch.setattr(ActorRolloutRefWorker, "update_actor", lambda self, data: seen_modes.append(("up", self.latentx.mode)))
    worker = object.__new__(LatentxActorRolloutRefWorker)
    engine = FakeFSDPEngine(tiny_model())
    engine.model_config = type("ModelConfig", (), {"hf_config": engine.module.config})()
    original_loss = object()
    worker.actor = type("Actor", (), {"engine": engine, "set_loss_fn": lambda self, fn: pytest.fail("loss replaced")})()
    worker.loss_fn = original_loss
    worker.distillation_enabled = False
    worker.config = OmegaConf.create({"latentx": settings_to_dict(monitor_settings())})
    worker.init_model()
    assert worker.latentx is not None and worker.loss_fn is original_loss
    data = TensorDict({}, batch_size=[])
    monkeypatch.setattr(worker.latentx.state, "finish_first_pass", lambda *args: seen_modes.append(("fit", None)))
    worker.compute_log_prob(data)
    worker.update_actor(data)
    assert seen_modes == [("lp", "infer"), ("fit", None), ("up", None)]  # the update forward is verl's alone
