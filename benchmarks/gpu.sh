#!/usr/bin/env bash
# clinadapt on a GPU machine, one command:  bash benchmarks/gpu.sh --budget-s 330 [gpu.py options]
# Runs from this source tree (no install, no network). The wheels in ./.whl (gpu_wheels.sh) are
# installed first, without their dependencies, into a private folder that comes before the
# machine's own packages on the path (never replacing its torch); a wheel that does not install
# is reported and the rest go on. Then benchmarks/gpu.py runs its steps, each in its own process
# with its own time cap, and writes summary.txt / summary.json to $OUT (else ./gpu-bench) after
# every step. --budget-s counts from here, the install included.
set -uo pipefail
export GPU_BENCH_T0
GPU_BENCH_T0=$(date +%s.%N)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
command -v timeout >/dev/null || timeout() { shift; "$@"; }
site=${TMPDIR:-/tmp}/clinadapt-gpu-site
wheels=${GPU_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  mkdir -p "$site"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
      --disable-pip-version-check --target "$site")
    if ! timeout 180 "${pip[@]}" "$wheels"/*.whl; then
      echo "gpu.sh: installing the wheels together failed; one by one:" >&2
      for w in "$wheels"/*.whl; do
        timeout 60 "${pip[@]}" "$w" || echo "gpu.sh: $w is not installed" >&2
      done
    fi
  else  # no pip: a wheel is a zip of what goes into site-packages
    echo "gpu.sh: no pip for $PY; unpacking the wheels" >&2
    for w in "$wheels"/*.whl; do
      "$PY" -m zipfile -e "$w" "$site" || echo "gpu.sh: $w is not installed" >&2
    done
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu.sh: $(ls "$wheels"/*.whl | wc -l) wheels from $wheels installed in $site"
else
  echo "gpu.sh: no wheels in $wheels; using the machine's packages only" >&2
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export CLINADAPT_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
exec "$PY" benchmarks/gpu.py "$@"
