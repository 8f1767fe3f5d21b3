"""Arguments the subcommands share: how to read MODEL, which text, which dtype, the calibration sizes and the
pruning choices, how a subcommand's docstring gives its help, and how its numbers are checked."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..core.validation import check_positive
from ..depth.scores import LAYER_SCORES
from ..methods.registry import ALLOCATIONS, REFINEMENTS
from .loading import MODEL_HELP

__all__ = [
    "DTYPES",
    "add_calibration_arguments",
    "add_data_arguments",
    "add_model_arguments",
    "add_pruning_arguments",
    "check_positive_arguments",
    "command_texts",
    "parse_dtype",
    "pruning_choices",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
_MODEL_HELP = (
    "a transformers model directory, a .gguf file, a wanda-lightning export directory, or a Lightning .ckpt "
    "(with --module package.Class)"
)


def parse_dtype(value: str) -> torch.dtype:
    """``--dtype`` values: float32/fp32, bfloat16/bf16, float16/fp16.

    Example::

        >>> parse_dtype("bf16")
        torch.bfloat16
    """
    try:
        return DTYPES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"invalid dtype {value!r}; choose from {', '.join(sorted(set(DTYPES)))}"
        ) from None


def command_texts(docstring: str | None) -> tuple[str, str]:
    """Splits a subcommand module's docstring into its ``help`` and its ``description``, each on one line.

    The first paragraph is the ``help``, the line ``wanda-lightning --help`` shows for the subcommand; the rest is the
    ``description`` that ``wanda-lightning COMMAND --help`` shows. Both are argparse texts, so a literal ``%`` in the
    ``help`` is written ``%%`` (argparse formats it; a ``description`` is shown as written). Without a docstring
    (``python -OO``) both are empty.

    Example::

        >>> command_texts('''say hello
        ...
        ... Says hello to
        ... the world.
        ... ''')
        ('say hello', 'Says hello to the world.')
    """
    help_text, _, description = (docstring or "").strip().partition("\n\n")
    return " ".join(help_text.split()), " ".join(description.split())


def check_positive_arguments(args: argparse.Namespace, *names: str) -> None:
    """Refuses a value of ``args.<name>`` that is not a positive integer, naming its flag (``--batch-size``).

    Example::

        >>> check_positive_arguments(argparse.Namespace(batch_size=0), "batch_size")
        Traceback (most recent call last):
        ...
        ValueError: --batch-size must be a positive integer, got 0
    """
    for name in names:
        check_positive(getattr(args, name), f"--{name.replace('_', '-')}", allow_none=False)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that say how to read MODEL: ``--module``, ``--tokenizer``, ``--dtype``, ``--device``."""
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument(
        "--module",
        default=None,
        metavar="PACKAGE.CLASS",
        help="for a .ckpt: the LightningModule (or nn.Module) class, as package.module.Class or package.module:Class",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="tokenizer directory or .gguf file (default: the model's own; needed for a .ckpt)",
    )
    parser.add_argument(
        "--dtype",
        type=parse_dtype,
        default=None,
        help="dtype to load the model in: float32, bfloat16 or float16 (default: as stored; float32 for GGUF)",
    )
    parser.add_argument("--device", default=None, help="compute device such as cpu or cuda:0 (default: cpu)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` and ``--split``."""
    parser.add_argument(
        "--data",
        default="pydoc",
        help="'pydoc' (built-in offline corpus, default), a UTF-8 text file, or a datasets dataset saved with "
        "save_to_disk that has a 'text' column",
    )
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict (default: see each command)")


def add_depth_arguments(parser: argparse.ArgumentParser, *, layers: float, layer_score: str) -> None:
    """``--layers`` and ``--layer-score``, with the command's defaults."""
    parser.add_argument(
        "--layers", type=float, default=layers, help=f"fraction of decoder blocks removed (default {layers:g})"
    )
    parser.add_argument(
        "--layer-score",
        default=layer_score,
        choices=list(LAYER_SCORES),
        help="how blocks are ranked: influence (1 - cosine of a block's input and output) or angular (the closest run "
        f"of consecutive blocks; default {layer_score})",
    )


def add_pruning_arguments(parser: argparse.ArgumentParser, *, refine_help: str) -> None:
    """``--sparsity``, ``--structure``, ``--method``, ``--allocation`` and ``--refine``, with the registered names."""
    parser.add_argument("--sparsity", type=float, default=None, help="fraction zeroed per row (default 0.5)")
    parser.add_argument("--structure", default="unstructured", help="'unstructured' (default) or N:M such as 2:4")
    parser.add_argument(
        "--method",
        default="wanda",
        help="'wanda' (default), 'magnitude', 'sparsegpt', 'admm', 'ria', 'ria-permuted' (N:M) or another registered "
        "one",
    )
    parser.add_argument(
        "--allocation", default="uniform", choices=list(ALLOCATIONS), help="layer-wise sparsity: uniform or OWL"
    )
    parser.add_argument("--refine", default="none", choices=[*REFINEMENTS, "reconstruct"], help=refine_help)


def pruning_choices(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments of :func:`add_pruning_arguments` as keywords of :func:`~wanda_lightning.prune`.

    Example::

        >>> choices = dict(sparsity=None, structure="2:4", method="wanda", allocation="uniform", refine="none")
        >>> pruning_choices(argparse.Namespace(**choices))["structure"]
        '2:4'
    """
    return {name: getattr(args, name) for name in ("sparsity", "structure", "method", "allocation", "refine")}


def add_calibration_arguments(parser: argparse.ArgumentParser, *, samples: int, seqlen: int, batch_size: int) -> None:
    """``--samples``, ``--seqlen`` and ``--batch-size`` of the calibration windows, with these defaults."""
    for flag, default, what in (
        ("--samples", samples, "calibration sequences"),
        ("--seqlen", seqlen, "tokens per calibration sequence"),
        ("--batch-size", batch_size, "sequences per forward pass"),
    ):
        parser.add_argument(flag, type=int, default=default, help=f"{what} (default {default})")
