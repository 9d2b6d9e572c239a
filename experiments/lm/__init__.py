"""Research harness outside the blasst_jax wheel: the small GPT, synthetic
and real-text training data, planted-pattern models, pretrained checkpoints
and the evaluation of real-model studies."""
