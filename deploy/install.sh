#!/usr/bin/env bash
# Creates or completes the virtual environment with the verified stack (../shared/STACK.md):
# torch first, Horovod compiled against it with Gloo, then this package and its pins.
# Each step is skipped when what it installs is already there, so a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
# EXTRAS=[test] and editable for development; deploy/pack.sh installs the package itself (EXTRAS= EDITABLE=0),
# because a packed environment must not point back into this checkout.
EXTRAS=${EXTRAS-[test]}
EDITABLE=${EDITABLE:-1}
TORCH_VERSION=2.13.0
HOROVOD_VERSION=0.28.1

# VENV_OPTIONS=--copies (deploy/pack.sh): an interpreter copied, not linked, in the venv's bin
[ -x "$VENV/bin/python" ] || { echo "==> creating $VENV"; "$PYTHON" -m venv ${VENV_OPTIONS:-} "$VENV"; }
py="$VENV/bin/python"
pip() { "$py" -m pip --disable-pip-version-check "$@"; }
# A local version label counts as the version: the CPU wheel is 2.13.0+cpu.
installed() { "$py" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1').split('+')[0] != '$2')" 2>/dev/null; }

if ! installed torch "$TORCH_VERSION"; then
  echo "==> installing torch $TORCH_VERSION (CPU wheel where one lies on disk)"
  pip install "torch==$TORCH_VERSION"
fi

if ! installed horovod "$HOROVOD_VERSION"; then
  echo "==> building horovod $HOROVOD_VERSION with PyTorch + Gloo (about 10 minutes on 2 cores)"
  pip install "setuptools>=77" wheel cloudpickle psutil pyyaml packaging
  gpu_ops=()
  if command -v nvcc >/dev/null 2>&1 && [ -n "${HOROVOD_GPU_OPERATIONS:-}" ]; then
    gpu_ops=(HOROVOD_GPU_OPERATIONS="$HOROVOD_GPU_OPERATIONS")
  fi
  env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 CXX="$PWD/deploy/cxx17" "${gpu_ops[@]}" \
      "$py" -m pip --disable-pip-version-check install --no-build-isolation "horovod==$HOROVOD_VERSION"
fi

"$py" deploy/patch_horovod.py  # Horovod's servers bind to one interface, not all (see the script)

check=$("$VENV/bin/horovodrun" --check-build)
for needed in PyTorch Gloo; do
  if ! grep -q "\[X\] $needed" <<<"$check"; then
    echo "$check" >&2
    echo "install.sh: horovod was built without $needed; remove $VENV and run again" >&2
    exit 1
  fi
done

stamp="$VENV/.pipeline-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing the pipeline package and its pinned dependencies"
  if [ "$EDITABLE" = 1 ]; then pip install -e ".$EXTRAS"; else pip install ".$EXTRAS"; fi
fi
touch "$stamp"
