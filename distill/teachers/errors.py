"""The teacher error type, in a module of its own so that parse worker processes import nothing heavy."""

from __future__ import annotations


class TeacherError(RuntimeError):
    """A teacher could not produce top-k predictions; the message says what went wrong and what to do."""
