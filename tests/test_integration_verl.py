"""latentx.integrations.verl against verl 0.9.1's own batch types and code paths, on the CPU.

Runs in the verl environment (``make test-verl`` / docs/verl.md); skipped where verl is not installed.
The FSDP engine's real ``prepare_model_inputs`` / ``prepare_model_outputs`` run on a tiny Qwen2 (on an
engine object built without FSDP: no GPU, no process group), verl's ``ppo_loss`` runs with the
``ActorConfig`` that verl's Hydra config composes to, and verl's plugin loader runs in a fresh interpreter.
No Ray cluster is started.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

verl = pytest.importorskip("verl")
pytest.importorskip("transfer_queue")

from omegaconf import OmegaConf, open_dict  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, response_to_nested  # noqa: E402

from latentx.dynamics import KoopmanDictionary, dsd, rank_dynamics  # noqa: E402
from latentx.integrations.verl import PLUGIN_MODULE, loss as vloss  # noqa: E402
from latentx.integrations.verl.advantage import shape_advantages  # noqa: E402
from latentx.integrations.verl.settings import parse_settings, settings_to_dict  # noqa: E402
from latentx.integrations.verl.signals import per_response_nested, per_response_values  # noqa: E402
from latentx.integrations.verl.worker import DictionaryState, LatentxEngineHook  # noqa: E402
from latentx.objectives import (  # noqa: E402
    GRPOConfig,
    PolicyBatch,
    RelaxConfig,
    VerlConfig,
    VerlInputs,
    VerlShaper,
    grpo_loss,
    relax_loss,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "src" / "latentx" / "integrations" / "verl" / "config"
REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------
# A tiny policy and a verl micro-batch (left-padded prompts, right-padded responses -> verl's nested layout)
# ----------------------------------------------------------------------------------------------------

PROMPT_LENS = [6, 3, 5, 2, 4, 6]
RESPONSE_LENS = [10, 7, 1, 9, 12, 4]
UIDS = ["a", "a", "a", "b", "b", "b"]  # two prompt groups of R = 3


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def left_right_batch(seed: int = 0) -> TensorDict:
    """verl's rollout layout: prompts left-padded to P, responses right-padded to C."""
    gen = torch.Generator().manual_seed(seed)
    B, P, C = len(PROMPT_LENS), max(PROMPT_LENS), max(RESPONSE_LENS)
    prompts = torch.zeros(B, P, dtype=torch.long)
    responses = torch.zeros(B, C, dtype=torch.long)
    attention = torch.zeros(B, P + C, dtype=torch.long)
    for b, (p, c) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        prompts[b, P - p :] = torch.randint(1, 64, (p,), generator=gen)
        responses[b, :c] = torch.randint(1, 64, (c,), generator=gen)
        attention[b, P - p : P + c] = 1
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    return TensorDict(
        {
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": attention,
            "position_ids": position_ids,
            "response_mask": attention[:, P:].clone(),
            "temperature": torch.ones(B),
        },
        batch_size=B,
    )


def padded_reference_trajectories(model: Qwen2ForCausalLM, batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
    """METHODS.md §0 on the ordinary padded forward: the states that predict each response token."""
    P = batch["prompts"].shape[1]
    C = batch["responses"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        output_hidden_states=True,
    )
    H = out.hidden_states[-1][:, P - 1 : P + C - 1]
    return H, batch["response_mask"].bool()


class FakeFSDPEngine(FSDPEngineWithLMHead):
    """verl's FSDP LM-head engine without FSDP: its own input/output processing around a plain module."""

    def __init__(self, module: torch.nn.Module, pad_to_length: int = 0) -> None:  # no super().__init__
        self.module = module
        self.use_ulysses_sp = False
        self.pad_to_length = bool(pad_to_length)
        self.pad_to_length_bucket = pad_to_length


def engine_forward(engine: FakeFSDPEngine, micro_batch: TensorDict) -> dict:
    """What ``FSDPEngineWithLMHead.forward_step`` does between the forward and the loss."""
    model_inputs, output_args = engine.prepare_model_inputs(micro_batch=micro_batch)
    raw = engine.module(**model_inputs, use_cache=False)
    return engine.prepare_model_outputs(
        output=raw, output_args=output_args, micro_batch=micro_batch, logits_processor_func=None
    )


def nested_micro_batch(use_remove_padding: bool, seed: int = 0) -> TensorDict:
    td = left_right_2_no_padding(left_right_batch(seed))
    tu.assign_non_tensor(td, use_remove_padding=use_remove_padding)
    return td


def settings(objective: str, **relax) -> object:
    return parse_settings({"objective": objective, "relax": relax, "verl": {"stride": 2, "window": 8}})


# ----------------------------------------------------------------------------------------------------
# settings and the Hydra config
# ----------------------------------------------------------------------------------------------------


def test_settings_round_trip_and_errors_name_the_field():
    s = parse_settings({"objective": "relax", "relax": {"alpha": 0.2, "fit_max_trajectories": 8}, "verl": {"gain": 3.0}})
    assert s.relax.alpha == 0.2 and s.fit_max_trajectories == 8 and s.verl.gain == 3.0
    assert parse_settings(settings_to_dict(s)) == s
    assert parse_settings(None).objective == "grpo"
    with pytest.raises(ValueError, match=r"latentx\.relax\.alpha"):
        parse_settings({"objective": "relax", "relax": {"alpha": -1.0}})
    with pytest.raises(ValueError, match=r"latentx\.verl\.bogus"):
        parse_settings({"verl": {"bogus": 1}})
    with pytest.raises(ValueError, match=r"latentx\.objective"):
        parse_settings({"objective": "ppo"})
    with pytest.raises(ValueError, match=r"latentx\.relax\.refit_every"):
        parse_settings({"objective": "relax", "relax": {"refit_every": 50}})


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name="latentx_trainer", overrides=overrides)


