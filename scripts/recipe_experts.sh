#!/usr/bin/env bash
# Experts first, then the routers over them (LoRA-Mixer and X-LoRA), all through train.py:
#   1. one plain LoRA expert per task (r=8, q/k/v/o), saved as a PEFT LoRA folder (save_format=peft);
#   2. LoRA-Mixer, plug-and-play: a router per attention projection over those frozen experts;
#   3. X-LoRA: a classifier over the same frozen experts;
#   4. LoRA-Mixer, joint paradigm: stage 1 trains task experts by hard routing on the task label,
#      stage 2 trains the router soft on a small mixed set, starting from stage 1 (init_from).
#
#   scripts/recipe_experts.sh                      # SmolLM2-135M, all 12 built-in tasks, into runs/
#   BASE=tiny-random-llama TASKS="add sort_asc" OUT=/tmp/recipe EXPERT_STEPS=2 ROUTER_STEPS=2 \
#       EXTRA="eval_before_training=false" scripts/recipe_experts.sh    # the quick end-to-end check
#
# Environment: BASE (base model), TASKS (space-separated built-in task names), OUT (output root; experts go
# to $OUT/experts/<task>/adapter, where configs/lora_mixer.yaml and configs/xlora.yaml expect them when
# OUT=runs), EXPERT_STEPS / ROUTER_STEPS (optimizer steps per run), EXTRA (overrides added to every run),
# PYTHON (interpreter). On SmolLM2 each expert takes ~4 minutes on 2 CPU cores (~3 s/step at 80 steps).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:-smollm2-135m-instruct}
TASKS=${TASKS:-add subtract multiply reverse_word uppercase_word last_letter count_letter sort_asc sort_desc max_of_list min_of_list unit_convert}
OUT=${OUT:-runs}
EXPERT_STEPS=${EXPERT_STEPS:-80}
ROUTER_STEPS=${ROUTER_STEPS:-100}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python}
read -r -a task_list <<< "$TASKS"
# shellcheck disable=SC2206  # EXTRA is a list of key=value words on purpose
extra=($EXTRA)

run() {  # train.py with the shared base model and overrides; refuses to overwrite unless the run is redone
  "$PYTHON" train.py base_model="$BASE" overwrite_output_dir=true "${extra[@]}" "$@"
}

task_yaml=$(IFS=,; echo "[${task_list[*]}]")       # [add,sort_asc]
experts_yaml="{"                                   # {add: OUT/experts/add/adapter, ...}
for task in "${task_list[@]}"; do experts_yaml+="$task: $OUT/experts/$task/adapter, "; done
experts_yaml="${experts_yaml%, }}"

echo "== 1. one LoRA expert per task: ${task_list[*]}"
for task in "${task_list[@]}"; do
  run --config configs/lora.yaml data.tasks="[$task]" "method.target_modules=[q_proj,k_proj,v_proj,o_proj]" \
      save_format=peft max_steps="$EXPERT_STEPS" output_dir="$OUT/experts/$task"
done

echo "== 2. LoRA-Mixer, plug-and-play over the frozen experts"
run --config configs/lora_mixer.yaml "method.experts=$experts_yaml" data.tasks="$task_yaml" \
    max_steps="$ROUTER_STEPS" output_dir="$OUT/lora_mixer"

echo "== 3. X-LoRA over the same experts"
run --config configs/xlora.yaml "method.experts=$experts_yaml" data.tasks="$task_yaml" \
    max_steps="$ROUTER_STEPS" output_dir="$OUT/xlora"

echo "== 4. LoRA-Mixer, joint: stage 1 (hard routing by task label) then stage 2 (router on a small mixed set)"
run --config configs/lora_mixer.yaml method.stage=joint_stage1 method.experts="$task_yaml" data.tasks="$task_yaml" \
    max_steps="$EXPERT_STEPS" output_dir="$OUT/mixer_stage1"
run --config configs/lora_mixer.yaml method.stage=joint_stage2 method.experts="$task_yaml" data.tasks="$task_yaml" \
    method.init_from="$OUT/mixer_stage1/adapter" max_steps="$ROUTER_STEPS" output_dir="$OUT/mixer_stage2"
echo "== done: adapters in $OUT/{experts/*,lora_mixer,xlora,mixer_stage1,mixer_stage2}/adapter"
