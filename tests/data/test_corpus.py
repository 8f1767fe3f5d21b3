"""The offline corpora: the standard library's docstrings read without importing anything, held-out text left out."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from wanda_lightning.data import corpus
from wanda_lightning.data.corpus import docstring_text

LONG = "A docstring long enough to be kept, " * 6


def _write(root: Path, relative: str, source: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding="utf-8")


def test_docstrings_of_modules_classes_and_functions_in_file_order_without_skipped_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(
        tmp_path,
        "a.py",
        f'"""module {LONG}"""\nclass C:\n    """class {LONG}"""\n    def f(self):\n        """short"""\n',
    )
    _write(tmp_path, "b/c.py", f'async def g():\n    """coroutine {LONG}"""\n')
    _write(tmp_path, "b/broken.py", f'def h(:\n    """never {LONG}"""\n')  # unparsable: left out, no error
    _write(tmp_path, "pydoc_data/topics.py", f'"""held out {LONG}"""\n')
    _write(tmp_path, "test/test_a.py", f'"""a test {LONG}"""\n')
    _write(tmp_path, "site-packages/pkg/m.py", f'"""third party {LONG}"""\n')
    _write(tmp_path, "notes.txt", f'"""not python {LONG}"""\n')
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})

    assert docstring_text() == "\n\n".join([f"module {LONG}", f"class {LONG}", f"coroutine {LONG}"])
    assert docstring_text(min_chars=1).split("\n\n")[2] == "short"


def test_the_real_standard_library_gives_distinct_text_from_pydoc() -> None:
    from pydoc_data.topics import topics

    text = docstring_text()
    assert len(text) > 500_000
    assert Path(sysconfig.get_paths()["stdlib"]).is_dir()
    assert not any(topics[key][:300] in text for key in ("if", "for", "class", "lambda", "with"))
