"""The user commands, one module each (run, evaluate, generate, ...): installed as the package
minigpt_scripts, whose `main` functions are the `minigpt-*` entry points (pyproject.toml), and
run from a checkout as `python scripts/run.py ...`. They import the installed minigpt_jax and
wire in what the library must not import (torch_compat's readers). Nothing runs at import.
"""