def test_hydra_config_is_verl_ppo_trainer_plus_latentx_and_prepare_config(tmp_path):
    from latentx.integrations.verl.main import add_plugin_to_runtime_env, check_config
    from latentx.integrations.verl.trainer import prepare_config

    cfg = compose(
        [
            "latentx.objective=relax",
            "latentx.relax.alpha=0.3",
            "actor_rollout_ref.rollout.n=4",
            "algorithm.adv_estimator=grpo",
            f"trainer.default_local_dir={tmp_path}",
        ]
    )
    assert cfg.trainer.v1.trainer_mode == "latentx_sync"
    assert cfg.actor_rollout_ref.actor.strategy in ("fsdp", "fsdp2")  # verl's own defaults are there
    check_config(cfg)
    with pytest.raises(ValueError, match=r"latentx\.relax\.beta"):  # ReLaX's KL needs reference log-probs
        prepare_config(cfg)
    with open_dict(cfg):
        cfg.actor_rollout_ref.actor.use_kl_loss = True
    s = prepare_config(cfg)
    assert s.group_size == 4 and s.relax.alpha == 0.3
    assert s.dictionary_path == str(tmp_path / "latentx_koopman.safetensors")
    assert parse_settings(cfg.actor_rollout_ref.latentx) == s  # what the workers will read

    add_plugin_to_runtime_env(cfg)
    env = cfg.ray_kwargs.ray_init.runtime_env.env_vars
    assert PLUGIN_MODULE in env.VERL_USE_EXTERNAL_MODULES.split(",")

    bad = compose(["latentx.objective=verl", "trainer.v1.trainer_mode=sync"])
    with pytest.raises(ValueError, match="trainer.v1.trainer_mode"):
        check_config(bad)


# ----------------------------------------------------------------------------------------------------
# plugin loading (verl's own loader, fresh interpreters, no Ray)
# ----------------------------------------------------------------------------------------------------

PROBE = "import verl; from verl.trainer.ppo.v1 import get_trainer_cls; print('TRAINER', get_trainer_cls('latentx_sync').__name__)"


