"""write a saved model as a GGUF file for llama.cpp and Ollama (with a Modelfile beside it)

Write MODEL (a transformers directory, a wanda-lightning export directory, a .gguf file, or a Lightning .ckpt with
--module) as OUT.gguf, a file stock llama.cpp loads as its own architecture (llama, qwen2 or gemma3), with its tokenizer
and chat template, and a Modelfile for `ollama create` in the same folder. The tokenizer comes from --tokenizer (a
.gguf file to copy it from, a tokenizer directory, or 'placeholder' for a timing-only file), else from MODEL itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..core.layers import find_pretrained
from ..gguf.quantization import GGUF_TYPES
from .arguments import parse_dtype
from .loading import MODEL_HELP, LoadedModel, load_model

if TYPE_CHECKING:
    from ..gguf import GGUFSummary

__all__ = ["add_arguments", "add_gguf_arguments", "check_gguf_arguments", "gguf_tokenizer", "run", "write_gguf"]

_TOKENIZER_HELP = (
    "where the GGUF vocabulary comes from: a .gguf file (its tokenizer is copied, pre-tokenizer and chat template "
    "included), a tokenizer directory, or 'placeholder' (timing only: dummy tokens, text is meaningless); default: "
    "MODEL's own (the .gguf file itself when MODEL is one)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``wanda-lightning gguf``."""
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write (a Modelfile is written beside it)")
    parser.add_argument(
        "--type",
        default="q8_0",
        choices=list(GGUF_TYPES),
        help="type of the weights (norms and biases stay f32): f32, f16, bf16, q8_0 (default) or q4_0; q8_0 and q4_0 "
        "need widths that are multiples of 32",
    )
    parser.add_argument("--tokenizer", default=None, metavar="PATH", help=_TOKENIZER_HELP)
    parser.add_argument(
        "--module",
        default=None,
        metavar="PACKAGE.CLASS",
        help="for a .ckpt: the LightningModule class that holds the transformers model",
    )
    parser.add_argument("--dtype", type=parse_dtype, default=None, help="dtype to load MODEL in (default: as stored)")
    parser.add_argument("--no-modelfile", action="store_true", help="do not write a Modelfile beside OUT.gguf")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.gguf (and the Modelfile) if they exist")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def add_gguf_arguments(parser: argparse.ArgumentParser) -> None:
    """``--gguf PATH`` and ``--gguf-type``, for the commands that also write a GGUF file of their result."""
    parser.add_argument(
        "--gguf",
        default=None,
        metavar="PATH",
        help="also write the result as this GGUF file for llama.cpp / Ollama (with a Modelfile beside it; the "
        "tokenizer is MODEL's, or --tokenizer's)",
    )
    parser.add_argument(
        "--gguf-type",
        default="q8_0",
        choices=list(GGUF_TYPES),
        help="type of the --gguf weights: f32, f16, bf16, q8_0 (default) or q4_0",
    )


def gguf_tokenizer(spec: str, tokenizer_flag: str | None, loaded: LoadedModel) -> Any:
    """The vocabulary source for MODEL: ``--tokenizer`` as a path (or ``placeholder``), else MODEL itself when it is
    a .gguf file (an exact copy), else the tokenizer loaded with it (``None`` when there is none)."""
    if tokenizer_flag is not None:
        return tokenizer_flag
    if loaded.kind == "gguf":
        return str(Path(spec).expanduser())
    return loaded.tokenizer


def check_gguf_arguments(
    path: str, overwrite: bool, loaded: LoadedModel, tokenizer: Any, flag: str, modelfile: bool = True
) -> nn.Module:
    """Fails before any slow work when the GGUF file cannot be written: a bad or existing path, a model that is not a
    transformers model of a supported family, or no tokenizer; returns the transformers model.

    Args:
        path: The GGUF file.
        overwrite: Whether an existing file may be replaced.
        loaded: MODEL as loaded.
        tokenizer: What :func:`gguf_tokenizer` chose.
        flag: The flag that named ``path`` (``"OUT.gguf"``, ``"--gguf"``), for messages.
        modelfile: Whether a Modelfile will be written beside it.
    """
    from ..gguf.families import architecture_for
    from ..gguf.writer import check_destination

    try:
        check_destination(path, overwrite, modelfile)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{flag} {path!r}: {error}") from None
    found = find_pretrained(loaded.model)
    if found is None:
        raise ValueError(f"{flag}: MODEL holds no transformers model, and only those can be written as GGUF")
    architecture_for(found[0])  # an unsupported family fails here, with its reason
    if tokenizer is None:
        raise ValueError(
            f"{flag}: MODEL has no tokenizer; pass --tokenizer (a .gguf file, a tokenizer directory or 'placeholder' "
            "for a timing-only file)"
        )
    return found[0]


def write_gguf(
    model: nn.Module, path: str, dtype: str, tokenizer: Any, overwrite: bool, modelfile: bool = True
) -> GGUFSummary:
    """Writes the GGUF file (see :func:`~wanda_lightning.gguf.save_gguf`), PEFT adapters merged into a copy first."""
    import copy

    from ..gguf import save_gguf

    if any(".base_layer." in name for name, _ in model.named_parameters()):
        from ..export import merge_adapters

        model = merge_adapters(copy.deepcopy(model))
    return save_gguf(model, path, dtype=dtype, tokenizer=tokenizer, overwrite=overwrite, modelfile=modelfile)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    """Writes MODEL as OUT.gguf; returns the exit status.

    Example::

        main(["gguf", "small/", "small.gguf", "--type", "q8_0"])
    """
    loaded = load_model(args.model, module=args.module, dtype=args.dtype)
    tokenizer = gguf_tokenizer(args.model, args.tokenizer, loaded)
    model = check_gguf_arguments(args.out, args.overwrite, loaded, tokenizer, "OUT.gguf", not args.no_modelfile)
    summary = write_gguf(model, args.out, args.type, tokenizer, args.overwrite, modelfile=not args.no_modelfile)
    if args.json:
        print(json.dumps({"model": args.model, **summary.to_dict()}, indent=2))
    else:
        print(summary)
    return 0
