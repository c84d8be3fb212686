#!/usr/bin/env bash
# Train and score the zoo's headline runs under several seeds (issue 18: comparisons with a spread).
# Each seed's runs go to runs/seeds/<seed>/<name> (build_zoo.sh's commands, with seed=<seed>), and evaluate.py
# scores each on the held-out split of its own seed (the split depends on the seed; the methods of one seed
# share their training data, order and held-out examples, so differences within a seed are paired).
#
#   SEEDS="42 43 44" ONLY="lora-8 smora-64-8 lora-64" scripts/seed_runs.sh
#   python scripts/seed_table.py benchmarks/results/seeds runs/seeds   # mean ± spread per method and task
#
# Each scored run's record (its scores and routing loads, a few KB) is copied to benchmarks/results/seeds/<seed>/
# <name>.json, which is committed: runs/ stays on one machine, the records let a later session's tables count
# every seed run so far. Runs with a record are skipped, a scored run is only recorded and a trained but
# unscored run only scored, so the queue can be stopped and resumed, across sessions too. Keep the machine
# otherwise idle: a second job on the 2 cores slowed a training run ~10x (benchmarks/RESULTS.md §9), so runs go
# one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-42 43 44}
ONLY=${ONLY:-lora-8 smora-64-8 lora-64}
PY=${PY:-.venv/bin/python}
RECORDS=${RECORDS:-benchmarks/results/seeds}
for seed in $SEEDS; do
  for name in $ONLY; do
    run="runs/seeds/$seed/$name"
    if [[ -f "$RECORDS/$seed/$name.json" ]]; then echo "== seed $seed $name: recorded"; continue; fi
    if [[ ! -f "$run/eval/$name/results.json" ]]; then
      SEED=$seed RUNS="runs/seeds/$seed" ONLY="$name" LAUNCH="$PY" scripts/build_zoo.sh
      $PY evaluate.py --checkpoint "$run/adapter" --no-base --no-plots --seed "$seed" --out "$run/eval.tmp"
      rm -rf "$run/eval" && mv "$run/eval.tmp" "$run/eval"
    fi
    $PY scripts/seed_table.py runs/seeds --only "$name" --record "$RECORDS" > /dev/null  # rewrites this name's other seeds' records identically
  done
done
