#!/usr/bin/env bash
# Set up .venv if needed and run the test suite.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python -m pytest "$@"
