"""What the root logger prints while a block runs, as a command's log would show it (INFO and up)."""

import contextlib
import io
import logging


@contextlib.contextmanager
def root_log(fmt: str = "%(name)s %(message)s"):
    """Yields a StringIO that receives every record the root logger handles inside the block, formatted
    with `fmt`; the root logger's handlers and level are as before afterwards."""
    root, stream = logging.getLogger(), io.StringIO()
    handler, level = logging.StreamHandler(stream), root.level
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
