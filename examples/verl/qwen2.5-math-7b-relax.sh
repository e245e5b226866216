#!/usr/bin/env bash
# ReLaX on Qwen2.5-Math-7B with verl 0.9.1 (FSDP actor, vLLM rollout), the ReLaX paper's setup
# (arXiv:2512.07558; METHODS.md): R = 16 responses per prompt, 512 prompts per step, responses up to
# 3072 tokens, lr 1e-6, alpha = 0.1, beta = 0.01, xi = 25, m = 50.  See docs/verl.md.
#
#   single node (8 GPUs):   bash examples/verl/qwen2.5-math-7b-relax.sh
#   Ray cluster (N nodes):  NNODES=4 bash examples/verl/qwen2.5-math-7b-relax.sh   (run on the head node,
#                           or through `ray job submit`, see docs/verl.md)
#   other objective:        OBJECTIVE=grpo (baseline) | OBJECTIVE=verl (VERL advantage shaping)
#   extra overrides:        bash examples/verl/qwen2.5-math-7b-relax.sh trainer.total_training_steps=10
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-Math-7B}
TRAIN=${TRAIN:-$HOME/data/math/train.parquet}
TEST=${TEST:-$HOME/data/math/test.parquet}
NNODES=${NNODES:-1}
GPUS=${GPUS:-8}
OBJECTIVE=${OBJECTIVE:-relax}
PYTHON=${PYTHON:-python3}

exec "$PYTHON" -m latentx.integrations.verl.main \
  algorithm.adv_estimator=grpo \
  algorithm.norm_adv_by_std_in_grpo=True \
  algorithm.use_kl_in_reward=False \
  data.train_files="$TRAIN" \
  data.val_files="$TEST" \
  data.train_batch_size=512 \
  data.max_prompt_length=1024 \
  data.max_response_length=3072 \
  data.filter_overlong_prompts=True \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.model.use_remove_padding=True \
  actor_rollout_ref.model.enable_gradient_checkpointing=True \
  actor_rollout_ref.actor.strategy=fsdp2 \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=128 \
  actor_rollout_ref.actor.use_dynamic_bsz=True \
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384 \
  actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.actor.use_kl_loss=True \
  actor_rollout_ref.actor.kl_loss_coef=0.0 \
  actor_rollout_ref.actor.kl_loss_type=low_var_kl \
  actor_rollout_ref.actor.entropy_coeff=0 \
  actor_rollout_ref.actor.fsdp_config.param_offload=False \
  actor_rollout_ref.actor.fsdp_config.optimizer_offload=False \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.n=16 \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
  actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True \
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=32768 \
  actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True \
  actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=32768 \
  actor_rollout_ref.ref.fsdp_config.param_offload=True \
  latentx.objective="$OBJECTIVE" \
  latentx.relax.alpha=0.1 \
  latentx.relax.beta=0.01 \
  latentx.relax.xi=25 \
  latentx.relax.m=50 \
  trainer.logger='["console","wandb"]' \
  trainer.project_name=latentx-verl \
  trainer.experiment_name="qwen2.5-math-7b-$OBJECTIVE" \
  trainer.nnodes="$NNODES" \
  trainer.n_gpus_per_node="$GPUS" \
  trainer.save_freq=50 \
  trainer.test_freq=25 \
  trainer.total_epochs=30 \
  "$@"