def _probe(env: dict[str, str]) -> subprocess.Popen:
    full = {**os.environ, "PYTHONWARNINGS": "ignore", **env}
    return subprocess.Popen([sys.executable, "-c", PROBE], env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_verl_loads_the_plugin_from_entry_point_and_from_env_var(tmp_path):
    # An installed distribution advertising the entry point (what the lead's pyproject declares).
    dist = tmp_path / "latentx_plugin_probe-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: latentx-plugin-probe\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(f"[verl.plugins]\nlatentx = {PLUGIN_MODULE}\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    runs = {
        "entry_point": _probe({"PYTHONPATH": path, "VERL_USE_EXTERNAL_PLUGINS": "latentx", "VERL_USE_EXTERNAL_MODULES": ""}),
        "env_var": _probe({"VERL_USE_EXTERNAL_PLUGINS": "none", "VERL_USE_EXTERNAL_MODULES": PLUGIN_MODULE}),
        "neither": _probe({"VERL_USE_EXTERNAL_PLUGINS": "none", "VERL_USE_EXTERNAL_MODULES": ""}),
    }
    outputs = {name: proc.communicate(timeout=400)[0] for name, proc in runs.items()}
    assert "TRAINER LatentxPPOTrainerSync" in outputs["entry_point"], outputs["entry_point"][-2000:]
    assert "TRAINER LatentxPPOTrainerSync" in outputs["env_var"], outputs["env_var"][-2000:]
    assert "Unknown trainer 'latentx_sync'" in outputs["neither"], outputs["neither"][-2000:]


# ----------------------------------------------------------------------------------------------------
# hidden states: packed (padding-free) and padded engine paths == the padded reference
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_remove_padding,pad_to_length", [(True, 0), (True, 16), (False, 0)])
def test_engine_hook_signals_equal_padded_reference(use_remove_padding, pad_to_length):
    model = tiny_model()
    engine = FakeFSDPEngine(model, pad_to_length=pad_to_length)
    s = settings("verl")
    hook = LatentxEngineHook(engine, s)
    hook.keep_last = True
    micro_batch = nested_micro_batch(use_remove_padding)

    hook.mode = "infer"
    with torch.no_grad():
        out = engine_forward(engine, micro_batch)
        H_ref, mask_ref = padded_reference_trajectories(model, left_right_batch())
    hook.mode = None

    # the trajectories themselves
    H, mask = hook.last_trajectories
    W = mask.shape[1]
    assert torch.equal(mask, mask_ref[:, :W]) and not mask_ref[:, W:].any()
    torch.testing.assert_close(H[mask], H_ref[:, :W][mask], atol=1e-5, rtol=1e-5)

    # and the per-response signals, as written to the batch
    ref = rank_dynamics(H_ref, mask_ref, stride=s.verl.stride, window=s.verl.window)
    for key, value in (("latentx_er", ref.er), ("latentx_erv", ref.erv), ("latentx_era", ref.era)):
        assert out[key].is_nested and out[key].offsets().diff().eq(1).all()
        torch.testing.assert_close(per_response_values(out[key]), value.float(), atol=1e-4, rtol=1e-4)
    assert "log_probs" in out and "latentx_dsd" not in out

    # with the hook off (rollout / reference forwards) nothing is added
    with torch.no_grad():
        plain = engine_forward(engine, micro_batch)
    assert not any(key.startswith("latentx_") for key in plain)


def test_relax_first_pass_fits_dictionary_then_emits_dsd_and_train_dsd_has_grad(tmp_path):
    model = tiny_model()
    engine = FakeFSDPEngine(model)
    path = tmp_path / "koopman.safetensors"
    s = settings("relax", m=6, fit_batch_size=2)
    s.dictionary_path = str(path)
    hook = LatentxEngineHook(engine, s)
    micro_batch = nested_micro_batch(True)

    hook.mode = "infer"
    with torch.no_grad():
        first = engine_forward(engine, micro_batch)
    hook.mode = None
    assert "latentx_dsd" not in first and hook.state.collecting
    hook.state.finish_first_pass(32, torch.device("cpu"))
    assert path.exists() and not hook.state.collecting

    # the same fit, done by hand on the padded reference trajectories
    H_ref, mask_ref = padded_reference_trajectories(model, left_right_batch())
    manual = KoopmanDictionary(
        32, 6, s.relax.fit_seed, fit_lr=s.relax.fit_lr, fit_batch_size=2, fit_loss=s.relax.fit_loss, ridge=s.relax.ridge
    ).fit(H_ref.detach(), mask_ref)
    torch.testing.assert_close(hook.state.dictionary.weight, manual.weight, atol=1e-5, rtol=1e-4)
    assert not hook.state.dictionary.weight.requires_grad

    hook.mode = "infer"
    with torch.no_grad():
        second = engine_forward(engine, micro_batch)
    hook.mode = None
    expected = dsd(H_ref.detach(), mask_ref, hook.state.dictionary)
    torch.testing.assert_close(per_response_values(second["latentx_dsd"]), expected.float(), atol=1e-4, rtol=1e-4)

    hook.mode = "train"
    train = engine_forward(engine, micro_batch)
    hook.mode = None
    assert train["latentx_dsd"].requires_grad and not train["latentx_dsd"].is_nested
    train["latentx_dsd"].sum().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0

    # resume: a new process finds the saved dictionary
    again = DictionaryState(s)
    assert again.load_if_saved(32, torch.device("cpu"))
    torch.testing.assert_close(again.dictionary.weight, hook.state.dictionary.weight)


def test_fit_sample_is_capped():
    s = settings("relax")
    s.fit_max_trajectories = 4
    state = DictionaryState(s)
    state.collect(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool))
    state.collect(torch.randn(3, 7, 8), torch.ones(3, 7, dtype=torch.bool))
    H, mask = state._padded_sample()
    assert H.shape == (4, 7, 8) and mask[:3, 5:].sum() == 0 and mask[3].all()


