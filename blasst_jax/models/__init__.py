"""Pretrained models with skip-softmax attention in every layer.

    from blasst_jax import models
    model, tok = models.load_gguf(models.smollm2_path(), dtype=jnp.bfloat16,
                                  bos_token="<|endoftext|>", threshold=0.1)
    out = models.generate(model, [tok.encode("The river")], max_new_tokens=20)
    print(tok.decode(out.tokens[0]))

`Llama` (Flax NNX, built on `blasst_jax.nn.SkipSelfAttention`), loaders for
GGUF files and Hugging Face safetensors folders, the tokenizers they carry,
and KV-cache generation. Loading needs the `[lm]` extra (gguf, safetensors,
tokenizers).
"""

from blasst_jax.models.generate import GenerationOutput
from blasst_jax.models.generate import Generator
from blasst_jax.models.generate import generate
from blasst_jax.models.llama import Llama
from blasst_jax.models.llama import LlamaConfig
from blasst_jax.models.tokenizer import LlamaTokenizer
from blasst_jax.models.weights import assign_params
from blasst_jax.models.weights import load_gguf
from blasst_jax.models.weights import load_hf
from blasst_jax.models.weights import read_gguf
from blasst_jax.models.weights import read_hf
from blasst_jax.models.weights import smollm2_path

__all__ = ["GenerationOutput", "Generator", "Llama", "LlamaConfig",
           "LlamaTokenizer", "assign_params", "generate", "load_gguf",
           "load_hf", "read_gguf", "read_hf", "smollm2_path"]
