"""Benchmark: the compressed export of SmolLM2-135M pruned with Wanda, against a dense ``save_pretrained``.

For 50 % unstructured and 2:4 (Wanda, calibration from the first 70 % of `pydoc_data.topics`), the pruned model is
exported with `save_pruned` in fp32 and bf16 and read back with `load_pruned`. It prints, per configuration: the
stored bytes of the pruned weights against their dense bytes (numel x dtype size), the whole export against a dense
`save_pretrained` of the same model in the same dtype (tokenizer left out of both), save and load wall times, and
whether the loaded model is bit-exact (fp32: logits and every tensor; bf16: every tensor against the cast model).
Targets from issue 4: pruned weights <= 0.57x, whole export <= 0.70x, save and load < 10 s each. Nothing is
asserted: timings on a shared 2-core machine are noisy, so the load average is printed with them.

    python benchmarks/bench_export.py [--samples 8] [--seqlen 256] [--json benchmarks/results/export.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine, print_table, write_json

from wanda_lightning import prune
from wanda_lightning.data.corpus import split_tokens
from wanda_lightning.data.smollm2 import load_smollm2
from wanda_lightning.export import load_pruned, save_pruned

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("wanda 50%", dict(sparsity=0.5, structure="unstructured")),
    ("wanda 2:4", dict(structure="2:4")),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20


def folder_bytes(folder: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in folder.rglob(f"*{suffix}") if p.is_file())


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="calibration sequences (default 8)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence (default 256)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    splits = split_tokens(tokenizer, num_samples=args.samples, seqlen=args.seqlen)
    batches = [{"input_ids": ids} for ids in splits.calibration.split(8)]
    probe = splits.calibration[:1, :64]
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    print(
        f"SmolLM2-135M, wanda calibration {args.samples} x {args.seqlen} tokens, {torch.get_num_threads()} threads, "
        f"load average {load_average()}"
    )

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        dense: dict[str, dict[str, float]] = {}
        for label, dtype in DTYPES.items():
            reference = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
            start = time.perf_counter()
            reference.save_pretrained(root / f"dense-{label}")
            seconds = time.perf_counter() - start
            dense[label] = {"bytes": folder_bytes(root / f"dense-{label}"), "save_seconds": seconds}
            print(f"dense save_pretrained {label}: {dense[label]['bytes'] / MIB:.1f} MiB in {seconds:.2f} s")
            del reference

        for name, options in CONFIGS:
            model.load_state_dict(dense_state)
            report = prune(model, batches, method="wanda", num_samples=None, **options)
            with torch.no_grad():
                expected = model(input_ids=probe).logits
            for label, dtype in DTYPES.items():
                out = root / f"{name.replace(' ', '-').replace(':', 'of').replace('%', '')}-{label}"
                start = time.perf_counter()
                summary = save_pruned(model, out, dtype=None if dtype == torch.float32 else dtype)
                save_seconds = time.perf_counter() - start
                start = time.perf_counter()
                loaded = load_pruned(out)
                load_seconds = time.perf_counter() - start
                loaded_state = loaded.state_dict()
                exact = all(torch.equal(loaded_state[k], v.to(dtype)) for k, v in model.state_dict().items())
                if dtype == torch.float32:
                    with torch.no_grad():
                        exact = exact and torch.equal(loaded(input_ids=probe).logits, expected)
                export_bytes = folder_bytes(out)
                results.append(
                    dict(
                        config=name,
                        dtype=label,
                        sparsity=report.global_sparsity,
                        pruned_stored_bytes=summary.compressed_stored_bytes,
                        pruned_dense_bytes=summary.compressed_dense_bytes,
                        pruned_ratio=summary.compressed_ratio,
                        export_bytes=export_bytes,
                        dense_save_pretrained_bytes=dense[label]["bytes"],
                        export_ratio=export_bytes / dense[label]["bytes"],
                        save_seconds=save_seconds,
                        load_seconds=load_seconds,
                        dense_save_seconds=dense[label]["save_seconds"],
                        exact=exact,
                        load_average=load_average(),
                    )
                )
                r = results[-1]
                print(
                    f"{name} {label}: pruned {r['pruned_ratio']:.3f}x, export {r['export_ratio']:.3f}x, "
                    f"save {save_seconds:.2f} s, load {load_seconds:.2f} s, exact {exact}",
                    flush=True,
                )
                del loaded, loaded_state

    print()
    rows = [
        [
            f"{r['config']} {r['dtype']}",
            f"{r['pruned_stored_bytes'] / MIB:.1f} / {r['pruned_dense_bytes'] / MIB:.1f} MiB",
            f"{r['pruned_ratio']:.3f}x",
            f"{r['export_bytes'] / MIB:.1f} MiB",
            f"{r['dense_save_pretrained_bytes'] / MIB:.1f} MiB",
            f"{r['export_ratio']:.3f}x",
            f"{r['save_seconds']:.2f}",
            f"{r['load_seconds']:.2f}",
            "yes" if r["exact"] else "NO",
        ]
        for r in results
    ]
    print_table(
        [
            "config",
            "pruned weights stored / dense",
            "pruned ratio",
            "export",
            "dense save_pretrained",
            "export/dense",
            "save s",
            "load s",
            "bit-exact",
        ],
        rows,
    )
    print(
        "\ntargets (issue 4): pruned weights <= 0.57x, whole export <= 0.70x, save and load < 10 s each; "
        f"load average now {load_average()}"
    )
    write_json(args.json, dict(benchmark="bench_export", args=vars(args), machine=machine(), results=results))


if __name__ == "__main__":
    main()
