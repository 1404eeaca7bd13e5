import os

# Six simulated CPU devices for the device-placement tests; must be set before JAX starts.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "6")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the session, inherited by the scripts the
# tests start: the same tiny step compiles once, not once per subprocess.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="minigpt-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pytest  # noqa: E402

from minigpt_jax.config import Config  # noqa: E402


@pytest.fixture
def tiny() -> Config:
    """A model small enough for seconds-long tests (the vocabulary stays GPT-2's)."""
    return Config(embed_dim=32, n_heads=2, n_layers=2, seq_len=32, batch_size=4, dropout=0.0)
