#!/usr/bin/env bash
# The project's two entry points, each self-contained on a fresh machine:
#   bash run.sh demo   - the main job: MARTHE, HD, RTHO and a fixed LR on scikit-learn's digits
#   bash run.sh test   - the test suite (what CI runs)
# Both create or reuse .venv, install what is missing and build the compiled extension.
# A torch already importable (e.g. a CUDA build in the system site-packages) is kept.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MARTHE_VENV:-.venv}
TORCH_VERSION=${MARTHE_TORCH_VERSION:-2.13.0}
TRITON_VERSION=${MARTHE_TRITON_VERSION:-3.6.0}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV"
  fi
  local py="$VENV/bin/python"
  # Hash of everything that changes what gets installed or built: reinstall only on change.
  local stamp="$VENV/.marthe-setup-$(cat setup.py pyproject.toml requirements-dev.txt \
      $(find csrc -type f 2>/dev/null | sort) | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  "$py" -m pip install -q --upgrade pip >/dev/null
  # torch first and pinned: an unpinned requirement would pull a multi-GB CUDA build.
  "$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==$TORCH_VERSION"
  "$py" -c "import triton" 2>/dev/null || "$py" -m pip install -q "triton==$TRITON_VERSION" \
    || echo "run.sh: triton not installed; the Triton backend and its tests will be skipped" >&2
  "$py" -m pip install -q -r requirements-dev.txt
  MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install -q --no-build-isolation --no-deps -e .
  rm -f "$VENV"/.marthe-setup-*
  touch "$stamp"
}

case "${1:-}" in
  demo)
    setup
    shift
    exec "$VENV/bin/python" python/run.py demo "$@"
    ;;
  test)
    setup
    shift
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash run.sh demo|test [extra arguments]" >&2
    exit 2
    ;;
esac
