#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv in the repository root and installs
# beit3_jax into it, editable, with the extras named as arguments, at the exact versions that
# CI tests: pip install -c constraints.txt (setup.cfg itself only gives compatible ranges;
# see docs/dependencies.md).
#
#   bash launch/setup_venv.sh            # the package: jax (CPU), flax, optax, orbax, tfds, ...
#   bash launch/setup_venv.sh test       # + pytest, torch 2.13.0 (CPU), torchscale 0.3.0, selenium
#                                        #   (and Debian's chromium, chromium-driver: see below)
#   bash launch/setup_venv.sh tpu        # + jax[tpu], on a TPU VM (run on every host)
#   bash launch/setup_venv.sh torch tpu  # several extras at once
#
# beit3_jax needs Python >= 3.11 (setup.cfg's python_requires; jax 0.10 supports no older one).
# Environment: PYTHON (a Python >= 3.11; default: the first of python3, python3.13, python3.12,
# python3.11 that is one), VENV (default <repo>/.venv).
# Without PYTHON, where none of those is >= 3.11 and apt-get exists (TPU VM images are Ubuntu
# 22.04, with Python 3.10), it installs python3.11 and python3.11-venv with apt-get (through
# `sudo -n` unless it runs as root) and uses python3.11.
# The test extra also needs Debian's chromium and chromium-driver (tests/test_report.py opens
# predict's HTML reports in the headless browser): where /usr/bin/chromedriver is missing and
# apt-get exists, it installs them the same way (root, or `sudo -n`), and says so when it cannot.
# Only package registries are used (PyPI; apt's archives for python3.11, chromium and
# chromium-driver); nothing else is downloaded.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
constraints="$repo/constraints.txt"

# Prints "X.Y.Z" of the Python given, and succeeds only if it is >= 3.11 (jax 0.10 needs 3.11).
python_version_ok() {
  "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3]); sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

if [ -n "${PYTHON:-}" ]; then
  python="$PYTHON"
  if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup_venv.sh: PYTHON=$python not found; beit3_jax needs Python >= 3.11" >&2; exit 1
  fi
  if ! version="$(python_version_ok "$python")"; then
    echo "setup_venv.sh: PYTHON=$python ($(command -v "$python")) is Python ${version:-of unknown version};" \
      "beit3_jax needs Python >= 3.11 (jax 0.10). Set PYTHON to a Python 3.11 or newer." >&2
    exit 1
  fi
else
  python=""
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 && python_version_ok "$candidate" >/dev/null; then
      python="$candidate"; break
    fi
  done
  if [ -z "$python" ]; then
    found="python3 is missing"
    command -v python3 >/dev/null 2>&1 \
      && found="python3 ($(command -v python3)) is $(python3 --version 2>&1)"
    no_python="setup_venv.sh: no Python >= 3.11 among python3, python3.13, python3.12, python3.11\
 ($found); beit3_jax needs Python >= 3.11 (jax 0.10)."
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "$no_python Set PYTHON to one." >&2
      exit 1
    fi
    as_root=()
    if [ "$(id -u)" != 0 ]; then
      if ! command -v sudo >/dev/null 2>&1; then
        echo "$no_python apt-get could install python3.11, but this is not root and sudo is" \
          "missing. Install python3.11 and python3.11-venv as root, or set PYTHON to a" \
          "Python >= 3.11." >&2
        exit 1
      fi
      as_root=(sudo -n)
    fi
    echo "setup_venv.sh: no Python >= 3.11 found ($found); installing python3.11 and" \
      "python3.11-venv with ${as_root[*]:+${as_root[*]} }apt-get"
    # noninteractive: a package's configuration must not stop to ask questions.
    # A failed update (one unreachable source list, say) need not stop the install.
    ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update \
      || echo "setup_venv.sh: warning: apt-get update failed; installing from the lists at hand" >&2
    if ! ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y python3.11 python3.11-venv; then
      echo "setup_venv.sh: apt-get could not install python3.11 and python3.11-venv (see" \
        "above; \`sudo -n\` fails where sudo asks for a password). Install them yourself," \
        "or set PYTHON to a Python >= 3.11." >&2
      exit 1
    fi
    if ! python_version_ok python3.11 >/dev/null; then
      echo "setup_venv.sh: python3.11 is still not a usable Python >= 3.11 after apt-get" \
        "install; set PYTHON to one." >&2
      exit 1
    fi
    python=python3.11
  fi
fi

extras=""
for extra in "$@"; do
  case "$extra" in
    test|torch|tpu) extras="${extras:+$extras,}$extra" ;;
    *) echo "setup_venv.sh: unknown extra '$extra' (known: test, torch, tpu)" >&2; exit 2 ;;
  esac
done

if [ ! -x "$venv/bin/python" ]; then
  echo "Creating $venv with $("$python" --version 2>&1) ($(command -v "$python"))"
  "$python" -m venv "$venv"
elif ! version="$(python_version_ok "$venv/bin/python")"; then
  echo "setup_venv.sh: the existing $venv has Python ${version:-of unknown version};" \
    "beit3_jax needs Python >= 3.11. Remove it (rm -r $venv) or set VENV." >&2
  exit 1
fi
target="$repo"
[ -n "$extras" ] && target="$repo[$extras]"
echo "Installing beit3_jax${extras:+[$extras]} into $venv (versions from constraints.txt)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" -e "$target"
# torchscale's pin of timm pulls torchvision, whose PyPI wheel does not load beside the CPU
# torch ("operator torchvision::nms does not exist") and then breaks transformers' vision
# models. Nothing here uses torchvision: remove a copy that cannot be imported.
if "$venv/bin/python" -m pip show --quiet torchvision >/dev/null 2>&1 \
    && ! "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  echo "Removing torchvision (it cannot be imported beside this torch build)"
  "$venv/bin/python" -m pip uninstall --quiet --yes torchvision
fi
# tests/test_report.py drives Debian's chromium through /usr/bin/chromedriver (Selenium).
if [[ ",$extras," == *,test,* ]] && [ ! -x /usr/bin/chromedriver ]; then
  browser_fix="Install the Debian packages chromium and chromium-driver as root (apt-get install\
 -y chromium chromium-driver); until then tests/test_report.py fails."
  browser_root=()
  browser_blocker=""
  if ! command -v apt-get >/dev/null 2>&1; then
    browser_blocker="there is no apt-get"
  elif [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      browser_root=(sudo -n)
    else
      browser_blocker="this is not root and sudo is missing"
    fi
  fi
  if [ -n "$browser_blocker" ]; then
    echo "setup_venv.sh: warning: /usr/bin/chromedriver is missing and $browser_blocker." \
      "$browser_fix" >&2
  else
    echo "Installing chromium and chromium-driver (for tests/test_report.py) with" \
      "${browser_root[*]:+${browser_root[*]} }apt-get"
    ${browser_root[@]+"${browser_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update \
      || echo "setup_venv.sh: warning: apt-get update failed; installing from the lists at hand" >&2
    if ! ${browser_root[@]+"${browser_root[@]}"} env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y chromium chromium-driver || [ ! -x /usr/bin/chromedriver ]; then
      echo "setup_venv.sh: warning: apt-get could not install chromium and chromium-driver" \
        "(see above; \`sudo -n\` fails where sudo asks for a password). $browser_fix" >&2
    fi
  fi
fi
echo "Ready: $venv/bin/python"
