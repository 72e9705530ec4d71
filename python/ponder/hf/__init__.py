"""The Hugging Face side: ``HFPolicy`` (``policy``) and ``HFPRM`` (``prm``) on any causal LM,
the paged KV cache they share (``kv``; ``kv_fallback`` for models refused by its self-check)
and the kernels that move its blocks (``kernels``). Its modules import torch; this package itself does not."""
