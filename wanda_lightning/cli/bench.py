"""prune SmolLM2-135M on the pydoc corpus (offline) and print the report with held-out perplexity

Prune the offline SmolLM2-135M-Instruct on CPython's pydoc text and compare perplexities.
"""

from __future__ import annotations

import argparse
import json
import os

from .arguments import add_calibration_arguments, add_pruning_arguments, pruning_choices

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``wanda-lightning bench``."""
    add_pruning_arguments(parser, refine_help="none, DSnoT (dsnot = dsnot-expected) or admm-update")
    add_calibration_arguments(parser, samples=16, seqlen=256, batch_size=8)
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows scored (default 32)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..data.corpus import split_tokens
    from ..data.evaluation import perplexity
    from ..data.smollm2 import load_smollm2
    from ..pruning import prune

    model, tokenizer = load_smollm2()
    splits = split_tokens(tokenizer, num_samples=args.samples, seqlen=args.seqlen, max_eval_windows=args.eval_windows)
    dense = perplexity(model, splits.heldout)
    batches = [{"input_ids": ids} for ids in splits.calibration.split(args.batch_size)]
    report = prune(model, batches, **pruning_choices(args), num_samples=None, progress=not args.json)
    pruned = perplexity(model, splits.heldout)
    if args.json:
        print(
            json.dumps({"dense_perplexity": dense, "pruned_perplexity": pruned, "report": report.to_dict()}, indent=2)
        )
    else:
        print(report)
        print(
            f"\nheld-out perplexity ({splits.heldout.shape[0]} x {splits.heldout.shape[1]} tokens): "
            f"dense {dense:.2f} -> pruned {pruned:.2f}"
        )
    return 0
