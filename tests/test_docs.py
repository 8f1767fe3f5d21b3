"""The documentation: the site builds with ``mkdocs build --strict``, every exported name has an API entry, the
benchmark pages match their JSON, and the README's code runs as written.

The site build is the CI check of the docs: a broken link, a cross-reference that does not resolve (the docstrings'
Sphinx roles become links, see ``scripts/griffe_sphinx_roles.py``) or a docstring griffe cannot parse is a warning, and
``--strict`` makes every warning an error.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import runpy
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from helpers.models import tiny_smollm2

import wanda_lightning

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SNIPPETS = ROOT / "docs" / "snippets"
MAX_DOCSTRING_LINES = 60


# ------------------------------------------------------------------------------------------------------ the site build


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once for this module's tests with ``mkdocs build --strict``."""
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"the docs build needs {module}: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    # Not --quiet: mkdocs does not count the warnings it does not print, and --strict would pass them.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    problems = [line for line in result.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems or [result.stderr[-4000:]])
    return out


def _inventory(site: Path) -> set[str]:
    """The object names in the site's ``objects.inv`` (Sphinx inventory v2: four header lines, then zlib)."""
    raw = (site / "objects.inv").read_bytes()
    lines = raw.split(b"\n", 4)
    assert lines[0].startswith(b"# Sphinx inventory version 2"), lines[0]
    body = zlib.decompress(lines[4]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines() if line}


def test_site_builds_strict(site: Path) -> None:
    for page in ("index.html", "getting-started/index.html", "how-it-works/index.html", "guides/triggers/index.html"):
        assert (site / page).is_file(), page


def test_every_exported_name_has_an_api_entry(site: Path) -> None:
    documented = _inventory(site)
    missing = [
        name
        for name in wanda_lightning.__all__
        if name != "__version__" and f"wanda_lightning.{name}" not in documented
    ]
    assert not missing, f"no API reference entry (docs/reference/*.md, `::: wanda_lightning.NAME`) for: {missing}"


def test_sphinx_roles_render_as_links(site: Path) -> None:
    page = (site / "reference" / "callbacks" / "index.html").read_text()
    assert ":class:`" not in page and ":func:`" not in page and ":meth:`" not in page
    # The WandaPruningCallback docstring links to the Distillation entry it names.
    assert re.search(r'<a [^>]*href="[^"]*#wanda_lightning\.Distillation"', page)


def test_search_index_finds_the_callback(site: Path) -> None:
    index = (site / "search" / "search_index.json").read_text()
    assert "WandaPruningCallback" in index


# ------------------------------------------------------------------------------------------------- generated content


def test_benchmark_pages_and_readme_table_match_the_results() -> None:
    spec = importlib.util.spec_from_file_location("gen_benchmarks", ROOT / "scripts" / "gen_benchmarks.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generator  # its dataclasses look their module up there
    spec.loader.exec_module(generator)
    files, plots = generator.generate()
    assert README in files, "README.md lost the markers of its generated results table"
    stale = [
        str(path.relative_to(ROOT)) for path, text in files.items() if not path.exists() or path.read_text() != text
    ]
    stale += [plot.name for plot in plots if not (generator.IMAGES / f"{plot.name}.png").exists()]
    assert not stale, f"run `python scripts/gen_benchmarks.py`; out of date: {stale}"


def test_no_docstring_is_longer_than_60_lines() -> None:
    """Docstrings state the contract; internals go to docs/how-it-works.md or to comments beside the code."""
    long = []
    for path in sorted((ROOT / "wanda_lightning").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc is not None and len(doc.splitlines()) > MAX_DOCSTRING_LINES:
                    name = getattr(node, "name", "<module>")
                    long.append(f"{path.relative_to(ROOT)}:{name} ({len(doc.splitlines())} lines)")
    assert not long, f"docstrings over {MAX_DOCSTRING_LINES} lines: {long}"


# ------------------------------------------------------------------------------------------------------------ README


def _readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 250


def test_readme_python_is_the_tested_snippets() -> None:
    """Every Python block of the README is a file of docs/snippets/, verbatim, which the tests below run."""
    snippets = {path.read_text(): path.name for path in SNIPPETS.glob("*.py")}
    blocks = _readme_blocks("python")
    assert len(blocks) == 3
    for block in blocks:
        assert block in snippets, f"a README block is not a docs/snippets file verbatim:\n{block}"


def test_readme_quick_start_is_what_ci_runs() -> None:
    """The README's test command is the one ``.ci/run`` runs, and the demo command is there."""
    commands = [c.strip() for c in _readme_blocks("bash")]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == ["bash scripts/test.sh"]
    assert "bash scripts/test.sh" in commands
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert "pip install -q torch==2.13.0" in script and "python -m pytest -q" in script
    assert any("wanda-lightning demo --out demo-output" in c for c in commands)


def test_readme_links_resolve() -> None:
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", README.read_text()):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


@pytest.mark.parametrize("name", ["prune_smollm2", "trainer_prune", "trainer_shrink"])
def test_readme_snippet_runs(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, single_thread: None
) -> None:
    """Each README example runs as written, with a tiny random model in place of the bundled SmolLM2 (the real one
    runs in the examples' and the slow tests)."""
    import wanda_lightning.data.smollm2 as smollm2

    monkeypatch.setattr(smollm2, "load_smollm2", tiny_smollm2)
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(SNIPPETS / f"{name}.py"), run_name="__main__")
    printed = capsys.readouterr().out
    if name == "prune_smollm2":
        assert "pruned perplexity" in printed
        assert namespace["report"].global_sparsity == pytest.approx(0.5, abs=0.01)
    elif name == "trainer_prune":
        assert set(namespace["pruning"].metrics["val_ppl"]) == {"dense", "pruned", "delta"}
        assert namespace["pruning"].global_sparsity == pytest.approx(0.5, abs=0.01)
    else:
        assert namespace["model"].config.num_hidden_layers == 4  # 0.2 of 5 blocks removed
        assert (tmp_path / "smollm2-shrunk" / "config.json").is_file()
