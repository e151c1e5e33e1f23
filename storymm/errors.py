"""The one family of errors a user can fix: bad input (config, URIs, arguments, data) or a bad
environment (storage unreachable, credentials refused, a missing optional package).

``storymm.cli`` prints such an error as one line, ``storymm: error: <what is wrong and what to
do>``, and exits 2 (``-v`` adds the traceback). Anything else is a bug and keeps its traceback, so
the module-specific errors derive from :class:`StorymmError` and nothing is caught by type alone.
"""

from __future__ import annotations


class StorymmError(Exception):
    """A problem in what the user gave or in their environment; the message says what to do."""


class UsageError(StorymmError, ValueError):
    """A bad argument or URI (a ``ValueError`` too, for callers that catch those)."""
