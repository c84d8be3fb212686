#!/usr/bin/env bash
# Train every released checkpoint of model_cards/ on SmolLM2-135M-Instruct, one after another, then
# evaluate them all with evaluate.py and copy adapters + results into model_cards/<name>/.
#
#   scripts/build_zoo.sh              # everything (the three multimodal runs ~35 min each on 2 CPU cores); finished runs are skipped
#   ONLY="lora-8 smora-64-8" scripts/build_zoo.sh
#   SEED=43 RUNS=runs/seeds/43 ONLY="lora-8" scripts/build_zoo.sh   # another seed (scripts/seed_runs.sh)
#   ONLY="smora-64-8-u1e-3" scripts/build_zoo.sh   # a study row (study below): only ever trained when named
#
# Sizes: a released adapter must stay <= ~10 MB, so the rank-64 checkpoints adapt q_proj and v_proj only
# (64 x (576+576 + 576+192) x 30 layers = 3.7M weights = 7.4 MB in bf16), and every adapter is stored in
# bfloat16 (save_dtype). Training-time evaluation is off: evaluate.py scores every checkpoint, and the base
# model alone, on the same held-out split afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/zoo}
ONLY=${ONLY:-}
LAUNCH=${LAUNCH:-accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no}
SEED=${SEED:-42}  # data generation, order and adapter init (the released zoo: 42)
COMMON="save_dtype=bfloat16 eval_before_training=false eval_strategy=no overwrite_output_dir=true seed=$SEED"

want() { [[ -z "$ONLY" || " $ONLY " == *" $1 "* ]]; }
named() { [[ " $ONLY " == *" $1 "* ]]; }  # study rows: not released, trained only when ONLY names them
train() {  # name, then train.py arguments; skipped when the run already saved its adapter
  local name=$1; shift
  if ! want "$name"; then return; fi
  run_one "$name" "$@"
}
study() {  # as train, for the comparisons of benchmarks/RESULTS.md that are not released checkpoints
  if named "$1"; then run_one "$@"; fi
}
run_one() {
  local name=$1; shift
  if [[ -f "$RUNS/$name/adapter/moelora_config.json" || -f "$RUNS/$name/adapter/adapter_config.json" ]]; then
    echo "== $name: already trained ($RUNS/$name/adapter)"; return
  fi
  echo "== $name: $*"
  local t0=$SECONDS
  # shellcheck disable=SC2086  # COMMON and LAUNCH are word lists on purpose
  $LAUNCH train.py "$@" $COMMON output_dir="$RUNS/$name"
  echo "$((SECONDS - t0))" > "$RUNS/$name/train_seconds.txt"
}

QV="method.target_modules=[q_proj,v_proj]"
ATTN="method.target_modules=[q_proj,k_proj,v_proj,o_proj]"

# --- text suite: the baselines and SMoRA (same modules, same steps, same data order) -------------
train lora-8 --config configs/lora.yaml "$QV"
train lora-64 --config configs/lora.yaml "$QV" method.r=64 method.alpha=128
train smora-64-8 --config configs/smora.yaml "$QV"
# SMoRA's balancing step u (reference 1e-5) and its block size (ranks per expert), all else as smora-64-8
study smora-64-8-u1e-4 --config configs/smora.yaml "$QV" method.bias_update_rate=1e-4
study smora-64-8-u1e-3 --config configs/smora.yaml "$QV" method.bias_update_rate=1e-3
study moe-8x8-top1 --config configs/ablation/moe_lora_8x8_top1.yaml "$QV"  # 8 LoRA-8 experts, 1 active
study moe-8x8-top2 --config configs/ablation/moe_lora_8x8_top2.yaml "$QV"  # 8 LoRA-8 experts, 2 active

# --- experts, one per task family, then the two routers over them ------------------------------
declare -A FAMILY=(
  [arithmetic]="[add,subtract,multiply]"
  [strings]="[reverse_word,uppercase_word,last_letter,count_letter]"
  [lists]="[sort_asc,sort_desc,max_of_list,min_of_list]"
  [units]="[unit_convert]"
)
EXPERTS="{"
for family in arithmetic strings lists units; do
  train "expert-$family" --config configs/lora.yaml "$ATTN" data.tasks="${FAMILY[$family]}" \
        save_format=peft max_steps=60
  EXPERTS+="$family: $RUNS/expert-$family/adapter, "
done
EXPERTS="${EXPERTS%, }}"
train lora-mixer --config configs/lora_mixer.yaml "method.experts=$EXPERTS" method.top_k=2
train xlora --config configs/xlora.yaml "method.experts=$EXPERTS"

# --- multimodal suite: the perceiving recipe (issue 18; configs/perceive/), LoRA-16 and, at equal rank on the
# same modules (q,v), MixLoRA and modality routing. Each run pretrains its encoders and soft-word projectors
# (~3 min, no LM), then trains the method with them frozen: ~33 min each on 2 cores.
train lora-16-multimodal --config configs/perceive/lora16.yaml
train mixlora --config configs/perceive/mixlora16.yaml
train modality --config configs/perceive/modality.yaml
