"""The name of a byte-level BPE tokenizer's pre-tokenizer in llama.cpp (``tokenizer.ggml.pre``).

llama.cpp splits text before BPE with a regex it picks by this name; the name itself lives only in llama.cpp's
converter, which recognises a tokenizer by the ids it gives a test text. Here a tokenizer is recognised two ways,
both exact:

1. by its vocabulary, for known models whose tokenizer is often rebuilt by transformers from a GGUF file (which loses
   the pre-tokenizer): SmolLM and SmolLM2 (``"smollm"``);
2. by its ``tokenizer.json`` pre-tokenizer, compared step by step with the ones whose llama.cpp regex is known:
   GPT-2 (``"gpt-2"``), SmolLM/StarCoder digits-then-bytes (``"smollm"``), Llama 3 (``"llama-bpe"``) and Qwen2
   (``"qwen2"``).

Anything else gets ``"default"`` (llama.cpp's generic GPT-2-like split) and a warning: the file loads and runs, but
llama.cpp may split some text differently from transformers. Give the GGUF file the model came from as ``tokenizer``
to copy its exact name instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

__all__ = ["KNOWN_VOCABULARIES", "identify_pre_tokenizer", "vocabulary_fingerprint"]

#: sha256 of the tokens (UTF-8, joined by newlines, in id order) -> ``tokenizer.ggml.pre``.
KNOWN_VOCABULARIES: dict[str, str] = {
    # SmolLM2 (135M, 360M, 1.7B; base and instruct): 49152 tokens
    "d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55": "smollm",
}

# The Split regexes of Llama 3's and Qwen2's tokenizer.json (they differ in how many digits a piece holds).
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _REST
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _REST

# Each known pre-tokenizer as its steps: ("bytes", use_regex), ("digits", individual), ("split", regex).
_KNOWN_STEPS: dict[tuple[tuple[str, Any], ...], str] = {
    (("bytes", True),): "gpt-2",
    (("digits", True), ("bytes", True)): "smollm",
    (("split", _LLAMA3_SPLIT), ("bytes", False)): "llama-bpe",
    (("split", _QWEN2_SPLIT), ("bytes", False)): "qwen2",
}


def vocabulary_fingerprint(tokens: Sequence[str | bytes]) -> str:
    """sha256 of ``tokens`` in id order (each UTF-8, joined by newlines), the key of :data:`KNOWN_VOCABULARIES`.

    Example::

        >>> vocabulary_fingerprint(["a", "b"])[:12]
        '7e18f737311b'
    """
    joined = b"\n".join(token if isinstance(token, bytes) else token.encode("utf-8") for token in tokens)
    return hashlib.sha256(joined).hexdigest()


def _steps(pre_tokenizer: Any) -> tuple[tuple[str, Any], ...] | None:
    """The steps of a ``tokenizer.json`` pre-tokenizer, or ``None`` when one of them is of a kind not compared here."""
    if not isinstance(pre_tokenizer, dict):
        return None
    parts = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    steps: list[tuple[str, Any]] = []
    for part in parts or ():
        kind = part.get("type")
        if kind == "ByteLevel" and not part.get("add_prefix_space", False):
            steps.append(("bytes", bool(part.get("use_regex", True))))
        elif kind == "Digits":
            steps.append(("digits", bool(part.get("individual_digits", False))))
        elif kind == "Split" and part.get("behavior") == "Isolated" and not part.get("invert", False):
            pattern = part.get("pattern") or {}
            if "Regex" not in pattern:
                return None
            steps.append(("split", pattern["Regex"]))
        else:
            return None
    return tuple(steps)


def identify_pre_tokenizer(tokenizer_json: dict[str, Any], tokens: Sequence[str | bytes]) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, or ``None`` when it is not one of the known
    ones (see the module docstring).

    Args:
        tokenizer_json: The parsed ``tokenizer.json``.
        tokens: The vocabulary in id order (with added tokens), as written to ``tokenizer.ggml.tokens``.

    Example::

        >>> identify_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, ["a"])
        'gpt-2'
    """
    known = KNOWN_VOCABULARIES.get(vocabulary_fingerprint(tokens))
    if known is not None:
        return known
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    return None if steps is None else _KNOWN_STEPS.get(steps)