# ----------------------------------------------------------------------------------------------------
# ReLaX loss inside verl's ppo_loss
# ----------------------------------------------------------------------------------------------------


def actor_config(loss_agg_mode: str = "token-mean"):
    from verl.utils.config import omega_conf_to_dataclass

    cfg = compose(
        [
            "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.actor.use_kl_loss=True",
            "actor_rollout_ref.actor.kl_loss_coef=0.0",
            f"actor_rollout_ref.actor.loss_agg_mode={loss_agg_mode}",
            "actor_rollout_ref.rollout.n=3",
            "actor_rollout_ref.model.path=unused",
        ]
    )
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def update_micro_batch(model: Qwen2ForCausalLM, relax_cfg: RelaxConfig, seed: int = 0):
    """An update micro-batch in verl's layout, with old / ref log-probs and GRPO advantages."""
    td = nested_micro_batch(True, seed)
    B = td.batch_size[0]
    gen = torch.Generator().manual_seed(seed + 1)
    mask_nested = torch.nested.as_nested_tensor([torch.ones(n) for n in RESPONSE_LENS], layout=torch.jagged)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    scores = torch.zeros(td["response_mask"].shape)
    last = td["response_mask"].sum(1) - 1
    scores[torch.arange(B), last] = rewards
    adv, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=scores, response_mask=td["response_mask"].float(), index=UIDS
    )
    W = td["response_mask"].shape[1]
    td["advantages"] = response_to_nested(adv, mask_nested)
    td["old_log_probs"] = response_to_nested(-torch.rand(B, W, generator=gen) - 1.0, mask_nested)
    td["ref_log_prob"] = response_to_nested(-torch.rand(B, W, generator=gen) - 1.0, mask_nested)
    td["response_mask"] = mask_nested
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=int(td["response_mask"].values().sum()), global_batch_size=B)
    td.set_non_tensor("uid", UIDS)
    return td


