"""Benchmark: pruning a model that is never fully in memory (meta device + safetensors, block by block) against
loading it whole, on SmolLM2-135M (fp32, offline).

The model is first written as a Hugging Face folder (safetensors). Then two fresh processes prune it with Wanda at
50 % on the same 16 x 256 calibration windows: one loads the whole model (`from_pretrained`), the other builds it on
the meta device (`accelerate.init_empty_weights`) and calls `prune(checkpoint=folder, on_block_pruned=BlockSaver)`,
which reads each decoder block just before calibrating it, writes it out once pruned and releases it. Printed: peak
RSS above the process's baseline (after imports and calibration data), prune time, and whether the two pruned models
are bit-identical.

    python benchmarks/bench_streaming.py [--json benchmarks/results/streaming.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine, print_table, read_rss_mib, reset_peak_rss, write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _calibration(folder: Path, samples: int, seqlen: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    from wanda_lightning.data.corpus import split_tokens

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = split_tokens(tokenizer, num_samples=samples, seqlen=seqlen, max_eval_windows=1).calibration
    return [{"input_ids": chunk} for chunk in ids.split(batch_size)]


def _digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def worker(mode: str, folder: Path, out: Path, samples: int, seqlen: int, batch_size: int) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from wanda_lightning import prune

    batches = _calibration(folder, samples, seqlen, batch_size)
    baseline = read_rss_mib("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    if mode == "in-memory":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        report = prune(model, batches, sparsity=0.5, num_samples=None)
        state = {k: v for k, v in model.state_dict().items() if "layers" in k}
    else:
        from accelerate import init_empty_weights

        from wanda_lightning.distributed.streaming import BlockSaver

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
        saver = BlockSaver(out, model)
        report = prune(model, batches, sparsity=0.5, num_samples=None, checkpoint=folder, on_block_pruned=saver)
        saver.finish()
        from safetensors.torch import load_file

        state = {}
        for file in sorted(out.glob("model-model-layers-*.safetensors")):
            state.update(load_file(file))
    seconds = time.perf_counter() - start
    peak = read_rss_mib("VmHWM") - baseline
    return dict(mode=mode, seconds=seconds, peak_rss_mib=peak, sparsity=report.global_sparsity, digest=_digest(state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, folder, out = args.worker
        result = worker(mode, Path(folder), Path(out), args.samples, args.seqlen, args.batch_size)
        print("RESULT " + json.dumps(result))
        return

    from wanda_lightning.data.smollm2 import load_smollm2

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2"
        model, tokenizer = load_smollm2()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        block_mib = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()) / 2**20
        model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        del model
        results = []
        for mode in ("in-memory", "streamed"):
            command = [sys.executable, __file__, "--worker", mode, str(folder), str(Path(tmp) / "pruned")]
            command += [
                "--samples",
                str(args.samples),
                "--seqlen",
                str(args.seqlen),
                "--batch-size",
                str(args.batch_size),
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(output.split("RESULT ", 1)[1]))
    same = results[0]["digest"] == results[1]["digest"]
    print_table(
        ["run", "prune s", "peak RSS +MiB", "sparsity"],
        [[r["mode"], f"{r['seconds']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['sparsity']:.4f}"] for r in results],
    )
    print(
        f"\nmodel: {model_mib:.0f} MiB of parameters, {block_mib:.1f} MiB per decoder block; pruned blocks "
        f"bit-identical: {same}"
    )
    write_json(
        args.json,
        dict(
            benchmark="bench_streaming",
            args=vars(args),
            machine=machine(),
            identical=same,
            model_mib=model_mib,
            block_mib=block_mib,
            results=results,
        ),
    )


if __name__ == "__main__":
    main()
