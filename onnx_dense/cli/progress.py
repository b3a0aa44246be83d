"""Progress on a terminal only: one status line rewritten in place, nothing in a log.

tqdm does the same for loops with a known length (``disable=None`` turns it off when the
stream is not a terminal); this is for the few named stages of a command (``bench``'s
"round 3 of 20"), which should not leave twenty lines in a CI log.
"""

from __future__ import annotations

import sys
from typing import Callable


def is_terminal(stream=None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def status_line(stream=None) -> Callable[[str | None], None]:
    """``say(text)`` shows text on one line of stderr; ``say(None)`` clears it. Silent unless a terminal."""
    stream = stream if stream is not None else sys.stderr
    live = is_terminal(stream)
    width = [0]

    def say(text: str | None) -> None:
        if not live:
            return
        line = "" if text is None else f"  {text}"
        stream.write("\r" + line.ljust(width[0]) + ("\r" if text is None else ""))
        stream.flush()
        width[0] = len(line)

    return say
