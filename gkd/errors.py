"""Errors that the CLI turns into exit codes.

`InputError` means the user gave something wrong (config, model folder, flag, data): the CLI prints its
message as one line on stderr and exits with code 2, no traceback. Its message must say what is wrong and how
to fix it.
`DoesNotFitError` means the job was planned correctly but exceeds the budget: exit code 1.
"""

from __future__ import annotations


class GkdError(Exception):
    """Base class of every error gkd raises on purpose."""


class InputError(GkdError, ValueError):
    """Bad user input: exit code 2, one line on stderr."""


class DoesNotFitError(GkdError):
    """A plan exceeds the memory budget: exit code 1."""
