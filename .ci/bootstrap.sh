#!/usr/bin/env bash
# Idempotent install of everything nnsam2_assets needs, into ./.venv (Python 3.11, CPU torch here).
#   .ci/bootstrap.sh            python environment only
#   .ci/bootstrap.sh --system   also Debian's chromium, postgresql and redis-server (browser, Postgres and
#                               Celery tests)
# A second run with unchanged lock files does nothing. GPU machines: NNSAM2_TORCH="torch==2.14.1".
# A machine without a local CPU wheel: NNSAM2_TORCH_INDEX=https://download.pytorch.org/whl/cpu (PyPI's
# torch==2.13.0 is the CUDA-linked build: it runs on CPU, with some 3 GB of nvidia-* wheels beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${NNSAM2_PYTHON:-python3.11}"
TORCH="${NNSAM2_TORCH:-torch==2.13.0}"
TORCH_INDEX="${NNSAM2_TORCH_INDEX:-}"
STAMP=.venv/.nnsam2-bootstrap
want="$(cat docker/requirements-cpu.lock pyproject.toml | sha256sum | cut -c1-16) $TORCH${TORCH_INDEX:+ $TORCH_INDEX}"

if [[ "${1:-}" == "--system" ]]; then
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  [[ -x "$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1)/initdb" ]] || need+=(postgresql)
  if ((${#need[@]})); then
    echo "bootstrap: installing system packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
echo "bootstrap: building .venv (about 2 minutes)"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
# pip's own failure must fail the bootstrap: only grep's "nothing left to print" is tolerated (a `|| true` after
# the pipe had swallowed a failed install, and the stamp then marked the old packages as the lock's)
pip_q() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored" || true; }; }
if [[ -n "$TORCH_INDEX" ]]; then pip_q "$TORCH" --index-url "$TORCH_INDEX"; else pip_q "$TORCH"; fi
# --no-deps: the lock is a complete, solved set. Resolving afresh would pull torchvision (required by sam2's
# metadata), which breaks beside the CPU torch wheel, and an ANTLR runtime that breaks Dagster's selections.
pip_q --no-deps -r docker/requirements-cpu.lock
# sam2 ships only an sdist whose build requires torch; build against the installed torch, without CUDA ops
SAM2_BUILD_CUDA=0 pip_q --no-build-isolation --no-deps sam2==1.1.0
pip_q --no-deps -e .
.venv/bin/python -c "import dagster, nnunetv2, SimpleITK, duckdb, torch, nnsam2_assets.definitions, nnsam2_assets.propagation.sam2" \
  || { echo "bootstrap: import check failed" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "bootstrap: ready"
