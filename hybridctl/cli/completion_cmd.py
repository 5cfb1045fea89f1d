"""`hybridctl completion`: shell completion scripts (Typer's, answered at run time by ``main``)."""

from __future__ import annotations

from typing import Annotated

import typer

from hybridctl.cli.common import app, errors
from hybridctl.config import HybridctlError


SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_HYBRIDCTL_COMPLETE"


def completion_script(shell: str) -> str:
    """The completion script for ``shell`` (Typer's own scripts, answered at run time by ``main``)."""
    from typer.completion import get_completion_script

    if shell not in SHELLS:
        raise HybridctlError(f"shell {shell!r} is not supported; use one of {', '.join(SHELLS)}")
    return get_completion_script(prog_name="hybridctl", complete_var=COMPLETE_VAR, shell=shell)


@app.command(epilog="Examples:\n\n  hybridctl completion bash > ~/.local/share/bash-completion/completions/hybridctl"
             "\n\n  hybridctl completion fish > ~/.config/fish/completions/hybridctl.fish")
@errors
def completion(shell: Annotated[str, typer.Argument(help="bash | zsh | fish")]) -> None:
    """Print a shell completion script (committed copies live in completions/)."""
    typer.echo(completion_script(shell), nl=False)
