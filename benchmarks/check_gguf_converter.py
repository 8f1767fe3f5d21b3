"""Check: ``save_gguf`` against llama.cpp's own converter, ``convert_hf_to_gguf.py``.

Each model is saved as a plain transformers folder (``save_plain_pretrained``, with SmolLM2's tokenizer) and converted
twice, by llama.cpp's converter (run in a subprocess with this Python) and by ``save_gguf`` from the same folder's
model; then the two files are compared:

- tensors: the same names, shapes and ggml types, and the same bytes (at f32 and q8_0 both quantize with the ``gguf``
  package, so equal inputs give equal bytes); the largest value difference is reported too;
- architecture metadata: every ``{arch}.*`` key, ``general.architecture`` and ``general.file_type``;
- tokenizer keys, reported (the converter hard-codes ``add_bos_token=False`` for 49152-token vocabularies).

Models (``--models``): ``tiny`` (a random 2-block Llama with SmolLM2's vocabulary), ``tiny-flap`` (it shrunk with
``method="flap"``: MLP, heads and blocks, with bias compensation), ``smollm2`` (SmolLM2-135M-Instruct) and
``smollm2-shrunk`` (``shrink(mlp=0.5, heads=1/3, layers=0.2)`` on 8 x 256 pydoc tokens).

The converter needs ``sentencepiece`` importable (it imports it before trying a ``tokenizer.json``); llama-cpp-python's
source distribution ships it under ``vendor/llama.cpp/``.

    LLAMA_CPP_CONVERTER=/path/to/convert_hf_to_gguf.py python benchmarks/check_gguf_converter.py \
        [--models tiny tiny-flap smollm2 smollm2-shrunk] [--types f32 q8_0] \
        [--json benchmarks/results/gguf_converter.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import machine, print_table, write_json

from wanda_lightning import save_plain_pretrained, shrink
from wanda_lightning.data.smollm2 import GGUF_FILE, load_smollm2, smollm2_path
from wanda_lightning.gguf import save_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("tiny", "tiny-flap", "smollm2", "smollm2-shrunk")
DEFAULT_CONVERTER = "/tmp/lcp/src/vendor/llama.cpp/convert_hf_to_gguf.py"


def run_converter(converter: Path, folder: Path, out: Path, outtype: str) -> float:
    """Runs llama.cpp's converter on ``folder``; returns its wall time in seconds."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(converter), str(folder), "--outfile", str(out), "--outtype", outtype],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{converter.name} failed on {folder}:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def _value(field: Any) -> Any:
    try:
        value = field.contents()
    except (UnicodeDecodeError, ValueError):
        value = [bytes(field.parts[i]) for i in field.data]
    return value


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    """Tensors and metadata of two GGUF files, compared."""
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    arch = a.fields["general.architecture"].contents()
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    shapes = all(ta[n].shape.tolist() == tb[n].shape.tolist() for n in ta.keys() & tb.keys())
    types = all(ta[n].tensor_type == tb[n].tensor_type for n in ta.keys() & tb.keys())
    identical, largest = True, 0.0
    for name in ta.keys() & tb.keys():
        x, y = np.asarray(ta[name].data), np.asarray(tb[name].data)
        if x.shape != y.shape or not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
            identical = False
        dx = gguf.quants.dequantize(x, ta[name].tensor_type)
        dy = gguf.quants.dequantize(y, tb[name].tensor_type)
        if dx.shape == dy.shape:
            largest = max(largest, float(np.abs(dx.astype(np.float64) - dy).max(initial=0.0)))
    keys = {"general.architecture", "general.file_type"}
    arch_keys = {k for k in (a.fields.keys() | b.fields.keys()) if k.startswith(f"{arch}.") or k in keys}
    metadata = sorted(
        k for k in arch_keys if k not in a.fields or k not in b.fields or _value(a.fields[k]) != _value(b.fields[k])
    )
    token_keys = {k for k in (a.fields.keys() | b.fields.keys()) if k.startswith("tokenizer.")}
    tokenizer = sorted(
        k for k in token_keys if k not in a.fields or k not in b.fields or _value(a.fields[k]) != _value(b.fields[k])
    )
    return {
        "architecture": arch,
        "tensors": [len(ta), len(tb)],
        "same_names": set(ta) == set(tb),
        "same_shapes": shapes,
        "same_types": types,
        "identical_bytes": identical,
        "max_abs_difference": largest,
        "architecture_keys": len(arch_keys),
        "architecture_keys_differing": metadata,
        "tokenizer_keys_differing": tokenizer,
    }


