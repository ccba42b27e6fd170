"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class PixartError(Exception):
    """A problem with the user's input (files, arguments, recipes) described in one line."""
