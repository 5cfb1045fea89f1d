"""The CLI's defaults are the library's: every option of a command that the entry function also takes (by name, or
through the few renames below) has the same default, so `hybridctl X` and `hybridctl.X.X()` behave alike."""

from __future__ import annotations

import inspect

import pytest

from hybridctl import cli

# (cli command, "module:function" it calls, {cli name: library name}, {cli name: negated library name})
COMMANDS = [
    (cli.build, "hybridctl.build:build", {"set_": "overrides"}, {}),
    (cli.train, "hybridctl.train:train", {}, {}),
    (cli.convert, "hybridctl.convert:convert", {"force": "overwrite"}, {}),
    (cli.generate, "hybridctl.generate:generate", {}, {"ignore_eos": "use_eos"}),
]
CLI_ONLY = {"json_", "verbose", "set_", "init_from", "prompt", "prompt_file"}  # no keyword of the entry function


def defaults(fn) -> dict:
    params = inspect.signature(fn).parameters.items()
    return {n: p.default for n, p in params if p.default is not inspect.Parameter.empty}


def entry(path: str):
    import importlib

    mod, name = path.split(":")
    return getattr(importlib.import_module(mod), name)


@pytest.mark.parametrize("command, target, renames, negated", COMMANDS, ids=[c[1] for c in COMMANDS])
def test_cli_defaults_equal_library_defaults(command, target, renames, negated):
    ours, lib = defaults(command), defaults(entry(target))
    required = set(inspect.signature(entry(target)).parameters) - set(lib)  # the library makes the caller choose
    checked, diffs = [], []
    for name, value in ours.items():
        if name in negated:
            checked.append(name)
            if lib[negated[name]] is not (not value):
                diffs.append(f"--{name}={value!r} vs {negated[name]}={lib[negated[name]]!r}")
            continue
        lib_name = renames.get(name, name)
        if lib_name in required:
            continue
        if lib_name not in lib:
            assert name in CLI_ONLY, f"{target}: CLI option {name!r} has no library keyword; map it in this test"
            continue
        checked.append(name)
        if lib[lib_name] != value and not (value is None and lib[lib_name] in ((), None)):
            diffs.append(f"--{name}={value!r} vs {lib_name}={lib[lib_name]!r}")
    assert not diffs, f"{target}: " + "; ".join(diffs)
    assert len(checked) >= 3, f"{target}: only {checked} compared"
