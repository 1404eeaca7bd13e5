"""MiniGPT in JAX: config -> tokenizer -> corpus -> data -> model -> train -> runner -> report."""
