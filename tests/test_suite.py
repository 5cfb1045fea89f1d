"""The suite's own rules: the slow list names real tests, and nothing deselects slow tests by default (CI runs
them)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
from conftest import SLOW_TESTS

TESTS = Path(__file__).resolve().parent


def test_slow_list_names_existing_tests():
    missing = []
    for entry in sorted(SLOW_TESTS):
        file, name = entry.split("::")
        path = TESTS / file
        names = {n.name for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.FunctionDef)} if path.is_file() else set()
        if name not in names:
            missing.append(entry)
    assert not missing, f"tests/conftest.py SLOW_TESTS names tests that do not exist (moved or renamed?): {missing}"


def test_slow_tests_are_not_deselected_by_default():
    opts = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "slow" in " ".join(opts["markers"])
    assert "slow" not in str(opts.get("addopts", "")), "CI must run the slow tests: do not deselect them in addopts"


@pytest.mark.parametrize("marker", ["slow"])
def test_the_marker_is_applied(request, marker):
    session_items = request.session.items
    marked = {f"{i.path.name}::{i.originalname}" for i in session_items if i.get_closest_marker(marker)}
    collected = {f"{i.path.name}::{i.originalname}" for i in session_items}
    assert marked == SLOW_TESTS & collected
