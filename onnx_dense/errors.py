"""One exception type for everything the user can fix.

Every error the tool raises for bad input is a :class:`DenseError` whose message is a
single line naming the file or node, what is wrong and what to do. The CLI prints it
and exits with code 2; anything else escaping is a bug in this tool.
"""

from __future__ import annotations


class DenseError(Exception):
    """A problem with the user's model or arguments, explained in one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class UnsupportedNodeError(DenseError):
    """A node that cannot be made dense; the message names it and suggests a cut."""

    def __init__(self, node, reason: str, hint: str | None = None) -> None:
        where = f"node {node_label(node)}"
        hint = hint or "cut the graph before it with --outputs"
        super().__init__(f"{where}: {reason}; {hint}")


def node_label(node) -> str:
    """'name' (Op) — how every message refers to a node."""
    name = node.name or "<unnamed>"
    return f"'{name}' ({node.op_type})"
