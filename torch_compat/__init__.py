"""PyTorch interop for minigpt_jax: .pt data, state dicts and a reference model."""
