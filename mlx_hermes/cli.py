"""The `mlx-hermes` command: a thin layer over the Python API."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import HermesError


class _Group(click.Group):
    """Turns HermesError into `error: ...` and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HermesError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-hermes")
def main() -> None:
    """Run Nous Hermes 2 Mixtral 8x7B with MLX."""


if __name__ == "__main__":
    main()
