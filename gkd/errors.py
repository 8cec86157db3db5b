"""Errors that the CLI turns into exit codes.

`InputError` means the user gave something wrong (config, model folder, flag, data): the CLI prints its
message as one line on stderr and exits with code 2, no traceback. Its message must say what is wrong and how
to fix it.
`DoesNotFitError` means the job was planned correctly but exceeds the budget: exit code 1.
"""

from __future__ import annotations

import reprlib


class GkdError(Exception):
    """Base class of every error gkd raises on purpose."""


class InputError(GkdError, ValueError):
    """Bad user input: exit code 2, one line on stderr."""


class DoesNotFitError(GkdError):
    """A plan exceeds the memory budget: exit code 1."""


# How much of a user's value a message echoes: enough to recognise it, never a whole document (an expanded
# YAML alias, a pasted file) that would flood the terminal or take gigabytes to format.
SHOWN_CHARS = 80


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)` cut to about `limit` characters (ending in "...") for messages. Nested containers are
    formatted only a few levels and items deep (reprlib), so even a huge value costs little to show."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: max(limit - 3, 1)] + "..."


class _ShortRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        # repr() of an integer past 4,300 digits raises ValueError (sys.set_int_max_str_digits).
        if x.bit_length() > 256:
            return f"<an integer of {int(x.bit_length() * 0.30103)}-odd digits>"
        return repr(x)


_REPR = _ShortRepr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 2 * SHOWN_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 8
