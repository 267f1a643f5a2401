#!/usr/bin/env bash
# The ablation grid on one GPU box, as run for README "Results": every classifier group is its own process
# (`wsss ablations --jobs`), all sharing the GPU; cells are queued seed by seed, so a deadline leaves whole
# seeds of every variant. The box needs no Prefect/MLflow/DVC: `wsss report` runs afterwards where the
# runs are copied back (pack_ablation_runs below writes the files the report reads).
#
#   scripts/gpu_ablations.sh DEADLINE_S OUT_DIR SCALE:JOBS:VARIANT,VARIANT... [SCALE:JOBS:...]
#   e.g. scripts/gpu_ablations.sh 420 /tmp/out default:10:all converged:5:full,no_masking,cam_baseline
# `all`: the scale's variants (ablations.yaml scale_variants). At the deadline every run is stopped after
# its last finished epoch; the same command again on the same box resumes them (checkpoints per epoch)
# and skips finished runs, so a grid longer than one call's limit runs as two calls in a row.
set -uo pipefail
deadline=$1 out=$2
shift 2
python=${PYTHON:-python3}
mkdir -p "$out"

# The data set is ingested once, before the processes start (every scale shares it).
$python -c 'from tasks import ablations as a; a.prepare(a.plan(a.read_config(), "params.yaml", variants=["full"]))' || exit 1

pids=()
for spec in "$@"; do
  IFS=: read -r scale jobs variants <<<"$spec"
  args=(--scale "$scale" --jobs "$jobs" --no-report -S num_threads=1)
  if [ "$variants" != all ]; then
    for v in ${variants//,/ }; do args+=(--variant "$v"); done
  fi
  for seed in 0 1 2; do args+=(--seed "$seed"); done
  mkdir -p "artifacts/ablations/$scale"
  timeout "$deadline" $python -m wsss.tools.cli ablations "${args[@]}" >"artifacts/ablations/$scale.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"

$python - "$out" <<'EOF'
"""Packs what the report needs: every result row and training log, each variant's first-seed pseudo masks,
and the classifiers whose maps the grid shows."""
import json
import sys
import tarfile
from pathlib import Path

from wsss.tools.ablations import DEFAULT_ROOT
from wsss.tools.report import MAP_VARIANTS

out = Path(sys.argv[1])
with tarfile.open(out / "results.tgz", "w:gz") as results, tarfile.open(out / "masks.tgz", "w:gz") as masks:
    for path in sorted(DEFAULT_ROOT.rglob("*")):
        if path.name in ("result.json", "stats.json", "metrics.json", "gates.json", "history.csv") or path.suffix == ".log":
            results.add(path)
        elif path.name == "train.parquet" and path.parent.parent.name == "seed0":
            masks.add(path)
with tarfile.open(out / "models.tgz", "w:gz") as models:
    for result in DEFAULT_ROOT.glob("*/*/seed0/result.json"):
        if result.parent.parent.name in MAP_VARIANTS:
            models.add(Path(json.loads(result.read_text())["classifier_dir"]) / "model.pt")
print({p.name: p.stat().st_size for p in out.iterdir()})
EOF