def build(name: str) -> tuple[Any, Any]:
    """The model ``name`` and SmolLM2's tokenizer."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=GGUF_FILE)
    if name.startswith("tiny"):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = transformers.LlamaForCausalLM(config).eval()
        if name == "tiny-flap":
            generator = torch.Generator().manual_seed(1)
            batches = [{"input_ids": torch.randint(0, 49152, (4, 32), generator=generator)}]
            shrink(model, batches, mlp=0.5, heads=0.5, layers=0.5, method="flap", progress=False)
        return model, tokenizer
    model, tokenizer = load_smollm2()
    if name == "smollm2-shrunk":
        from wanda_lightning.data.corpus import split_tokens

        windows = split_tokens(tokenizer, num_samples=8, seqlen=256).calibration
        shrink(model, [{"input_ids": w} for w in windows.split(4)], mlp=0.5, heads=1 / 3, layers=0.2, progress=False)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--converter", default=os.environ.get("LLAMA_CPP_CONVERTER", DEFAULT_CONVERTER))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--types", nargs="+", default=["f32", "q8_0"], choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--json", default="benchmarks/results/gguf_converter.json")
    args = parser.parse_args()
    converter = Path(args.converter)
    if not converter.is_file():
        raise SystemExit(f"no converter at {converter}: set LLAMA_CPP_CONVERTER or --converter")
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="gguf-converter-") as work:
        for name in args.models:
            model, tokenizer = build(name)
            folder = Path(work) / name
            save_plain_pretrained(model, folder, tokenizer)
            import transformers

            reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            for outtype in args.types:
                theirs, ours = Path(work) / f"{name}.{outtype}.theirs.gguf", Path(work) / f"{name}.{outtype}.ours.gguf"
                seconds_theirs = run_converter(converter, folder, theirs, outtype)
                start = time.perf_counter()
                save_gguf(reloaded, ours, dtype=outtype, tokenizer=folder, modelfile=False)  # type: ignore[arg-type]
                seconds_ours = time.perf_counter() - start
                result = {
                    "model": name,
                    "type": outtype,
                    "config": {
                        k: getattr(reloaded.config, k)
                        for k in (
                            "num_hidden_layers",
                            "intermediate_size",
                            "num_attention_heads",
                            "num_key_value_heads",
                        )
                    },
                    **compare(ours, theirs),
                    "seconds_converter": round(seconds_theirs, 2),
                    "seconds_save_gguf": round(seconds_ours, 2),
                }
                results.append(result)
                rows.append(
                    [
                        name,
                        outtype,
                        f"{result['tensors'][0]}/{result['tensors'][1]}",
                        "yes" if result["same_names"] and result["same_shapes"] and result["same_types"] else "NO",
                        "yes" if result["identical_bytes"] else f"no ({result['max_abs_difference']:.2g})",
                        "equal"
                        if not result["architecture_keys_differing"]
                        else ", ".join(result["architecture_keys_differing"]),
                        ", ".join(k.removeprefix("tokenizer.ggml.") for k in result["tokenizer_keys_differing"]) or "-",
                    ]
                )
    print_table(
        ["model", "type", "tensors", "names/shapes/types", "same bytes", "arch metadata", "tokenizer keys"], rows
    )
    write_json(args.json, {"machine": machine(), "converter": str(converter), "results": results})


if __name__ == "__main__":
    main()
