#!/usr/bin/env bash
# A few real verl steps on one GPU with a small model and vLLM rollout: the GPU check of docs/verl.md.
#   bash examples/verl/smoke-qwen2.5-0.5b.sh grpo
#   bash examples/verl/smoke-qwen2.5-0.5b.sh relax
#   bash examples/verl/smoke-qwen2.5-0.5b.sh verl
# Needs: the GPU verl environment of docs/verl.md, the model (MODEL=a local path or a hub id) and a
# GSM8K-style parquet pair (TRAIN / TEST; see docs/verl.md "Data").
set -euo pipefail
OBJECTIVE=${1:-relax}
shift || true
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
TRAIN=${TRAIN:-$HOME/data/gsm8k/train.parquet}
TEST=${TEST:-$HOME/data/gsm8k/test.parquet}
PYTHON=${PYTHON:-python3}

exec "$PYTHON" -m latentx.integrations.verl.main \
  algorithm.adv_estimator=grpo \
  data.train_files="$TRAIN" \
  data.val_files="$TEST" \
  data.train_batch_size=8 \
  data.max_prompt_length=256 \
  data.max_response_length=256 \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.model.use_remove_padding=True \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=8 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.actor.use_kl_loss=True \
  actor_rollout_ref.actor.kl_loss_coef=0.0 \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.n=4 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8 \
  latentx.objective="$OBJECTIVE" \
  latentx.relax.fit_max_trajectories=32 \
  latentx.relax.fit_batch_size=8 \
  trainer.logger='["console"]' \
  trainer.val_before_train=False \
  trainer.test_freq=-1 \
  trainer.save_freq=-1 \
  trainer.nnodes=1 \
  trainer.n_gpus_per_node=1 \
  trainer.total_training_steps=3 \
  trainer.default_local_dir="${OUT:-/tmp/latentx-verl-smoke}/$OBJECTIVE" \
  "$@"
