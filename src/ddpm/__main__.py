"""``python -m ddpm``: the same as the ``ddpm`` command."""

from ddpm.cli import run

run()
