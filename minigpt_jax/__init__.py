"""MiniGPT in JAX: config -> sources -> data -> model -> losses -> optim -> train -> loop ->
parallel -> report."""