@pytest.mark.parametrize("kl_set", ["paper", "code"])
def test_relax_ppo_loss_adds_exactly_relax_terms(kl_set):
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding

    model = tiny_model()
    engine = FakeFSDPEngine(model)
    relax_cfg = RelaxConfig(m=6, xi=0.0, alpha=0.7, beta=0.5, kl_set=kl_set)
    s = parse_settings({"objective": "relax", "relax": {"m": 6, "xi": 0.0, "alpha": 0.7, "beta": 0.5, "kl_set": kl_set}})
    hook = LatentxEngineHook(engine, s)
    hook.state._install(torch.randn(6, 32) / math.sqrt(32))
    micro_batch = update_micro_batch(model, relax_cfg)
    config = actor_config()

    hook.mode = "train"
    model_output = engine_forward(engine, micro_batch)
    hook.mode = None
    total, metrics = vloss.relax_ppo_loss(config, model_output, micro_batch, relax=relax_cfg, group_size=3)
    base, _ = ppo_loss(config, model_output, micro_batch)

    # the same micro-batch through latentx.objectives
    logp = no_padding_2_padding(model_output["log_probs"], micro_batch)
    padded = micro_batch.select("response_mask", "advantages", "old_log_probs", "ref_log_prob").to_padded_tensor()
    W = logp.shape[1]
    batch = PolicyBatch(
        logp=logp,
        old_logp=padded["old_log_probs"][:, :W],
        mask=padded["response_mask"][:, :W].bool(),
        advantages=padded["advantages"][:, :W],
        group=torch.tensor([0, 0, 0, 1, 1, 1]),
        ref_logp=padded["ref_log_prob"][:, :W],
        dsd=model_output["latentx_dsd"],
    )
    grpo = GRPOConfig()
    expected = relax_loss(batch, relax_cfg, grpo)
    terms = expected.terms
    assert terms["kl_set_size"] > 0 and terms["xp"] != 0.0
    extra = total - base
    assert extra.item() == pytest.approx(relax_cfg.alpha * terms["xp"] + terms["kl_set_penalty"], rel=1e-5, abs=1e-6)
    assert metrics["latentx/relax_kl_set_size"].aggregate() == terms["kl_set_size"]

    # gradients of the added terms == gradients of (relax_loss - grpo_loss) on the same forward
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(extra, params, retain_graph=True, allow_unused=True)
    theirs = torch.autograd.grad(expected.loss - grpo_loss(batch, grpo).loss, params, allow_unused=True)
    for a, b in zip(ours, theirs):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_relax_terms_accumulate_over_micro_batches_and_dp_ranks():
    """Whole groups split over micro-batches / ranks add up (with verl's dp_size factor) to the full term."""
    torch.manual_seed(3)
    cfg = RelaxConfig(xi=0.5, alpha=0.2, beta=0.1)
    B, T = 8, 5
    dsd = torch.rand(B, requires_grad=True)
    adv = torch.randn(B, 1).expand(B, T)
    group = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    logp, ref = -torch.rand(B, T), -torch.rand(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    full, _ = vloss.relax_terms(dsd, adv, group, logp, ref, mask, cfg, dp_size=1, global_batch_size=B)
    parts = [slice(0, 4), slice(4, 8)]
    # two micro-batches on one rank
    acc = sum(vloss.relax_terms(dsd[p], adv[p], group[p], logp[p], ref[p], mask[p], cfg, 1, B)[0] for p in parts)
    # or one micro-batch on each of two ranks: FSDP averages the two ranks' gradients (dp_size = 2)
    ranks = sum(vloss.relax_terms(dsd[p], adv[p], group[p], logp[p], ref[p], mask[p], cfg, 2, B)[0] for p in parts) / 2
    # the xp part is exact whenever groups are whole; the KL-over-I part is a per-micro-batch mean
    xp_only = RelaxConfig(xi=0.5, alpha=0.2, beta=0.0)
    full_xp, _ = vloss.relax_terms(dsd, adv, group, logp, ref, mask, xp_only, 1, B)
    acc_xp = sum(vloss.relax_terms(dsd[p], adv[p], group[p], logp[p], ref[p], mask[p], xp_only, 1, B)[0] for p in parts)
    torch.testing.assert_close(acc_xp, full_xp)
    torch.testing.assert_close(acc, ranks)
    grad_full = torch.autograd.grad(full_xp, dsd)[0]
    grad_acc = torch.autograd.grad(acc_xp, dsd)[0]
    torch.testing.assert_close(grad_acc, grad_full)
    assert full.item() != 0.0


def test_split_groups_are_reported():
    cfg = RelaxConfig(xi=0.5)
    dsd, adv = torch.rand(4), torch.ones(4, 3)
    _, metrics = vloss.relax_terms(
        dsd, adv, torch.tensor([0, 0, 1, 1]), -torch.rand(4, 3), None, torch.ones(4, 3, dtype=torch.bool), cfg,
        group_size=3,
    )
    assert metrics["latentx/relax_split_groups"] == 2.0 and metrics["latentx/relax_ref_available"] == 0.0


# ----------------------------------------------------------------------------------------------------
# VERL shaping on the driver
# ----------------------------------------------------------------------------------------------------


def shaping_batch(seed: int) -> tuple[TensorDict, dict]:
    """What the driver reads from TransferQueue: nested advantages / masks / rewards, nested [B, 1] signals."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 7, 2, 6, 4]
    B, W = len(lengths), max(lengths)
    mask = torch.zeros(B, W)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    mask_nested = torch.nested.as_nested_tensor([torch.ones(n) for n in lengths], layout=torch.jagged)
    scores = torch.zeros(B, W)
    rewards = torch.randint(0, 2, (B,), generator=gen).float()
    scores[torch.arange(B), torch.tensor(lengths) - 1] = rewards
    adv, _ = core_algos.compute_grpo_outcome_advantage(token_level_rewards=scores, response_mask=mask, index=UIDS)
    signals = {k: torch.rand(B, generator=gen) * 10 for k in ("er", "erv", "era")}
    td = TensorDict(
        {
            "advantages": response_to_nested(adv, mask_nested),
            "response_mask": mask_nested,
            "rm_scores": response_to_nested(scores, mask_nested),
            **{f"latentx_{k}": per_response_nested(v) for k, v in signals.items()},
        },
        batch_size=B,
    )
    return td, {"adv": adv[:, 0], "mask": mask.bool(), "rewards": rewards, **signals}


@pytest.mark.parametrize("apply_to,performance_scaling", [("all_tokens", False), ("last_token", True)])
def test_shape_advantages_equals_verl_shaper(apply_to, performance_scaling):
    cfg = VerlConfig(apply_to=apply_to, performance_scaling=performance_scaling)
    ours, reference = VerlShaper(cfg), VerlShaper(cfg)
    for step in range(3):
        td, raw = shaping_batch(step)
        shaped, info = shape_advantages(td, ours)
        expected, expected_info = reference.shape(
            VerlInputs(raw["adv"], raw["er"], raw["erv"], raw["era"],
                       rewards=raw["rewards"] if performance_scaling else None),
            raw["mask"],
        )
        torch.testing.assert_close(shaped, expected)
        assert info["latentx/verl_first_step"] == (1.0 if step == 0 else 0.0)
        assert info["latentx/verl_bonus_mean"] == pytest.approx(expected_info["verl_bonus_mean"])
    assert ours.state_dict() == reference.state_dict()
    assert (shaped != raw["adv"][:, None] * raw["mask"]).any()  # shaping did something by step 3


def test_shape_advantages_skips_padding_rows_and_names_missing_fields():
    cfg = VerlConfig()
    ours, reference = VerlShaper(cfg), VerlShaper(cfg)
    keep = torch.tensor([True, True, True, True, False, False])
    for step in range(2):
        td, raw = shaping_batch(step)
        shaped, _ = shape_advantages(td, ours, keep)
        expected, _ = reference.shape(VerlInputs(raw["adv"][:4], raw["er"][:4], raw["erv"][:4], raw["era"][:4]),
                                      raw["mask"][:4])
        torch.testing.assert_close(shaped[:4], expected)
        torch.testing.assert_close(shaped[4:], raw["adv"][4:, None] * raw["mask"][4:])
    assert ours.state_dict() == reference.state_dict()
    td, _ = shaping_batch(0)
    del td["latentx_era"]
    with pytest.raises(ValueError, match="latentx_era"):
        shape_advantages(td, VerlShaper(cfg))


def test_shape_advantages_release_is_verls_grpo_bit_for_bit():
    shaper = VerlShaper(VerlConfig(preset="release"))
    for step in range(3):
        td, raw = shaping_batch(step)
        shaped, info = shape_advantages(td, shaper)
        verl_adv = torch.nested.to_padded_tensor(td["advantages"], 0.0, output_size=tuple(raw["mask"].shape))
        assert torch.equal(shaped, verl_adv)
        assert info["latentx/verl_active"] == 0.0
    assert shaper.baselines.steps == 3


def test_shape_advantages_enabled_uses_verls_groups():
    """verl.preset=enabled: aux enters the reward and GRPO re-runs over verl's uid groups (Dr. GRPO too)."""
    for norm_by_std in (True, False):
        cfg = VerlConfig(preset="enabled")
        ours, reference = VerlShaper(cfg), VerlShaper(cfg)
        group = torch.tensor([0, 0, 0, 1, 1, 1])
        for step in range(3):
            td, raw = shaping_batch(step)
            td.set_non_tensor("uid", UIDS)
            shaped, _ = shape_advantages(td, ours, norm_adv_by_std=norm_by_std)
            expected, _ = reference.shape(
                VerlInputs(raw["adv"], raw["er"], raw["erv"], raw["era"], rewards=raw["rewards"], group=group,
                           advantage_std=norm_by_std),
                raw["mask"],
            )
            torch.testing.assert_close(shaped, expected)
        assert (shaped != raw["adv"][:, None] * raw["mask"]).any()
    td, _ = shaping_batch(0)
    with pytest.raises(ValueError, match="uid"):
        shape_advantages(td, VerlShaper(VerlConfig(aux_in_reward=True)))


class FakeTransferQueue:
    """In-memory stand-in for TransferQueue's kv_batch_get / kv_batch_put (the driver's only TQ calls)."""

    def __init__(self, rows: dict[str, TensorDict]) -> None:
        self.rows = rows

    def kv_batch_get(self, keys, partition_id, select_fields):
        return _stack([self.rows[k] for k in keys], select_fields)

    def kv_batch_put(self, keys, partition_id, fields):
        for i, key in enumerate(keys):
            for name in fields.keys():
                self.rows[key][name] = fields[name][i]
        return "meta"


def _stack(rows: list[TensorDict], fields: list[str]) -> TensorDict:
    out = {}
    for name in fields:
        values = [row[name] for row in rows]
        out[name] = torch.nested.as_nested_tensor(values, layout=torch.jagged)
    return TensorDict(out, batch_size=len(rows))


def test_trainer_compute_advantage_shapes_through_transfer_queue(monkeypatch):
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from latentx.integrations.verl import trainer as vtrainer

    td, raw = shaping_batch(0)
    keys = [f"{u}_0_{i}" for i, u in enumerate(UIDS)]
    rows = {k: TensorDict({name: td[name][i] for name in td.keys()}, batch_size=[]) for i, k in enumerate(keys)}
    store = FakeTransferQueue(rows)
    monkeypatch.setattr(vtrainer, "tq", store)
    monkeypatch.setattr(PPOTrainerSync, "_compute_advantage", lambda self, batch, metrics: batch)

    class Batch:
        def __init__(self):
            self.keys, self.partition_id = keys, "train"
            self.tags = [{} for _ in keys[:-1]] + [{"is_padding": True}]

        def __len__(self):
            return len(self.keys)

    trainer = object.__new__(vtrainer.LatentxPPOTrainerSync)
    trainer.latentx_settings = parse_settings({"objective": "verl"})
    trainer.latentx_shaper = VerlShaper(VerlConfig())
    trainer.latentx_shaper.load_state_dict({"er": 4.0, "erv": 4.0, "era": 4.0, "reward_ema": 0.0, "steps": 1})
    reference = VerlShaper(VerlConfig())
    reference.load_state_dict(trainer.latentx_shaper.state_dict())
    metrics: dict = {}
    out = trainer._compute_advantage(Batch(), metrics)
    assert out == "meta" and "latentx/verl_bonus_mean" in metrics
    expected, _ = reference.shape(VerlInputs(raw["adv"][:5], raw["er"][:5], raw["erv"][:5], raw["era"][:5]),
                                  raw["mask"][:5])
    for i, key in enumerate(keys[:5]):
        n = int(raw["mask"][i].sum())
        torch.testing.assert_close(store.rows[key]["advantages"], expected[i, :n])
    assert trainer.latentx_shaper.state_dict() == reference.state_dict()


def test_shaper_state_survives_checkpoint(tmp_path, monkeypatch):
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from latentx.integrations.verl import trainer as vtrainer

    monkeypatch.setattr(PPOTrainerSync, "_save_checkpoint", lambda self: None)
    monkeypatch.setattr(PPOTrainerSync, "_load_checkpoint", lambda self: None)
    config = OmegaConf.create({"trainer": {"default_local_dir": str(tmp_path), "resume_mode": "auto"}})
    saver = object.__new__(vtrainer.LatentxPPOTrainerSync)
    saver.config, saver.global_steps = config, 7
    saver.latentx_shaper = VerlShaper(VerlConfig())
    saver.latentx_shaper.load_state_dict({"er": 1.5, "erv": -0.25, "era": 0.125, "reward_ema": 0.5, "steps": 7})
    saver._save_checkpoint()
    loader = object.__new__(vtrainer.LatentxPPOTrainerSync)
    loader.config, loader.global_steps = config, 7
    loader.latentx_shaper = VerlShaper(VerlConfig())
    loader._load_checkpoint()
    assert loader.latentx_shaper.state_dict() == saver.latentx_shaper.state_dict()


# ----------------------------------------------------------------------------------------------------
# the example launch scripts compose with verl's config (every override names a real key)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["qwen2.5-math-7b-relax.sh", "smoke-qwen2.5-0.5b.sh", "qwen2.5-vl-3b-relax.sh"])
def test_example_overrides_compose(script):
    import re

    from latentx.integrations.verl.main import check_config
    from latentx.integrations.verl.trainer import prepare_config

    def script_overrides(name: str) -> list[str]:
        text = (REPO / "examples" / "verl" / name).read_text()
        base = re.search(r'^exec bash "\$\(dirname "\$0"\)/([\w.-]+\.sh)"', text, re.M)  # a script run on top of another
        overrides = script_overrides(base.group(1)) if base else []
        for line in text.splitlines():
            match = re.match(r"^\s+([A-Za-z_][\w.]*)=(\S+?)\s*\\?$", line)
            if match:
                key, value = match.groups()
                value = "placeholder" if "$" in value else value  # shell variables: any plain value composes
                overrides.append(f"{key}={value.strip(chr(39))}" if key != "trainer.logger" else "trainer.logger=[console]")
        return overrides

    overrides = script_overrides(script)
    assert len(overrides) > 20
    overrides = [o if not o.startswith("latentx.objective=") else "latentx.objective=relax" for o in overrides]
    cfg = compose(overrides)
    check_config(cfg)
    s = prepare_config(cfg)
    assert s.objective == "relax" and s.group_size == cfg.actor_rollout_ref.rollout.n
    if "vl" in script:  # its overrides come after (and win over) the base script's
        assert cfg.data.image_key == "images" and cfg.actor_rollout_ref.rollout.n == 8
        assert cfg.reward.custom_reward_function.path == "pkg://latentx.integrations.verl.data"


def test_signals_survive_verls_micro_batch_reordering():
    """Micro-batches in dynamic-batching order, re-assembled by verl's postprocess_batch_func."""
    from verl.workers.engine.utils import postprocess_batch_func

    model = tiny_model()
    engine = FakeFSDPEngine(model)
    s = settings("verl")
    LatentxEngineHook(engine, s).mode = "infer"
    data = nested_micro_batch(True)
    indices = [[3, 0, 5], [1, 2, 4]]
    outputs = []
    with torch.no_grad():
        for idx in indices:
            micro = tu.index_select_tensor_dict(data, idx)
            tu.assign_non_tensor(micro, use_remove_padding=True)
            outputs.append({"model_output": engine_forward(engine, micro), "loss": 0.0, "metrics": {}})
        H_ref, mask_ref = padded_reference_trajectories(model, left_right_batch())
    tu.assign_non_tensor(data, use_dynamic_bsz=True)
    merged = postprocess_batch_func(output_lst=outputs, indices=indices, data=data)["model_output"]
    ref = rank_dynamics(H_ref, mask_ref, stride=s.verl.stride, window=s.verl.window)
    torch.testing.assert_close(per_response_values(merged["latentx_er"]), ref.er.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(per_response_values(merged["latentx_era"]), ref.era.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["paper", "authors"])
def test_relax_terms_with_the_driver_plan_equal_unsplit_for_any_split_and_two_ranks(preset):
    """The driver's plan (relax_plan_fields) makes 1, 2, 4 micro-batches and 2 ranks (dp_size = 2, FSDP mean)
    give the unsplit loss and gradient, with groups split across micro-batches (issue 17)."""
    gen = torch.Generator().manual_seed(5)
    B, T, R = 12, 6, 3
    cfg = RelaxConfig(preset=preset, alpha=0.4, beta=0.6, xi_mode="quantile", xi=0.3, lme_scope="group")
    lengths = torch.randint(2, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, 1, generator=gen).expand(B, T) * mask
    dsd0 = torch.rand(B, generator=gen) * 3
    logp0 = -torch.rand(B, T, generator=gen)
    ref = logp0 + 0.3 * torch.randn(B, T, generator=gen)
    uids = [f"u{i // R}" for i in range(B)]
    fields, _ = vloss.relax_plan_fields(adv, mask, dsd0, uids, cfg, length_norm=T)
    tokens = int(mask.sum())

    def run(chunks, dp_size=1):
        d, lp = dsd0.clone().requires_grad_(True), logp0.clone().requires_grad_(True)
        total = 0.0
        for rows in chunks:
            plan = {k[len("latentx_"):]: v[rows] for k, v in fields.items()}
            plan["in_set"] = plan["in_set"] > 0.5
            loss, _ = vloss.relax_terms(d[rows], adv[rows], vloss.group_ids([uids[i] for i in rows.tolist()], d.device),
                                        lp[rows], ref[rows], mask[rows], cfg, dp_size, B, R, tokens, plan)
            total = total + loss
        (total / dp_size).backward()  # FSDP averages the ranks' gradients
        return float(total / dp_size), torch.cat([d.grad, lp.grad.flatten()])

    perm = torch.randperm(B, generator=gen)
    value, grad = run([torch.arange(B)])
    for chunks, dp in ((list(perm.chunk(2)), 1), (list(perm.chunk(4)), 1), (list(perm.chunk(2)), 2)):
        v, g = run(chunks, dp)
        assert v == pytest.approx(value, rel=1e-6)
        assert float((g - grad).norm()) <= 1e-6 * float(grad.norm())
    # and the unsplit value is relax_loss's latent part on the whole batch
    batch = PolicyBatch(logp=logp0, old_logp=logp0, mask=mask, advantages=adv[:, 0], group=torch.arange(B) // R,
                        ref_logp=ref, dsd=dsd0)
    out = relax_loss(batch, cfg, GRPOConfig())
    assert value == pytest.approx(float(out.parts["xp"] + out.parts["kl"]), rel=1e-6)


def test_latentx_block_takes_verl_presets():
    """The shipped latentx block leaves the §3b options unset, so `latentx.verl.preset=...` applies cleanly."""
    from importlib.resources import files

    from latentx.integrations.verl.settings import parse_settings

    block = OmegaConf.load(str(files("latentx.integrations.verl") / "config" / "latentx_trainer.yaml")).latentx
    block.objective = "verl"
    assert parse_settings(block).verl.behaviour == VerlConfig().behaviour
    block.verl.preset = "enabled"
    assert parse_settings(block).verl.behaviour == VerlConfig(preset="enabled").behaviour
    block.verl.dtype = "float32"
    with pytest.raises(ValueError, match=r"^latentx\.verl\.dtype='float32' contradicts latentx\.verl\.preset='enabled'"):
        parse_settings(block)
