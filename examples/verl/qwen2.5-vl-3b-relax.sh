#!/usr/bin/env bash
# ReLaX on Qwen2.5-VL-3B-Instruct with verl 0.9.1: the setup of qwen2.5-math-7b-relax.sh (FSDP2 actor, vLLM
# rollout, lr 1e-6, alpha = 0.1, beta = 0.01, xi = 25, m = 50; METHODS.md) on visual math (Geometry3K-style
# vmath) or the visual countdown, rewarded by latentx's own verifiers, sized for a 3B VLM on one 8-GPU node
# (128 prompts x 8 responses per step, responses up to 2048 tokens).  The hidden states are the language
# model's last layer over the response with the images in the forward (the engine hook, CPU-tested on
# tiny-vl in tests/test_integration_verl_vl.py).  See docs/verl.md "Vision-language models".
#
#   data (once):   python examples/verl/vl_data.py --task vmath --data geometry3k/train.parquet \
#                      --options '{"eval_path": "geometry3k/test.parquet"}' --out ~/data/geo3k-latentx
#                  python examples/verl/vl_data.py --task vcountdown --out ~/data/vcountdown   (no download)
#   run:           bash examples/verl/qwen2.5-vl-3b-relax.sh
#                  DATA=~/data/vcountdown bash examples/verl/qwen2.5-vl-3b-relax.sh
#   baseline:      OBJECTIVE=grpo bash examples/verl/qwen2.5-vl-3b-relax.sh   (or OBJECTIVE=verl)
#   GPU smoke:     bash examples/verl/qwen2.5-vl-3b-relax.sh trainer.n_gpus_per_node=1 data.train_batch_size=8 \
#                      actor_rollout_ref.actor.ppo_mini_batch_size=8 actor_rollout_ref.rollout.n=4 \
#                      data.max_response_length=256 trainer.total_training_steps=3 trainer.val_before_train=False
set -euo pipefail

DATA=${DATA:-$HOME/data/geo3k-latentx}
export MODEL=${MODEL:-Qwen/Qwen2.5-VL-3B-Instruct}
export TRAIN=${TRAIN:-$DATA/train.parquet}
export TEST=${TEST:-$DATA/test.parquet}

exec bash "$(dirname "$0")/qwen2.5-math-7b-relax.sh" \
  data.image_key=images \
  reward.custom_reward_function.path=pkg://latentx.integrations.verl.data \
  reward.custom_reward_function.name=compute_score \
  data.train_batch_size=128 \
  data.max_response_length=2048 \
  actor_rollout_ref.actor.ppo_mini_batch_size=64 \
  actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.enable_chunked_prefill=False \
  trainer.experiment_name="qwen2.5-vl-3b-${OBJECTIVE:-relax}" \
  trainer.test_freq=10 \
  trainer.total_epochs=15 \
  "$@"
