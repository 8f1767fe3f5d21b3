"""parse_structure: accepted spellings, implied sparsities, and the errors (type and message) for bad input."""

from __future__ import annotations

import math

import pytest

from wanda_lightning import SparsityStructure, parse_structure


@pytest.mark.parametrize(
    ("structure", "sparsity", "expected"),
    [
        ("unstructured", None, SparsityStructure(0.5)),
        ("unstructured", 0.0, SparsityStructure(0.0)),
        ("unstructured", 0.3, SparsityStructure(0.3)),
        ("unstructured", 0.999, SparsityStructure(0.999)),
        ("  UnStructured ", 0.7, SparsityStructure(0.7)),
        ("unstructured", 0, SparsityStructure(0.0)),
        ("2:4", None, SparsityStructure(0.5, 2, 4)),
        ("2:4", 0.5, SparsityStructure(0.5, 2, 4)),
        (" 4 : 8 ", None, SparsityStructure(0.5, 4, 8)),
        ("1:4", None, SparsityStructure(0.75, 1, 4)),
        ("1:4", 0.75, SparsityStructure(0.75, 1, 4)),
        ("3:4", None, SparsityStructure(0.25, 3, 4)),
        ("4:4", None, SparsityStructure(0.0, 4, 4)),
    ],
)
def test_parse_structure_good(structure, sparsity, expected):
    parsed = parse_structure(structure, sparsity)
    assert parsed == expected
    assert isinstance(parsed.sparsity, float)
    assert parsed.is_n_m == (expected.m is not None)


def test_structure_helpers():
    assert parse_structure("2:4").name == "2:4"
    assert parse_structure("unstructured", 0.6).name == "unstructured"
    assert str(parse_structure("unstructured", 0.6)) == "unstructured 60%"
    assert str(parse_structure("1:4")) == "1:4"
    assert parse_structure("unstructured", 0.7).pruned_per_row(10) == 7
    assert parse_structure("unstructured", 0.5).pruned_per_row(7) == 3
    assert parse_structure("1:4").pruned_per_row(16) == 12
    assert parse_structure("4:8").pruned_per_row(16) == 8


@pytest.mark.parametrize(
    ("structure", "sparsity", "error", "fragments"),
    [
        ("3:2", None, ValueError, ["`structure`", "'3:2'", "0 < N <= M"]),
        ("0:4", None, ValueError, ["`structure`", "'0:4'", "0 < N <= M"]),
        ("0:0", None, ValueError, ["`structure`", "'0:0'"]),
        ("a:b", None, ValueError, ["`structure`", "'a:b'"]),
        ("foo", None, ValueError, ["`structure`", "'foo'"]),
        ("", None, ValueError, ["`structure`", "''"]),
        ("2:4:8", None, ValueError, ["`structure`", "'2:4:8'"]),
        ("-2:4", None, ValueError, ["`structure`", "'-2:4'"]),
        ("2:4", 0.7, ValueError, ["`sparsity`", "0.7", "'2:4'", "0.5"]),
        ("1:4", 0.5, ValueError, ["`sparsity`", "0.5", "'1:4'", "0.75"]),
        ("unstructured", 1.0, ValueError, ["`sparsity`", "1.0", "[0, 1)"]),
        ("unstructured", 1, ValueError, ["`sparsity`", "1"]),
        ("unstructured", -0.1, ValueError, ["`sparsity`", "-0.1"]),
        ("unstructured", math.nan, ValueError, ["`sparsity`", "nan"]),
        ("unstructured", math.inf, ValueError, ["`sparsity`", "inf"]),
        ("2:4", math.nan, ValueError, ["`sparsity`", "nan"]),
        ("unstructured", True, TypeError, ["`sparsity`", "True"]),
        ("unstructured", False, TypeError, ["`sparsity`", "False"]),
        ("unstructured", "0.5", TypeError, ["`sparsity`", "'0.5'"]),
        ("unstructured", [0.5], TypeError, ["`sparsity`", "[0.5]"]),
        (None, None, TypeError, ["`structure`", "None"]),
        (24, None, TypeError, ["`structure`", "24"]),
        (("2", "4"), None, TypeError, ["`structure`", "('2', '4')"]),
    ],
)
def test_parse_structure_bad(structure, sparsity, error, fragments):
    with pytest.raises(error) as info:
        parse_structure(structure, sparsity)
    assert type(info.value) is error
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
