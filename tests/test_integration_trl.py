"""The TRL adapter (latentx.integrations.trl): real TRL training steps on CPU with the tiny model, checked
number for number against latentx.objectives / latentx.dynamics recomputed independently on the same batch."""

from __future__ import annotations

import dataclasses
import threading
import typing
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, HfArgumentParser  # noqa: E402

from latentx.dynamics import KoopmanDictionary, dsd, rank_dynamics  # noqa: E402
from latentx.integrations.trl import LatentGRPOConfig, LatentGRPOTrainer, check_trl_version  # noqa: E402
from latentx.integrations.trl.capture import capture_completion_states, find_backbone  # noqa: E402
from latentx.integrations.trl.config import FLATTENED_SECTIONS  # noqa: E402
from latentx.integrations.trl.latent import (  # noqa: E402
    group_ids,
    relax_microbatch_share,
    relax_rollout_plan,
    verl_rollout_step,
)
from latentx.models import build_tiny_model  # noqa: E402
from latentx.objectives.base import k3_kl, per_response_mean, valid_only  # noqa: E402
from latentx.objectives import (  # noqa: E402
    GRPOConfig,
    KLCovConfig,
    PolicyBatch,
    RelaxConfig,
    VerlBaselines,
    VerlConfig,
    VerlInputs,
    VerlShaper,
    exploration_term,
    grpo_loss,
    group_advantages,
    kl_cov_loss,
    relax_kl_set,
    relax_loss,
)

