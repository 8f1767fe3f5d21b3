"""GGUF files for llama.cpp and Ollama: :func:`save_gguf` writes a transformers causal LM (dense, masked or shrunk) as a
GGUF file stock llama.cpp loads as its own architecture, with its tokenizer and an Ollama ``Modelfile``.

- :mod:`.quantization`: the types (f32, f16, bf16, q8_0, q4_0) and which tensors stay float32;
- :mod:`.architecture`: the base of the per-architecture writers; :mod:`.llama`, :mod:`.qwen2` and :mod:`.gemma3`
  are the supported ones, picked by :mod:`.families`;
- :mod:`.vocab` and :mod:`.pretokenizer`: the tokenizer keys;
- :mod:`.modelfile`: the Ollama Modelfile;
- :mod:`.writer`: :func:`save_gguf` and :class:`GGUFSummary`; :mod:`.export`: :class:`GGUFExport`.

It imports the ``gguf`` package (``pip install gguf``) only when a file is written.

Example::

    from wanda_lightning.gguf import save_gguf
    save_gguf(model, "small.gguf", dtype="q8_0", tokenizer="SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from .export import GGUFExport
from .quantization import GGUF_TYPES, GGUFType
from .vocab import PLACEHOLDER
from .writer import GGUFSummary, save_gguf

__all__ = ["GGUF_TYPES", "PLACEHOLDER", "GGUFExport", "GGUFSummary", "GGUFType", "save_gguf"]
