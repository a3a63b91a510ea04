"""The runtimes' one exception type for what a user can fix (a damaged file, a wrong dtype or shape, a missing
build): one line naming the file, tensor or layer and what to do. It is not `rose.errors.RoseError` because a
runtime imports nothing of the pruner; `rose-export` prints both alike, as one line with exit code 2."""


class RoseRuntimeError(Exception):
    """A bad packed weight, input or environment for one of rose's runtimes; the message is one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type), to quote a library's error in one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
