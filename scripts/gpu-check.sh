#!/usr/bin/env bash
# One GPU check from a fresh checkout, for a lent NVIDIA H100/H200 (under 5 minutes):
#
#   scripts/gpu-check.sh            # on the GPU machine, in the repository root
#   scripts/gpu-check.sh --cpu      # dry run here: the same checks at small sizes on the CPU
#
# 1. A venv (.gpu-check-venv) that sees the system's packages, so an image's CUDA torch and
#    Triton are used as they are; what is missing is installed: torch with CUDA from PyPI,
#    the project (`pip install --no-deps -e .`; GPU_CHECK_FULL_INSTALL=1: `pip install -e .`;
#    offline: PYTHONPATH), and what gpu/ and storage/ import (pydantic, sqlalchemy, ...),
#    also from $GPU_CHECK_WHEELS (a folder of wheels, default .whl/) when offline.
# 2. `python -m gpu.check` (see gpu/check.py): top-k exactness against torch.topk on fp32
#    scores (k = 1, 10, 64; ragged N; near-ties; every selection path), normalize and L2
#    against torch, the fused kernel's 16 x 20M launch, then the three targets (top-k
#    1024 x 1M x 384 fp16 <= 1.5 ms, normalize 1M x 384 fp32 <= 1.0 ms, pairwise L2
#    8192^2 x 384 <= 1.2 ms) with their memory, and `benchmarks/gpu_ops.py --load FILE
#    --store` into a scratch database.
# 3. ONE JSON file: $OUT/gpu-check.json when $OUT is set, else ./gpu-check.json. Record it
#    on the dev machine with: python benchmarks/gpu_ops.py --load gpu-check.json --store
#
# Exit status: 0 all checks passed, 1 a check failed (see "failed" in the JSON), 2 setup.
set -uo pipefail

MODE=gpu
for arg in "$@"; do
    case "$arg" in
        --cpu | --dry-run) MODE=cpu ;;
        -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $arg (expected --cpu)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
OUT_FILE="${OUT:-$PWD}/gpu-check.json"
mkdir -p "$(dirname "$OUT_FILE")"
START=$(date +%s)
log() { echo "gpu-check [$(($(date +%s) - START)) s] $*"; }

if [ "$MODE" = cpu ]; then
    # The dry run uses the interpreter it is given (the dev venv): nothing to install.
    PY="${PYTHON:-.venv/bin/python}"
    [ -x "$PY" ] || PY=python3
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    log "CPU dry run with $PY"
    exec "$PY" -m gpu.check --device cpu --small --out "$OUT_FILE"
fi

PY="${PYTHON:-python3}"
VENV="${GPU_CHECK_VENV:-.gpu-check-venv}"
PIP_OPTS=(-q --disable-pip-version-check --retries 1 --timeout 20)
WHEELS="${GPU_CHECK_WHEELS:-.whl}"
[ -d "$WHEELS" ] && PIP_OPTS+=(--find-links "$WHEELS")

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV (with the system's packages)"
    "$PY" -m venv --system-site-packages "$VENV" || log "no venv here: using $PY itself"
fi
VPY="$VENV/bin/python"
[ -x "$VPY" ] || VPY="$PY"

if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    log "installing torch with CUDA from PyPI"
    "$VPY" -m pip install "${PIP_OPTS[@]}" "torch>=2.4,<=2.14.1" \
        || { echo "gpu-check: no CUDA torch and none could be installed" >&2; exit 2; }
fi
"$VPY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu-check: torch sees no CUDA device" >&2; exit 2; }

# The project without its orchestration stack (Prefect, DSPy, ...: minutes to install and
# not used here); GPU_CHECK_FULL_INSTALL=1 installs everything (`pip install -e .`).
log "installing the project"
if [ "${GPU_CHECK_FULL_INSTALL:-0}" = 1 ]; then
    "$VPY" -m pip install "${PIP_OPTS[@]}" -e . || log "full install failed"
else
    "$VPY" -m pip install "${PIP_OPTS[@]}" --no-deps -e . 2>/dev/null \
        || "$VPY" -m pip install "${PIP_OPTS[@]}" --no-deps --no-build-isolation -e . 2>/dev/null \
        || log "no editable install (offline?): using the checkout through PYTHONPATH"
fi
# What gpu.check and `gpu_ops.py --load --store` import, if the image lacks it.
MISSING=$("$VPY" - <<'PYEOF'
import importlib.util
need = {"numpy": "numpy", "psutil": "psutil", "pydantic": "pydantic",
        "pydantic_settings": "pydantic-settings", "sqlalchemy": "sqlalchemy",
        "alembic": "alembic", "triton": "triton"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$MISSING" ]; then
    log "installing $MISSING"
    # shellcheck disable=SC2086  # a list of package names
    "$VPY" -m pip install "${PIP_OPTS[@]}" $MISSING || log "could not install: $MISSING"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DSPYFLOW_HOME="${DSPYFLOW_HOME:-$(mktemp -d)}"
nvidia-smi -L 2>/dev/null || true

log "running gpu.check -> $OUT_FILE"
"$VPY" -m gpu.check --device cuda --out "$OUT_FILE"
rc=$?
log "done (exit $rc)"
exit $rc
