"""Errors that the CLI prints as one line, each with its own exit code.

Library code raises these (or ``ValueError`` in the pure math); ``ddpm.cli`` catches ``DDPMError``,
prints ``ddpm: error: <message>`` on stderr and exits with ``exit_code``.
"""

from __future__ import annotations


class DDPMError(Exception):
    """Base class: a user-facing problem, reported in one line with a non-zero exit code."""

    exit_code = 1


class ConfigError(DDPMError, ValueError):
    """A bad option or combination of options (unknown name, out-of-range value)."""

    exit_code = 2


class DataError(DDPMError):
    """A data set that cannot be found or read (missing files, corrupt images, bad arrays)."""

    exit_code = 3


class RunDirError(DDPMError):
    """A run directory that is not one, or is from an incompatible version."""

    exit_code = 4


class CheckpointError(DDPMError):
    """A checkpoint that is missing, corrupt, or not in the safe format."""

    exit_code = 5


class DivergedError(DDPMError):
    """Training stopped after too many consecutive non-finite (NaN / inf) losses."""

    exit_code = 6
