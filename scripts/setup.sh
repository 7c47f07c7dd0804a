# Source me: create or reuse .venv and install the project with what its commands need.
# torch==2.13.0 comes first, pinned (an open range would pull the newest, multi-GB CUDA build). Where a wheel of it
# lies in PIP_FIND_LINKS (this project's machines: the CPU build), a GPU is present, or pip is given an index of
# its own (PIP_INDEX_URL, pip.conf), pip takes what it finds; on a machine with none of these, the CPU build from
# PyTorch's own index (PyPI's Linux default is the CUDA build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.lightning_pipe-installed
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  torch_from=() has_wheel=false
  for place in ${PIP_FIND_LINKS:-}; do  # (folders or file:// URLs, separated by spaces)
    if ls "${place#file://}"/torch-2.13.0* >/dev/null 2>&1; then has_wheel=true; fi
  done
  if ! $has_wheel && ! command -v nvidia-smi >/dev/null && [ -z "${PIP_INDEX_URL:-}" ] \
      && [ -z "$(.venv/bin/python -m pip config get global.index-url 2>/dev/null)" ]; then
    torch_from=(--index-url https://download.pytorch.org/whl/cpu)  # (a configured index or mirror is left alone)
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check "${torch_from[@]}" torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,examples]"
  echo "$want" > "$stamp"
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"  # idle OpenMP threads sleep instead of spinning
