"""The documentation names tests as its evidence (docs/pitfalls.md's "proved by" column, the
README): every test and test file it names must exist, or the claim has lost its proof."""
import ast
import glob
import os
import re

import pytest
from conftest import ROOT

DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [os.path.join(ROOT, "README.md")]


def defined_tests():
    """The names of the test functions in tests/*.py (methods of test classes included)."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "tests", "*.py")):
        with open(path) as f:
            tree = ast.parse(f.read())
        names |= {n.name for n in ast.walk(tree)
                  if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_test_the_docs_cite_exists(doc):
    with open(doc) as f:
        text = f.read()
    cited = set(re.findall(r"(?<![\w/.])(test_\w+)(?![\w.])", text))  # not part of tests/test_x.py
    missing = sorted(cited - defined_tests())
    assert not missing, f"{os.path.relpath(doc, ROOT)} cites tests that do not exist: {missing}"
    files = set(re.findall(r"\btests/[\w/]+\.py\b", text))
    assert all(os.path.isfile(os.path.join(ROOT, f)) for f in files), files


def test_the_pitfalls_table_cites_a_test_on_every_row():
    with open(os.path.join(ROOT, "docs", "pitfalls.md")) as f:
        rows = [line for line in f if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 13
    for row in rows:
        proved_by = row.rstrip().rstrip("|").rsplit("|", 1)[1]
        assert re.search(r"test_\w+", proved_by), row[:60]
