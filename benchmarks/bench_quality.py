"""Benchmark: which pruning method / allocation / refinement wins where, on SmolLM2-135M (offline).

Calibration: 16 x 256 tokens from the first 70 % of `pydoc_data.topics`; held-out perplexity on non-overlapping
256-token windows of the last 30 %. Every setting (50 %, 60 %, 70 % unstructured and 2:4) runs every combination on the
same calibration batches and prints perplexity, wall time of `prune()` (and its multiple of plain Wanda's time in the
same setting, measured side by side) and peak RSS during `prune()`.

With `--sparsegpt-reference DIR` (a checkout of github.com/IST-DASLab/sparsegpt, not shipped here) the reference
`SparseGPT` solver runs through the same calibration pipeline as a side-by-side row; with `--admm-reference DIR` (a
checkout of github.com/fmfi-compbio/admm-pruning) so does the reference `AdmmPruner` (its `prune_admm` settings:
`percdamp=0.1`, 20 iterations, mask ramp over 15, ranked over the whole layer; its N:M branch is 2:4 only).

    python benchmarks/bench_quality.py [--eval-windows N] [--json benchmarks/results/quality.json]

`--calibration-offset K` calibrates on windows 16K to 16K + 15 of the first 70 % instead (another draw; the same
held-out set), to see how much a ranking depends on which calibration text was drawn.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import time
from typing import Any

import torch
from _common import machine, print_table, read_rss_mib, reset_peak_rss, write_json
from torch import Tensor, nn

from wanda_lightning import ADMM, PruningMethod, prune
from wanda_lightning.core.statistics import LayerStatistics
from wanda_lightning.core.structure import SparsityStructure
from wanda_lightning.data.corpus import split_tokens
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.data.smollm2 import load_smollm2

os.environ.setdefault("HF_HUB_OFFLINE", "1")

UNSTRUCTURED = [
    ("wanda", {}),
    ("sparsegpt", dict(method="sparsegpt")),
    ("admm", dict(method="admm")),
    ("admm(12 iterations)", dict(method=ADMM(iterations=12, ramp_iterations=8))),
    ("admm(16 iterations)", dict(method=ADMM(iterations=16, ramp_iterations=12))),
    ("admm(20 iterations)", dict(method=ADMM(iterations=20, ramp_iterations=15))),
    ("admm(paper schedule)", dict(method=ADMM(iterations=20, ramp_iterations=15, rho=1.0, relaxation=1.0))),
    ("wanda+admm-update", dict(refine="admm-update")),
    ("ria", dict(method="ria")),
    ("wanda+owl", dict(allocation="owl")),
    ("wanda+dsnot", dict(refine="dsnot")),
    ("wanda+dsnot(exact)", dict(refine="dsnot-exact")),
    ("wanda+dsnot(unguarded)", dict(refine="dsnot-unguarded")),
    ("wanda+owl+dsnot", dict(allocation="owl", refine="dsnot")),
    ("ria+owl", dict(method="ria", allocation="owl")),
    ("ria+dsnot", dict(method="ria", refine="dsnot")),
    ("ria+owl+dsnot", dict(method="ria", allocation="owl", refine="dsnot")),
]
N_M = [
    ("wanda", {}),
    ("sparsegpt", dict(method="sparsegpt")),
    ("admm", dict(method="admm")),
    ("admm(12 iterations)", dict(method=ADMM(iterations=12, ramp_iterations=8))),
    ("admm(16 iterations)", dict(method=ADMM(iterations=16, ramp_iterations=12))),
    ("admm(20 iterations)", dict(method=ADMM(iterations=20, ramp_iterations=15))),
    ("admm(paper schedule)", dict(method=ADMM(iterations=20, ramp_iterations=15, rho=1.0, relaxation=1.0))),
    ("wanda+admm-update", dict(refine="admm-update")),
    ("ria", dict(method="ria")),
    ("wanda+dsnot", dict(refine="dsnot")),
    ("wanda+dsnot(exact)", dict(refine="dsnot-exact")),
    ("wanda+dsnot(unguarded)", dict(refine="dsnot-unguarded")),
    ("ria+dsnot", dict(method="ria", refine="dsnot")),
    ("ria-permuted", dict(method="ria-permuted")),
    ("ria-permuted+dsnot", dict(method="ria-permuted", refine="dsnot")),
]


def _import_reference(checkout: str, relative: str, name: str) -> Any:
    sys.path.insert(0, checkout)
    spec = importlib.util.spec_from_file_location(name, os.path.join(checkout, relative))
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no {relative} in {checkout}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ReferenceStatistics(LayerStatistics):
    """Input statistics kept by a reference solver object (its own Gram/Hessian accumulation), for one layer."""

    def __init__(self, solver: Any, in_features: int, gram: str, per_sequence: bool) -> None:
        self.solver, self._in, self._gram, self._per_sequence = solver, in_features, gram, per_sequence
        self.tokens = 0

    @property
    def in_features(self) -> int:
        return self._in

    def summarize(self, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, ...]:
        return (tokens,)

    def accumulate(self, summary: tuple[Tensor, ...], num_sequences: int) -> None:
        (tokens,) = summary
        self.solver.add_batch(tokens.reshape(num_sequences, -1, self._in) if self._per_sequence else tokens, None)
        self.tokens += tokens.shape[0]

    def state_tensors(self) -> list[Tensor]:
        return [getattr(self.solver, self._gram)]

    @property
    def num_tokens(self) -> int:
        return self.tokens


def reference_admm_method(checkout: str) -> PruningMethod:
    """Wraps the reference repository's `AdmmPruner` (`lib/admm.py` in `checkout`) as a pruning method, called as its
    `prune_admm` calls it."""
    module = _import_reference(checkout, os.path.join("lib", "admm.py"), "reference_admm")

    class ReferenceADMM(PruningMethod):
        name = "admm (reference)"

        def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics:
            solver = module.AdmmPruner(nn.Linear(in_features, 1, bias=False, device=device))
            return ReferenceStatistics(solver, in_features, "XX", per_sequence=False)

        def score(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
            raise NotImplementedError

        def prune_layer(
            self, weight: Tensor, statistics: LayerStatistics | None, structure: SparsityStructure, sparsity: float
        ) -> Tensor:
            assert isinstance(statistics, ReferenceStatistics)
            if structure.is_n_m and (structure.n, structure.m) != (2, 4):
                raise ValueError("the reference ADMM code prunes 2:4 only")
            solver = statistics.solver
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            layer.weight.data = weight.clone()
            solver.layer, solver.rows = layer, weight.shape[0]
            prune_n, prune_m = (structure.n, structure.m) if structure.is_n_m else (0, 0)
            with contextlib.redirect_stdout(io.StringIO()):  # it prints norms and sparsity per layer
                solver.fasterprune(sparsity, prune_n=prune_n, prune_m=prune_m, percdamp=0.1)
            weight.copy_(layer.weight.data)
            solver.free()
            return weight != 0

    return ReferenceADMM()


def reference_sparsegpt_method(checkout: str) -> PruningMethod:
    """Wraps the reference repository's `SparseGPT` class (imported from `checkout`) as a pruning method."""
    module = _import_reference(checkout, "sparsegpt.py", "reference_sparsegpt")

    class ReferenceSparseGPT(PruningMethod):
        name = "sparsegpt (reference)"

        def new_statistics(self, in_features: int, device: torch.device) -> LayerStatistics:
            solver = module.SparseGPT(nn.Linear(in_features, 1, bias=False, device=device))
            return ReferenceStatistics(solver, in_features, "H", per_sequence=True)

        def score(self, weight: Tensor, statistics: LayerStatistics | None) -> Tensor:
            raise NotImplementedError

        def prune_layer(
            self, weight: Tensor, statistics: LayerStatistics | None, structure: SparsityStructure, sparsity: float
        ) -> Tensor:
            assert isinstance(statistics, ReferenceStatistics)
            solver = statistics.solver
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            layer.weight.data = weight.clone()
            solver.layer, solver.rows = layer, weight.shape[0]
            synchronize = torch.cuda.synchronize
            torch.cuda.synchronize = lambda *a, **k: None  # the reference calls it unconditionally
            try:
                pruned = (structure.m - structure.n) if structure.is_n_m else 0
                with contextlib.redirect_stdout(io.StringIO()):  # it prints time and error per layer
                    solver.fasterprune(sparsity, prunen=pruned, prunem=structure.m or 0, percdamp=0.01, blocksize=128)
            finally:
                torch.cuda.synchronize = synchronize
            weight.copy_(layer.weight.data)
            solver.free()
            return weight != 0

    return ReferenceSparseGPT()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="*", default=["0.5", "0.6", "0.7", "2:4"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument(
        "--calibration-offset",
        type=int,
        default=0,
        help="use calibration windows offset*samples .. (offset+1)*samples-1 of the first 70 %% (another draw)",
    )
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=None, help="cap on held-out windows (default: all)")
    parser.add_argument("--only", nargs="*", default=None, help="combination names to run (wanda always runs)")
    parser.add_argument("--sparsegpt-reference", default=None, help="checkout of IST-DASLab/sparsegpt to compare")
    parser.add_argument("--admm-reference", default=None, help="checkout of fmfi-compbio/admm-pruning to compare")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    splits = split_tokens(
        tokenizer,
        num_samples=args.samples * (args.calibration_offset + 1),
        seqlen=args.seqlen,
        max_eval_windows=args.eval_windows,
    )
    calibration = splits.calibration[args.calibration_offset * args.samples :]
    batches = [{"input_ids": ids} for ids in calibration.split(args.batch_size)]
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = reference_sparsegpt_method(args.sparsegpt_reference) if args.sparsegpt_reference else None
    admm_reference = reference_admm_method(args.admm_reference) if args.admm_reference else None
    dense_ppl = perplexity(model, splits.heldout)
    print(
        f"SmolLM2-135M fp32, {args.samples} x {args.seqlen} calibration (offset {args.calibration_offset}), "
        f"{splits.heldout.shape[0]} held-out windows "
        f"of {args.seqlen}; dense perplexity {dense_ppl:.2f}",
        flush=True,
    )

    results: list[dict[str, Any]] = []
    for setting in args.settings:
        structured = ":" in setting
        options: dict[str, Any] = dict(structure=setting) if structured else dict(sparsity=float(setting))
        combos = list(N_M if structured else UNSTRUCTURED)
        if reference is not None:
            combos.insert(2, ("sparsegpt-reference", dict(method=reference)))
        if admm_reference is not None:
            combos.insert(
                combos.index(("admm", dict(method="admm"))) + 1, ("admm-reference", dict(method=admm_reference))
            )
        wanda_seconds = wanda_ppl = None
        for name, extra in combos:
            if args.only and name != "wanda" and name not in args.only:
                continue
            model.load_state_dict(dense_state)
            baseline = read_rss_mib("VmRSS")
            reset_peak_rss()
            start = time.perf_counter()
            report = prune(model, batches, num_samples=None, **options, **extra)
            seconds = time.perf_counter() - start
            peak = max(read_rss_mib("VmHWM") - baseline, 0.0)
            ppl = perplexity(model, splits.heldout)
            if name == "wanda":
                wanda_seconds, wanda_ppl = seconds, ppl
            assert wanda_seconds is not None and wanda_ppl is not None
            row = dict(
                setting=setting if structured else f"{float(setting):.0%}",
                combination=name,
                perplexity=ppl,
                vs_wanda=(ppl - wanda_ppl) / wanda_ppl,
                seconds=seconds,
                time_vs_wanda=seconds / wanda_seconds,
                peak_rss_mib=peak,
                sparsity=report.global_sparsity,
                block_sparsity=report.block_sparsity,
                phases=dict(
                    calibration=report.calibration_seconds,
                    scoring=report.scoring_seconds,
                    allocation=report.allocation_seconds,
                    refinement=report.refine_seconds,
                ),
            )
            results.append(row)
            print(
                f"{row['setting']:>4} {name:<24} ppl {ppl:8.2f} ({row['vs_wanda']:+.1%} vs wanda)  "
                f"{seconds:6.1f} s ({row['time_vs_wanda']:.2f}x wanda)  peak +{peak:.0f} MiB",
                flush=True,
            )

    print()
    print_table(
        ["setting", "combination", "held-out ppl", "vs wanda", "prune s", "x wanda time", "peak +MiB"],
        [
            [
                r["setting"],
                r["combination"],
                f"{r['perplexity']:.2f}",
                f"{r['vs_wanda']:+.1%}",
                f"{r['seconds']:.1f}",
                f"{r['time_vs_wanda']:.2f}",
                f"{r['peak_rss_mib']:.0f}",
            ]
            for r in results
        ],
    )
    write_json(
        args.json,
        dict(
            benchmark="bench_quality", args=vars(args), machine=machine(), dense_perplexity=dense_ppl, results=results
        ),
    )


if __name__ == "__main__":
    main()