PROMPTS = ["12+3=", "7*8=", "100-1=", "9/3="]
TINY = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def digit_reward(completions, **kwargs):
    """A continuous verifiable-style reward (fraction of digits), so groups have non-zero advantages."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    model, tokenizer = build_tiny_model(seed=0, **TINY)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_trainer(tiny_dir: Path, out: Path, peft_config=None, **overrides) -> LatentGRPOTrainer:
    options = dict(
        output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
        max_steps=2, learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        seed=0, temperature=1.0, disable_tqdm=True, bf16=False,  # float32: compare to 1e-5
    )
    options.update(overrides)
    _, tokenizer = build_tiny_model(seed=0, **TINY)
    trainer = LatentGRPOTrainer(
        model=str(tiny_dir), reward_funcs=digit_reward, args=LatentGRPOConfig(**options),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer, peft_config=peft_config,
    )
    trainer.latent_records = []
    return trainer


def train(tiny_dir: Path, out: Path, peft_config=None, **overrides) -> LatentGRPOTrainer:
    trainer = make_trainer(tiny_dir, out, peft_config, **overrides)
    trainer.train()
    return trainer


def forward(tiny_dir: Path, params: dict | None, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent plain-transformers forward: (H [B, C, d] = hidden_states[-1] at the positions that predict
    the completion, log-probs [B, C] of the completion tokens)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    if params is not None:
        missing, unexpected = model.load_state_dict(params, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.eval()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    C = batch["completion_ids"].shape[1]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    H = out.hidden_states[-1][:, -(C + 1) : -1]
    logp = torch.log_softmax(out.logits[:, -(C + 1) : -1].float(), dim=-1)
    logp = logp.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return H, logp


# ------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------


def test_trl_version_is_pinned():
    check_trl_version()
    with pytest.raises(ImportError, match="trl>=1.16.0,<1.17.0"):
        check_trl_version("1.17.0")
    with pytest.raises(ImportError, match="found trl 1.15.2"):
        check_trl_version("1.15.2")


def test_config_flattens_latentx_method_configs():
    cfg = LatentGRPOConfig(output_dir="unused", use_cpu=True, report_to=[])
    for section, cls in FLATTENED_SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = f"{section}_{f.name}"
            assert getattr(cfg, name) == f.default, name
            assert typing.get_type_hints(LatentGRPOConfig)[name] == hints[f.name], name
    built = LatentGRPOConfig(
        output_dir="unused", use_cpu=True, report_to=[], relax_alpha=0.3, relax_kl_set="code", relax_m=12
    ).method_config()
    assert built == RelaxConfig(alpha=0.3, kl_set="code", m=12)


def test_config_parses_from_the_command_line_and_names_bad_fields():
    (cfg,) = HfArgumentParser(LatentGRPOConfig).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--use_cpu", "--report_to", "none", "--latent_objective", "verl",
         "--verl_stride", "8", "--verl_gating", "sum", "--relax_residual_threshold", "0.5"]
    )
    assert cfg.method_config() == VerlConfig(stride=8, gating="sum")
    assert cfg.relax_residual_threshold == 0.5
    with pytest.raises(ValueError, match="relax_alpha must be >= 0"):
        LatentGRPOConfig(output_dir="unused", use_cpu=True, relax_alpha=-1.0)
    with pytest.raises(ValueError, match="verl_stride"):
        LatentGRPOConfig(output_dir="unused", use_cpu=True, latent_objective="verl", verl_stride=0)
    with pytest.raises(ValueError, match="latent_objective must be one of"):
        LatentGRPOConfig(output_dir="unused", use_cpu=True, latent_objective="ppo")
    with pytest.raises(ValueError, match="loss_type must be one of bnpo, dr_grpo, dapo"):
        LatentGRPOConfig(output_dir="unused", use_cpu=True, latent_objective="kl_cov", loss_type="grpo")


def test_kl_cov_warns_when_trl_runs_it_on_policy():
    import warnings

    with pytest.warns(UserWarning, match="KL-Cov acts only off-policy"):
        LatentGRPOConfig(output_dir="unused", use_cpu=True, latent_objective="kl_cov", loss_type="dapo")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for options in (dict(num_iterations=2), dict(steps_per_generation=2)):
            LatentGRPOConfig(output_dir="unused", use_cpu=True, latent_objective="kl_cov", loss_type="dapo", **options)


def test_entropy_bonus_is_trls_entropy_coef():
    cfg = LatentGRPOConfig(output_dir="unused", use_cpu=True, latent_objective="entropy_bonus")
    assert cfg.entropy_coef == 0.001  # latentx's c_H default, applied to TRL's own entropy bonus
    adaptive = LatentGRPOConfig(
        output_dir="unused", use_cpu=True, latent_objective="entropy_bonus", use_adaptive_entropy=True,
        entropy_target=0.5, entropy_coef=0.01,
    ).method_config()
    assert adaptive.adaptive and adaptive.target_entropy == 0.5 and adaptive.coef == 0.01
    with pytest.raises(ValueError, match="entropy_coef_max must be >= entropy_coef_min"):
        LatentGRPOConfig(
            output_dir="unused", use_cpu=True, latent_objective="entropy_bonus", entropy_coef_min=0.5,
            entropy_coef_max=0.1,
        )


# ------------------------------------------------------------------------------------------------------
# hidden-state capture
# ------------------------------------------------------------------------------------------------------


def test_capture_sees_hidden_states_minus_one_also_through_peft():
    peft = pytest.importorskip("peft")
    model, _ = build_tiny_model(seed=1, **TINY)
    ids = torch.tensor([[0, 0, 1, 20, 21, 22, 23, 24], [1, 30, 31, 32, 33, 34, 35, 36]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    C = 4
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    with capture_completion_states(find_backbone(model), C, lambda H, m: seen.append((H, m))):
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(seen[0][0], out.hidden_states[-1][:, -(C + 1) : -1])
    assert seen[0][1].tolist() == mask[:, -C:].bool().tolist()

    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_()  # make the adapter change the states
    seen.clear()
    with capture_completion_states(find_backbone(lora), C, lambda H, m: seen.append((H, m))):
        adapted = lora(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with lora.disable_adapter():
            base = lora(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(seen) == 2  # the hook fires with the adapter on and off (TRL's PEFT reference forward)
    torch.testing.assert_close(seen[0][0], adapted.hidden_states[-1][:, -(C + 1) : -1])
    torch.testing.assert_close(seen[1][0], base.hidden_states[-1][:, -(C + 1) : -1])
    assert not torch.allclose(seen[0][0], seen[1][0])

    class Wrapper(torch.nn.Module):  # DDP / DeepSpeed expose the model as `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert find_backbone(Wrapper(lora)) is find_backbone(lora)


# ------------------------------------------------------------------------------------------------------
# real TRL steps vs latentx.objectives on the same batch
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kl_set", "size"),
    [
        (dict(xi=0.0), 8),  # every response in I
        (dict(xi=0.25, xi_mode="quantile"), 2),  # the top quarter of DSD: the reference scores 2 of 8 rows
        (dict(xi=1e9), 0),  # I empty (as with the paper preset on short responses): no reference forward at all
    ],
    ids=["all", "quarter", "empty"],
)
def test_relax_two_trl_steps_match_latentx(tiny_dir, tmp_path, kl_set, size):
    relax = dict(relax_m=8, relax_alpha=0.5, relax_beta=0.1, relax_fit_batch_size=4, relax_fit_lr=1e-3)
    relax.update({f"relax_{key}": value for key, value in kl_set.items()})
    trainer = make_trainer(tiny_dir, tmp_path, latent_objective="relax", **relax)
    scored_rows: list[int] = []  # the batch size of every reference forward
    trainer.ref_model.register_forward_pre_hook(
        lambda module, args, kwargs: scored_rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    trainer.train()
    cfg = RelaxConfig(m=8, alpha=0.5, beta=0.1, fit_batch_size=4, fit_lr=1e-3, **kl_set)
    rollouts = [r for r in trainer.latent_records if r["kind"] == "relax_rollout"]
    losses = [r for r in trainer.latent_records if r["kind"] == "relax_loss"]
    assert len(rollouts) == len(losses) == 2
    assert trainer.beta != 0.0 and trainer._kl_coef == 0.0  # reference loaded for ReLaX's KL only
    # Lazy reference: one forward per rollout over the rows in I only, none when I is empty.
    members = [int(r["output"]["latent_in_set"].sum()) for r in rollouts]
    assert members == [size, size] and scored_rows == [m for m in members if m > 0]

    # The dictionary: fitted once, on the first rollout batch of the initial policy.
    # The dictionary: fitted once, on the first rollout batch (hidden states of the initial policy).
    first = rollouts[0]["output"]
    fit_H, fit_mask = rollouts[0]["fit_states"]
    assert rollouts[1]["fit_states"] is None
    H0, _ = forward(tiny_dir, rollouts[0]["params"], first)
    torch.testing.assert_close(fit_H, H0, atol=1e-5, rtol=1e-5)
    assert fit_mask.tolist() == first["completion_mask"].bool().tolist()
    independent = KoopmanDictionary(
        H0.shape[-1], m=8, seed=0, fit_lr=1e-3, fit_batch_size=4, fit_loss="residual", ridge=1e-3, scaling="mean"
    ).fit(fit_H, fit_mask)
    torch.testing.assert_close(trainer.koopman.weight, independent.weight, atol=0.0, rtol=0.0)
    assert not torch.equal(independent.weight, KoopmanDictionary(H0.shape[-1], m=8, seed=0).weight)

    for step, rec in enumerate(losses):
        batch = rec["inputs"]
        mask = batch["completion_mask"].bool()
        H, logp = forward(tiny_dir, rec["params"], batch)
        _, ref_logp = forward(tiny_dir, None, batch)  # the frozen reference = the initial weights
        in_set = batch["latent_in_set"].bool()
        if in_set.any():  # scored for I's rows; 0 (never read) elsewhere
            torch.testing.assert_close(batch["ref_per_token_logps"][in_set], ref_logp[in_set], atol=1e-5, rtol=1e-5)
            assert not batch["ref_per_token_logps"][~in_set].any()
        else:
            assert "ref_per_token_logps" not in batch
        torch.testing.assert_close(rec["logps"], logp, atol=1e-5, rtol=1e-5)
        dsd_values = dsd(H, mask, independent)
        torch.testing.assert_close(rec["dsd"], dsd_values, atol=1e-5, rtol=1e-4)
        out = relax_loss(
            PolicyBatch(
                logp=logp, old_logp=logp, mask=mask, advantages=batch["advantages"],
                group=batch["latent_group"], ref_logp=ref_logp, dsd=dsd_values,
            ),
            cfg,
            GRPOConfig(clip_low=0.2, clip_high=0.2, kl_coef=0.0),
        )
        assert rec["xp"].item() == pytest.approx(out.terms["xp"], abs=1e-5)
        assert rec["kl"].item() == pytest.approx(out.terms["kl_set_kl"], abs=1e-6)
        assert rec["loss"].item() == pytest.approx(out.loss.item(), abs=1e-5)
        assert out.terms["xp"] != 0.0
        if step == 1 and in_set.any():
            assert out.terms["kl_set_kl"] > 0  # the policy has moved away from the reference
    logged = [key for key in trainer.state.log_history[0] if key.startswith("latent/")]
    assert "latent/relax/xp" in logged and "latent/koopman_fit_loss" in logged

    # The fitted dictionary travels with the latent state (checkpoints, resume).
    fitted = trainer.koopman.weight.clone()
    trainer.save_latent_state(str(tmp_path / "state"))
    with torch.no_grad():
        trainer.koopman.weight.zero_()
    trainer.load_latent_state(str(tmp_path / "state"))
    assert torch.equal(trainer.koopman.weight, fitted) and trainer.koopman.fitted_


def test_verl_two_trl_steps_match_latentx(tiny_dir, tmp_path):
    # Two micro-batches per rollout (steps_per_generation=2 > gradient_accumulation_steps=1): TRL runs its
    # own old-log-prob forward, and the rollout states are captured from it (no extra forward).
    trainer = train(
        tiny_dir, tmp_path, latent_objective="verl", verl_stride=4, per_device_train_batch_size=4,
        steps_per_generation=2, max_steps=4,
    )
    rollouts = [r for r in trainer.latent_records if r["kind"] == "verl_rollout"]
    assert len(rollouts) == 2
    assert [log["latent/extra_forward"] for log in trainer.state.log_history if "latent/extra_forward" in log] == [0, 0]
    shaper = VerlShaper(VerlConfig(stride=4))
    for step, rec in enumerate(rollouts):
        batch = rec["output"]
        mask = batch["completion_mask"].bool()
        group = torch.arange(mask.shape[0]) // 4
        advantages = group_advantages(rec["rewards"], group, eps=1e-4)  # TRL's ε
        torch.testing.assert_close(rec["trl_advantages"], advantages, atol=1e-5, rtol=1e-5)
        H, _ = forward(tiny_dir, rec["params"], batch)
        er, erv, era = rank_dynamics(H, mask, stride=4, window=512)
        torch.testing.assert_close(rec["er"], er, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(rec["erv"], erv, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(rec["era"], era, atol=1e-4, rtol=1e-5)
        token_adv, _ = shaper.shape(VerlInputs(advantages, er, erv, era), mask)
        torch.testing.assert_close(rec["shaped"], token_adv[:, 0], atol=1e-5, rtol=1e-5)
        if step == 1:
            assert (rec["shaped"] - rec["trl_advantages"]).abs().max() > 1e-3  # shaping is active
    assert dataclasses.asdict(trainer.verl_baselines) == pytest.approx(shaper.state_dict())

    saved = tmp_path / "state"
    trainer.save_latent_state(str(saved))
    trainer.verl_baselines = VerlBaselines()
    trainer.load_latent_state(str(saved))
    assert dataclasses.asdict(trainer.verl_baselines) == pytest.approx(shaper.state_dict())


def test_relax_with_peft_captures_the_policy_not_the_reference(tiny_dir, tmp_path):
    """PEFT: TRL scores the reference by disabling the adapter of the *same* model, right after its
    old-log-prob forward (num_iterations=2 makes TRL run it); the rollout states must be the policy's."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    trainer = train(
        tiny_dir, tmp_path, latent_objective="relax", relax_m=8, relax_xi=0.0, relax_fit_batch_size=4,
        num_iterations=2, max_steps=1, peft_config=lora,
    )
    rollout = next(r for r in trainer.latent_records if r["kind"] == "relax_rollout")
    assert trainer.state.log_history[0]["latent/extra_forward"] == 0
    batch = rollout["output"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.load_state_dict(rollout["params"], strict=False)  # back to the rollout-time adapter
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    C = batch["completion_ids"].shape[1]
    with torch.no_grad():
        policy = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        with model.disable_adapter():
            reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    fit_H, _ = rollout["fit_states"]
    torch.testing.assert_close(fit_H, policy[:, -(C + 1) : -1], atol=1e-5, rtol=1e-5)
    assert (fit_H - reference[:, -(C + 1) : -1]).abs().max() > 1e-3


def test_kl_cov_trl_steps_match_latentx(tiny_dir, tmp_path):
    # num_iterations=2: the second step re-uses the rollout after an update, so ratios differ from 1.
    # loss_type="dapo" (TRL's default): token sum / tokens of the generation batch = latentx's token mean here.
    trainer = train(
        tiny_dir, tmp_path, latent_objective="kl_cov", loss_type="dapo", num_iterations=2, kl_cov_k_ratio=0.2
    )
    losses = [r for r in trainer.latent_records if r["kind"] == "kl_cov_loss"]
    assert len(losses) == 2
    cfg, clip = KLCovConfig(k_ratio=0.2), GRPOConfig()
    for step, rec in enumerate(losses):
        batch = rec["inputs"]
        mask = batch["completion_mask"].bool()
        _, logp = forward(tiny_dir, rec["params"], batch)
        policy = PolicyBatch(
            logp=logp, old_logp=batch["old_per_token_logps"], mask=mask, advantages=batch["advantages"],
            group=torch.zeros(mask.shape[0], dtype=torch.long),
        )
        expected = kl_cov_loss(policy, cfg, clip)
        assert rec["loss"].item() == pytest.approx(expected.loss.item(), abs=1e-5)
        if step == 1:
            assert abs(expected.loss.item() - grpo_loss(policy, clip).loss.item()) > 1e-6


# ------------------------------------------------------------------------------------------------------
# groups split over processes: gather, then slice back
# ------------------------------------------------------------------------------------------------------


def run_ranks(world: int, fn):
    """Run ``fn(rank, all_gather)`` on ``world`` threads sharing a real all-gather (rank order)."""
    barrier = threading.Barrier(world)
    slots: list = [None] * world
    results: list = [None] * world
    errors: list = []

    def all_gather_for(rank):
        def all_gather(tensor):
            slots[rank] = tensor
            barrier.wait()
            gathered = torch.cat(list(slots))
            barrier.wait()
            return gathered

        return all_gather

    def target(rank):
        try:
            results[rank] = fn(rank, all_gather_for(rank))
        except BaseException as err:  # pragma: no cover - surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_group_ids_follow_trls_layout():
    assert group_ids(0, 6, 4).tolist() == [0, 0, 0, 0, 1, 1]
    assert group_ids(1, 6, 4).tolist() == [1, 1, 2, 2, 2, 2]


def test_verl_group_split_over_two_processes_equals_unsplit():
    gen = torch.Generator().manual_seed(0)
    B, local = 12, 6  # groups of 4: group 1 spans the two processes
    adv, er, erv, era = (torch.randn(B, generator=gen) for _ in range(4))
    er = er.abs() * 10
    rewards = torch.rand(B, generator=gen)
    cfg = VerlConfig(performance_scaling=True)
    base = VerlBaselines(er=5.0, erv=0.5, era=-0.2, reward_ema=0.1, steps=3)
    whole = verl_rollout_step(adv, er, erv, era, base, cfg, lambda t: t, 0, rewards=rewards)
    parts = run_ranks(
        2,
        lambda rank, gather: verl_rollout_step(
            adv[rank * local : (rank + 1) * local], er[rank * local : (rank + 1) * local],
            erv[rank * local : (rank + 1) * local], era[rank * local : (rank + 1) * local],
            base, cfg, gather, rank, rewards=rewards,
        ),
    )
    torch.testing.assert_close(torch.cat([p.shaped for p in parts]), whole.shaped)
    assert (whole.shaped != adv).any()
    for part in parts:  # every process ends with the same baselines: the global batch means
        assert part.baselines == whole.baselines
    local_only = verl_rollout_step(
        adv[:local], er[:local], erv[:local], era[:local], base, cfg, lambda t: t, 0, rewards[:local]
    )
    assert local_only.baselines != whole.baselines  # without the gather the EMA would be wrong


@pytest.mark.parametrize("preset", ["enabled", "release"])
def test_verl_presets_over_two_processes_equal_the_core(preset):
    """TRL takes the same presets: the gathered batch goes through the core step (GRPO re-run on r + aux with
    TRL's ε = 1e-4 for `enabled`; TRL's advantages untouched for `release`)."""
    from latentx.objectives.verl import verl_step

    gen = torch.Generator().manual_seed(2)
    B, local, R = 16, 8, 4
    rewards = (torch.rand(B, generator=gen) < 0.5).float()
    group = torch.arange(B) // R
    adv = group_advantages(rewards, group, eps=1e-4)
    er = torch.rand(B, generator=gen) * 30
    erv, era = torch.randn(B, generator=gen), torch.randn(B, generator=gen)
    cfg = VerlConfig(preset=preset)
    base = VerlBaselines(er=12.0, erv=0.5, era=-0.2, steps=2, pending_er=11.0, pending_erv=0.4, pending_era=0.1)
    parts = run_ranks(
        2,
        lambda rank, gather: verl_rollout_step(
            *(x[rank * local : (rank + 1) * local] for x in (adv, er, erv, era)), base, cfg, gather, rank,
            rewards=rewards, num_generations=R, scale_rewards="group",
        ),
    )
    core = verl_step(VerlInputs(adv, er, erv, era, rewards, group, advantage_eps=1e-4), base, cfg)
    assert torch.equal(torch.cat([p.shaped for p in parts]), core.shaped)
    assert torch.equal(torch.cat([p.advantages for p in parts]), core.advantages)
    assert all(p.baselines == core.baselines for p in parts)
    if preset == "release":
        assert torch.equal(core.shaped, adv) and torch.equal(core.advantages, adv)
    else:
        assert (core.advantages - adv).abs().max() > 1e-2  # aux moved the normalised advantage itself
    with pytest.raises(ValueError, match="scale_rewards must be 'group' or 'none'"):
        verl_rollout_step(adv, er, erv, era, base, VerlConfig(preset="enabled"), lambda t: t, 0, rewards=rewards,
                          num_generations=R, scale_rewards="batch")


@pytest.mark.parametrize("kl_set", ["paper", "code"])
def test_relax_group_split_over_processes_and_microbatches_equals_unsplit(kl_set):
    gen = torch.Generator().manual_seed(1)
    B, T, world, local, micro = 12, 5, 2, 6, 2  # groups of 4; group 1 spans both processes; 2 micro-batches each
    adv = torch.randn(B, generator=gen)
    dsd_leaf = (torch.rand(B, generator=gen) * 2).requires_grad_(True)  # the update forward's DSD_i
    logp_leaf = (-torch.rand(B, T, generator=gen)).requires_grad_(True)  # the update forward's log-probs
    ref = logp_leaf.detach() + 0.3 * torch.randn(B, T, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[::3, 3:] = False
    group = torch.arange(B) // 4
    cfg = RelaxConfig(xi=1.0, kl_set=kl_set, alpha=0.1, beta=0.01)

    # Unsplit: the ReLaX terms of METHODS.md §3 on the whole batch, as latentx.objectives computes them.
    in_set = relax_kl_set(adv, dsd_leaf, cfg.xi, kl_set)
    assert 0 < int(in_set.sum()) < B
    xp = exploration_term(adv, dsd_leaf, group, "group", detach=in_set if kl_set == "code" else None)
    kl_i = per_response_mean(k3_kl(valid_only(logp_leaf, mask), valid_only(ref, mask)), mask)
    kl = (kl_i * in_set).sum() / in_set.sum()
    (cfg.alpha * xp + cfg.beta * kl).backward()
    expected_dsd_grad, expected_logp_grad = dsd_leaf.grad.clone(), logp_leaf.grad.clone()
    dsd_leaf.grad = logp_leaf.grad = None

    # Split: rollout plan per process (gather, slice), then shuffled micro-batches as TRL runs them.
    lengths = mask.sum(1)

    def rank_fn(rank, gather):
        rows = slice(rank * local, (rank + 1) * local)
        return relax_rollout_plan(
            adv[rows], dsd_leaf[rows].detach(), group_ids(rank, local, 4), cfg, gather, rank, lengths=lengths[rows]
        )

    plans = run_ranks(world, rank_fn)
    total, values = torch.zeros(()), []
    for rank, plan in enumerate(plans):
        assert plan.xp == pytest.approx(xp.item(), abs=1e-6) and plan.totals.in_set == int(in_set.sum())
        order = torch.randperm(local, generator=gen) + rank * local
        for mb in order.chunk(micro):
            idx = mb - rank * local
            share = relax_microbatch_share(
                adv[mb], dsd_leaf[mb], group[mb], mask[mb], plan.in_set[idx], plan.group_lse[idx],
                plan.group_count[idx], plan.totals, cfg, num_shares=world * micro, logp=logp_leaf[mb], ref_logp=ref[mb],
            )
            values.append(share.loss.item())
            total = total + share.loss / micro / world  # ÷ gradient accumulation, DDP mean over processes
    total.backward()
    assert sum(values) / len(values) == pytest.approx((cfg.alpha * xp + cfg.beta * kl).item(), abs=1e-6)
    torch.testing.assert_close(dsd_leaf.grad, expected_dsd_grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(logp_leaf.grad, expected_logp_grad, atol=1e-7, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        dict(latent_objective="relax", relax_lme_scope="microbatch", relax_kl_set="code"),
        dict(latent_objective="relax", per_device_train_batch_size=4, steps_per_generation=2, beta=0.01,
             gradient_checkpointing=True),
        dict(latent_objective="verl", verl_apply_to="last_token", verl_performance_scaling=True, verl_gating="sum"),
        dict(latent_objective="entropy_bonus", use_adaptive_entropy=True, entropy_target=10.0),
        dict(latent_objective="kl_cov", loss_type="dr_grpo", gradient_accumulation_steps=2),
        dict(latent_objective="kl_cov", loss_type="dapo", num_iterations=2, steps_per_generation=2,
             per_device_train_batch_size=4),
    ],
    ids=lambda o: "-".join(f"{v}" for v in o.values()),
)
def test_option_matrix_trains(tiny_dir, tmp_path, options):
    options = {"relax_m": 8, "relax_fit_batch_size": 4, "verl_stride": 4, "max_steps": 4, **options}
    trainer = train(tiny_dir, tmp_path, **options)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    if options["latent_objective"] in ("relax", "verl", "kl_cov"):
        assert any(key.startswith("latent/") for key in trainer.state.log_history[0])


@pytest.mark.slow
def test_resume_restores_the_latent_state(tiny_dir, tmp_path):
    options = dict(latent_objective="verl", verl_stride=4, save_strategy="steps", save_steps=2)
    first = train(tiny_dir, tmp_path, **options)
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "latentx_state.json").exists()
    resumed = make_trainer(tiny_dir, tmp_path, **{**options, "max_steps": 3})
    resumed.train(resume_from_checkpoint=str(checkpoint))
    (rollout,) = [r for r in resumed.latent_records if r["kind"] == "verl_rollout"]
    assert rollout["baselines_used"] == dataclasses.asdict(first.verl_baselines)  # not a fresh EMA
