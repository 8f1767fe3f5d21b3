"""The tokenizer part of a GGUF file (``tokenizer.*`` keys): copied from another GGUF file, built from a transformers
tokenizer, or a timing-only placeholder.

- A GGUF file: every ``tokenizer.*`` key is copied as stored (vocabulary, merges, token types, special token ids,
  ``add_bos_token``, ``tokenizer.ggml.pre``, the chat template).
- A transformers tokenizer (or a folder with its ``tokenizer.json``): two kinds are built, with the ``gguf`` package's
  :class:`gguf.SpecialVocab` for merges, special token ids, ``add_*_token`` flags and the chat template:

  - byte-level BPE (GPT-2 style: SmolLM2, Qwen2, Llama 3) as ``tokenizer.ggml.model = "gpt2"``, with the
    pre-tokenizer name from :mod:`.pretokenizer`;
  - byte-fallback BPE (sentencepiece style: Llama 2, Mistral, Gemma) as ``"llama"``, each token scored by the rank of
    the merge that makes it (so llama.cpp merges in the tokenizer's order).

  Other kinds (WordLevel, WordPiece, Unigram) are refused.
- ``"placeholder"``: timing-only. A vocabulary of the model's size with dummy tokens (``<unk>``, ``<s>``, ``</s>``,
  byte tokens, then ``[PLACEHOLDER_i]``); llama.cpp loads it, text is meaningless.

Special token ids missing from the tokenizer are taken from the model's config (``bos_token_id``, ...). A vocabulary
smaller than the embedding is padded with unused ``[PAD{i}]`` tokens (llama.cpp needs one token per row); a larger one
is refused.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pretokenizer import identify_pre_tokenizer
from .quantization import require_gguf

__all__ = ["PLACEHOLDER", "Vocabulary", "placeholder_vocabulary", "read_metadata", "resolve_vocabulary"]

#: ``tokenizer=PLACEHOLDER`` writes a timing-only vocabulary (see the module docstring).
PLACEHOLDER = "placeholder"

_ALLOWED = (
    "the path of a GGUF file to copy the tokenizer from, a tokenizer folder (tokenizer.json) or a transformers "
    "tokenizer (byte-level BPE or byte-fallback BPE), or 'placeholder' for a timing-only file whose text is meaningless"
)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocabulary:
    """The ``tokenizer.*`` keys of a GGUF file.

    Attributes:
        fields: ``{key: (value, value type, element type or None)}`` with ``gguf.GGUFValueType`` types.
        source: What it was made from, for the summary (``"copied from model.gguf"``, ``"placeholder"`` ...).

    Example::

        >>> Vocabulary(placeholder_vocabulary(8).fields, "eight").padded(10).size
        10
    """

    fields: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)
    source: str = ""

    @property
    def size(self) -> int:
        """Number of tokens."""
        return len(self.fields["tokenizer.ggml.tokens"][0])

    def chat_template(self) -> str | None:
        """The chat template, if any."""
        value = self.fields.get("tokenizer.chat_template", (None,))[0]
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    def token(self, key: str) -> str | None:
        """The text of the special token ``key`` (``"eos"``, ``"eot"``), if the vocabulary names one."""
        entry = self.fields.get(f"tokenizer.ggml.{key}_token_id")
        tokens = self.fields["tokenizer.ggml.tokens"][0]
        if entry is None or not 0 <= int(entry[0]) < len(tokens):
            return None
        text = tokens[int(entry[0])]
        return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)

    def padded(self, rows: int) -> Vocabulary:
        """This vocabulary with unused ``[PAD{i}]`` tokens up to ``rows`` tokens.

        Raises:
            ValueError: If it has more tokens than ``rows``.
        """
        size = self.size
        if size > rows:
            raise ValueError(
                f"`tokenizer` ({self.source}) has {size} tokens, more than the model's {rows} embedding rows"
            )
        if size == rows:
            return self
        gguf = require_gguf()
        fields = dict(self.fields)
        extra = range(size, rows)

        def extend(key: str, values: list[Any]) -> None:
            if key in fields:
                value, kind, element = fields[key]
                fields[key] = (list(value) + values, kind, element)

        extend("tokenizer.ggml.tokens", [f"[PAD{i}]".encode() for i in extra])
        extend("tokenizer.ggml.token_type", [int(gguf.TokenType.UNUSED)] * len(extra))
        extend("tokenizer.ggml.scores", [-1000.0] * len(extra))
        return Vocabulary(fields, f"{self.source}, padded with {len(extra)} unused tokens to {rows}")

    def write(self, writer: Any) -> None:
        """Adds the keys to a ``gguf.GGUFWriter``."""
        for key, (value, kind, element) in self.fields.items():
            writer.add_key_value(key, value, kind, sub_type=element)


def _types() -> Any:
    return require_gguf().GGUFValueType


def placeholder_vocabulary(size: int) -> Vocabulary:
    """The timing-only vocabulary: ``size`` dummy tokens llama.cpp loads (sentencepiece-style, with byte tokens); text
    is meaningless.

    Args:
        size: The model's vocabulary size (embedding rows), at least 3.

    Example::

        >>> vocabulary = placeholder_vocabulary(300)
        >>> vocabulary.size, vocabulary.fields["tokenizer.ggml.tokens"][0][3]
        (300, b'<0x00>')
    """
    if size < 3:
        raise ValueError(f"a placeholder vocabulary needs at least 3 tokens (<unk>, <s>, </s>), the model has {size}")
    gguf = require_gguf()
    kinds, token_type = _types(), gguf.TokenType
    tokens = [b"<unk>", b"<s>", b"</s>"]
    types = [int(token_type.UNKNOWN), int(token_type.CONTROL), int(token_type.CONTROL)]
    for byte in range(min(256, size - 3)):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(int(token_type.BYTE))
    for index in range(len(tokens), size):
        tokens.append(f"[PLACEHOLDER_{index}]".encode())
        types.append(int(token_type.NORMAL))
    fields = {
        "tokenizer.ggml.model": ("llama", kinds.STRING, None),
        "tokenizer.ggml.tokens": (tokens, kinds.ARRAY, kinds.STRING),
        "tokenizer.ggml.scores": ([0.0] * size, kinds.ARRAY, kinds.FLOAT32),
        "tokenizer.ggml.token_type": (types, kinds.ARRAY, kinds.INT32),
        "tokenizer.ggml.unknown_token_id": (0, kinds.UINT32, None),
        "tokenizer.ggml.bos_token_id": (1, kinds.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, kinds.UINT32, None),
        "tokenizer.ggml.add_bos_token": (False, kinds.BOOL, None),
    }
    return Vocabulary(fields, "placeholder (timing only: dummy tokens, text is meaningless)")


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read_string(data: mmap.mmap, position: int) -> tuple[bytes, int]:
    (length,) = struct.unpack_from("<Q", data, position)
    start = position + 8
    return data[start : start + length], start + length


def read_metadata(path: Path, prefix: str = "") -> dict[str, tuple[Any, int, int | None]]:
    """The metadata keys of the GGUF file ``path`` that start with ``prefix``, as ``{key: (value, value type, element
    type or None)}`` with the GGUF type numbers; strings stay bytes, as stored.

    A direct reading of the GGUF header (version 2 or 3): ``gguf.GGUFReader`` builds an object per array element,
    which takes seconds for a 50k-token vocabulary.

    Raises:
        ValueError: If the file is not GGUF version 2 or 3, or holds a nested array.

    Example::

        read_metadata(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), "tokenizer.ggml.pre")
        # {'tokenizer.ggml.pre': (b'smollm', 8, None)}
    """
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] not in (2, 3):
            raise ValueError(f"{str(path)!r} is not a GGUF file of version 2 or 3")
        (count,) = struct.unpack_from("<Q", data, 16)
        position = 24
        fields: dict[str, tuple[Any, int, int | None]] = {}
        for _ in range(count):
            raw_key, position = _read_string(data, position)
            key = raw_key.decode("utf-8")
            (kind,) = struct.unpack_from("<I", data, position)
            position += 4
            element: int | None = None
            value: Any
            if kind == _STRING:
                value, position = _read_string(data, position)
            elif kind == _ARRAY:
                element, length = struct.unpack_from("<IQ", data, position)
                position += 12
                if element == _STRING:
                    value = []
                    for _ in range(length):
                        item, position = _read_string(data, position)
                        value.append(item)
                elif element in _SCALARS:
                    size = struct.calcsize(_SCALARS[element])
                    value = list(struct.unpack_from(f"<{length}{_SCALARS[element][1]}", data, position))
                    position += size * length
                else:
                    raise ValueError(
                        f"{str(path)!r}: key {key!r} holds a nested array, which this reader does not read"
                    )
            else:
                value = struct.unpack_from(_SCALARS[kind], data, position)[0]
                position += struct.calcsize(_SCALARS[kind])
            if key.startswith(prefix):
                fields[key] = (value, kind, element)
    return fields


def vocabulary_from_gguf(path: Path) -> Vocabulary:
    """Every ``tokenizer.*`` key of the GGUF file ``path``, as stored.

    Raises:
        ValueError: If the file has no tokenizer.

    Example::

        vocabulary_from_gguf(smollm2_path() / GGUF_FILE).size  # 49152
    """
    kinds = _types()
    fields = {
        key: (value, kinds(kind), None if element is None else kinds(element))
        for key, (value, kind, element) in read_metadata(path, "tokenizer.").items()
    }
    if "tokenizer.ggml.tokens" not in fields or "tokenizer.ggml.model" not in fields:
        raise ValueError(f"`tokenizer` {str(path)!r} is a GGUF file without a tokenizer (no tokenizer.ggml.tokens)")
    return Vocabulary(fields, f"copied from {path.name}")


def _token_list(tokenizer_json: dict[str, Any]) -> tuple[list[str | None], dict[int, bool]]:
    """Tokens by id (``None`` where no token has the id) and ``{id: special}`` for added tokens."""
    vocab: dict[str, int] = dict(tokenizer_json["model"].get("vocab") or {})
    added = {int(item["id"]): bool(item.get("special", False)) for item in tokenizer_json.get("added_tokens") or ()}
    by_id: dict[int, str] = {index: text for text, index in vocab.items()}
    for item in tokenizer_json.get("added_tokens") or ():
        by_id[int(item["id"])] = str(item["content"])
    size = max(by_id) + 1 if by_id else 0
    return [by_id.get(index) for index in range(size)], added


def _merge_pairs(tokenizer_json: dict[str, Any]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for merge in tokenizer_json["model"].get("merges") or ():
        if isinstance(merge, str):
            left, _, right = merge.partition(" ")
        else:
            left, right = merge
        pairs.append((left, right))
    return pairs


def _single_template(tokenizer_json: dict[str, Any]) -> list[dict[str, Any]]:
    """The single-sequence template of a ``TemplateProcessing`` post-processor (empty when there is none)."""
    processor = tokenizer_json.get("post_processor") or {}
    for part in processor.get("processors") or [processor]:
        if part.get("type") == "TemplateProcessing":
            return list(part.get("single") or ())
    return []


def _adds_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a sentencepiece-style tokenizer prepends ``▁`` to the text (Llama 2, Mistral) or not (Gemma)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    for part in pre.get("pretokenizers") or [pre]:
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") != "never" and part.get("add_prefix_space", True) is not False
    normalizer = tokenizer_json.get("normalizer") or {}
    return any(part.get("type") == "Prepend" for part in normalizer.get("normalizers") or [normalizer])


def vocabulary_from_folder(folder: Path, config: Any = None, name: str | None = None) -> Vocabulary:
    """The vocabulary of the tokenizer saved in ``folder`` (``tokenizer.json``, ``tokenizer_config.json``).

    Args:
        folder: The tokenizer folder.
        config: The model's config, for special token ids the tokenizer does not name.
        name: What to call it in messages (default the folder).

    Raises:
        ValueError: If there is no ``tokenizer.json`` or its model is neither byte-level nor byte-fallback BPE.

    Example::

        tokenizer.save_pretrained("tok/")
        vocabulary_from_folder(Path("tok/"), model.config).source  # "built from tok/ (byte-level BPE, ...)"
    """
    gguf = require_gguf()
    kinds, token_type = _types(), gguf.TokenType
    label = name or str(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"`tokenizer` {label!r} has no tokenizer.json; expected {_ALLOWED}")
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model") or {}
    decoder = json.dumps(tokenizer_json.get("decoder") or {})
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback") and '"ByteLevel"' in decoder
    byte_fallback = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    if not byte_level and not byte_fallback:
        raise ValueError(
            f"`tokenizer` {label!r} is a {model.get('type')} tokenizer, which this writer cannot build for llama.cpp; "
            f"expected {_ALLOWED}"
        )
    tokens, added = _token_list(tokenizer_json)
    texts = [text if text is not None else f"[PAD{index}]" for index, text in enumerate(tokens)]
    types: list[int] = []
    for index, text in enumerate(tokens):
        if text is None:
            types.append(int(token_type.UNUSED))
        elif byte_fallback and _BYTE_TOKEN.fullmatch(text):
            types.append(int(token_type.BYTE))
        elif index in added:
            types.append(int(token_type.CONTROL if added[index] else token_type.USER_DEFINED))
        elif byte_fallback and text == model.get("unk_token"):
            types.append(int(token_type.UNKNOWN))
        else:
            types.append(int(token_type.NORMAL))
    special = gguf.SpecialVocab(folder, load_merges=byte_level, n_vocab=len(texts))
    fields: dict[str, tuple[Any, Any, Any]] = {
        "tokenizer.ggml.tokens": ([text.encode("utf-8") for text in texts], kinds.ARRAY, kinds.STRING),
        "tokenizer.ggml.token_type": (types, kinds.ARRAY, kinds.INT32),
    }
    if byte_level:
        pre = identify_pre_tokenizer(tokenizer_json, texts)
        if pre is None:
            warnings.warn(
                f"the pre-tokenizer of `tokenizer` {label!r} is not one save_gguf recognises; writing llama.cpp's "
                "'default', so llama.cpp may split some text differently from transformers. Pass the GGUF file the "
                "model came from as `tokenizer` to copy its exact tokenizer.ggml.pre",
                stacklevel=3,
            )
            pre = "default"
        fields["tokenizer.ggml.model"] = ("gpt2", kinds.STRING, None)
        fields["tokenizer.ggml.pre"] = (pre, kinds.STRING, None)
        if not special.merges:
            raise ValueError(f"`tokenizer` {label!r} is a byte-level BPE tokenizer without merges")
        fields["tokenizer.ggml.merges"] = (special.merges, kinds.ARRAY, kinds.STRING)
        source = f"built from {label} (byte-level BPE, pre-tokenizer {pre!r})"
    else:
        ids = {text: index for index, text in enumerate(tokens) if text is not None}
        merges = _merge_pairs(tokenizer_json)
        scores = [
            0.0 if text is None or len(text) == 1 or index in added else float(-(len(merges) + index))
            for index, text in enumerate(tokens)
        ]
        for rank, (left, right) in reversed(list(enumerate(merges))):  # the first merge making a token wins
            merged = ids.get(left + right)
            if merged is not None:
                scores[merged] = float(-rank)
        fields["tokenizer.ggml.model"] = ("llama", kinds.STRING, None)
        fields["tokenizer.ggml.pre"] = ("default", kinds.STRING, None)
        fields["tokenizer.ggml.scores"] = (scores, kinds.ARRAY, kinds.FLOAT32)
        fields["tokenizer.ggml.add_space_prefix"] = (_adds_space_prefix(tokenizer_json), kinds.BOOL, None)
        source = f"built from {label} (byte-fallback BPE)"
    ids_found = dict(special.special_token_ids)
    for key in ("bos", "eos", "pad", "unk"):
        value = getattr(config, f"{key}_token_id", None) if config is not None else None
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if key not in ids_found and isinstance(value, int) and 0 <= value < len(texts):
            ids_found[key] = value
    keys = gguf.Keys.Tokenizer
    for kind, value in ids_found.items():
        id_key: str | None = getattr(keys, f"{kind.upper()}_ID", None)
        if id_key is not None:
            fields[id_key] = (int(value), kinds.UINT32, None)
    adds = dict(special.add_special_token)
    if "bos" not in adds:  # transformers adds a token only where its post-processor template says so
        single = _single_template(tokenizer_json)
        adds["bos"] = bool(single) and "SpecialToken" in single[0]
    for kind, flag in adds.items():
        add_key: str | None = getattr(keys, f"ADD_{kind.upper()}", None)
        if add_key is not None:
            fields[add_key] = (bool(flag), kinds.BOOL, None)
    template: Any = special.chat_template
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str):
        fields[keys.CHAT_TEMPLATE] = (template, kinds.STRING, None)
    return Vocabulary(fields, source)


def resolve_vocabulary(tokenizer: Any, rows: int, config: Any = None) -> Vocabulary:
    """The vocabulary ``tokenizer`` gives, padded to ``rows`` tokens.

    Args:
        tokenizer: A GGUF file path, a tokenizer folder, a transformers tokenizer or ``"placeholder"``.
        rows: The model's embedding rows.
        config: The model's config (special token ids the tokenizer does not name).

    Raises:
        ValueError: If ``tokenizer`` is ``None``, a path that is neither a GGUF file nor a tokenizer folder, a kind of
            tokenizer that cannot be written, or larger than the embedding.
        TypeError: If it is neither a path nor a tokenizer.

    Example::

        >>> resolve_vocabulary("placeholder", rows=64).size
        64
    """
    if tokenizer is None:
        raise ValueError(f"`tokenizer` is required (a GGUF file carries its tokenizer): pass {_ALLOWED}")
    if isinstance(tokenizer, str) and tokenizer == PLACEHOLDER:
        return placeholder_vocabulary(rows)
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer).expanduser()
        if path.is_dir():
            return vocabulary_from_folder(path, config).padded(rows)
        if path.is_file():
            with path.open("rb") as handle:
                if handle.read(4) == b"GGUF":
                    return vocabulary_from_gguf(path).padded(rows)
            raise ValueError(f"`tokenizer` {str(path)!r} is a file but not a GGUF file; expected {_ALLOWED}")
        raise ValueError(f"`tokenizer` {str(path)!r} does not exist; expected {_ALLOWED}")
    save = getattr(tokenizer, "save_pretrained", None)
    if not callable(save):
        raise TypeError(f"`tokenizer` must be {_ALLOWED}; got {type(tokenizer).__name__}")
    with tempfile.TemporaryDirectory(prefix="wanda-gguf-tokenizer-") as folder:
        save(folder)
        name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        return vocabulary_from_folder(Path(folder), config, name=f"{type(tokenizer).__name__} {name}").padded(rows)
