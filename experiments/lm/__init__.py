"""Research harness for real-model studies (outside the blasst_jax wheel)."""
