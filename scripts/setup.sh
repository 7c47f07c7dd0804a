# Source me: create or reuse .venv and install the project with what its commands need.
# torch==2.13.0 comes first: it is the CPU build on this disk; an open range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.lightning_pipe-installed
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,examples]"
  echo "$want" > "$stamp"
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"  # idle OpenMP threads sleep instead of spinning
