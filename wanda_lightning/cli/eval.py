"""held-out perplexity of a dense, pruned or exported model

Score MODEL's perplexity on non-overlapping windows of held-out text: the last 30 % of the built-in pydoc corpus (never
used for calibration), or a whole text file or dataset.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.validation import as_device, check_positive
from .arguments import add_data_arguments, add_model_arguments, check_positive_arguments
from .loading import LoadedModel, load_model, load_text, quiet_transformers, text_windows, tokenize

__all__ = ["add_arguments", "evaluation_windows", "run"]


class _Positional(nn.Module):
    """Calls a module as ``module(ids)`` where :func:`~wanda_lightning.data.evaluation.perplexity` passes
    ``input_ids=``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, input_ids: Tensor) -> Any:
        return self.module(input_ids)


def evaluation_windows(
    loaded: LoadedModel, data: str, split: str | None, seqlen: int, max_windows: int | None
) -> Tensor:
    """``(windows, seqlen)`` held-out tokens: the last 30 % of pydoc (as in calibration), or a whole text.

    For ``pydoc`` the split is the one :func:`~wanda_lightning.data.corpus.split_tokens` makes, so that text never used
    for calibration is scored. A text file or dataset is used whole (default split: ``test``, then ``validation``, then
    ``train``).
    """
    if data == "pydoc":
        from ..data.corpus import split_tokens

        if loaded.tokenizer is None:
            tokenize(None, "")
        with quiet_transformers():
            try:
                windows = split_tokens(loaded.tokenizer, num_samples=1, seqlen=seqlen).heldout
            except ValueError as error:
                raise ValueError(f"--data 'pydoc' with --seqlen {seqlen}: {error}") from None
    else:
        ids = tokenize(loaded.tokenizer, load_text(data, split, prefer=("test", "validation", "train")))
        windows = text_windows(ids, seqlen, None, data)
    return windows if max_windows is None else windows[:max_windows]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``wanda-lightning eval``."""
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--max-windows", type=int, default=None, help="score at most this many windows (default all)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Prints MODEL's held-out perplexity; returns the exit status.

    Example::

        main(["eval", "pruned/", "--seqlen", "256", "--max-windows", "32"])
    """
    from ..data.evaluation import perplexity

    as_device(args.device, "--device", must_exist=True)
    check_positive_arguments(args, "seqlen", "batch_size")
    check_positive(args.max_windows, "--max-windows")
    loaded = load_model(args.model, module=args.module, tokenizer=args.tokenizer, dtype=args.dtype)
    windows = evaluation_windows(loaded, args.data, args.split, args.seqlen, args.max_windows)
    model = loaded.model if loaded.takes_keywords else _Positional(loaded.model)
    if args.device is not None:
        model.to(args.device)
    # Chunks of `batch_size` windows: the mean NLL of all tokens is the token-weighted mean of the chunks' mean NLLs.
    total_nll, total_tokens = 0.0, 0
    for chunk in tqdm(windows.split(args.batch_size), desc="scoring", unit="batch", disable=args.json, leave=False):
        tokens = chunk.shape[0] * (chunk.shape[1] - 1)
        total_nll += math.log(perplexity(model, chunk, batch_size=chunk.shape[0])) * tokens
        total_tokens += tokens
    if total_tokens == 0:
        raise ValueError(f"--seqlen {args.seqlen} leaves no token to predict; use --seqlen 2 or more")
    result = {
        "model": args.model,
        "kind": loaded.kind,
        "data": args.data,
        "perplexity": math.exp(total_nll / total_tokens),
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "tokens_scored": total_tokens,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{args.model} ({loaded.kind}): perplexity {result['perplexity']:.3f} over {result['windows']} windows of "
            f"{result['seqlen']} tokens from {args.data}"
        )
    return 0
