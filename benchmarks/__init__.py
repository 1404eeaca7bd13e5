"""Every benchmark of minigpt_jax and the GPU check, run from the checkout's root as modules:

  python -m benchmarks.bench            # the training step against PyTorch (BENCHMARKS.md)
  python -m benchmarks.gpu_check --help # everything a GPU must show, in one command

Each module's --help says what it measures and which BENCHMARKS.md section it writes. The
library never imports this package; it imports the library (installed, or the checkout's on
PYTHONPATH). Nothing runs at import.
"""
