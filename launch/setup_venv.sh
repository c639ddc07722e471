#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv in the repository root and installs
# beit3_jax into it, editable, with the extras named as arguments.
#
#   bash launch/setup_venv.sh            # the package: jax (CPU), flax, optax, orbax, tfds, ...
#   bash launch/setup_venv.sh test       # + pytest, torch 2.13.0 (CPU) and torchscale 0.3.0
#   bash launch/setup_venv.sh tpu        # + jax[tpu], on a TPU VM (run on every host)
#   bash launch/setup_venv.sh torch tpu  # several extras at once
#
# Environment: PYTHON (default python3, >= 3.10), VENV (default <repo>/.venv).
# Only package registries are used; nothing else is downloaded.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

extras=""
for extra in "$@"; do
  case "$extra" in
    test|torch|tpu) extras="${extras:+$extras,}$extra" ;;
    *) echo "setup_venv.sh: unknown extra '$extra' (known: test, torch, tpu)" >&2; exit 2 ;;
  esac
done

if [ ! -x "$venv/bin/python" ]; then
  echo "Creating $venv with $("$python" --version 2>&1)"
  "$python" -m venv "$venv"
fi
target="$repo"
[ -n "$extras" ] && target="$repo[$extras]"
echo "Installing beit3_jax${extras:+[$extras]} into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$target"
# torchscale's pin of timm pulls torchvision, whose PyPI wheel does not load beside the CPU
# torch ("operator torchvision::nms does not exist") and then breaks transformers' vision
# models. Nothing here uses torchvision: remove a copy that cannot be imported.
if "$venv/bin/python" -m pip show --quiet torchvision >/dev/null 2>&1 \
    && ! "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  echo "Removing torchvision (it cannot be imported beside this torch build)"
  "$venv/bin/python" -m pip uninstall --quiet --yes torchvision
fi
echo "Ready: $venv/bin/python"
