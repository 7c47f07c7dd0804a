#!/usr/bin/env bash
# Set up .venv if needed and train: a byte-level GPT on Python's stdlib sources, 2-stage 1F1B pipeline on CPU.
# Any Hydra override passes through, e.g.: bash scripts/train.sh strategy=gpipe trainer.max_steps=100
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python -m lightning_pipe.train "$@"
