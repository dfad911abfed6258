"""A Jinja sandbox that bounds work as well as access, for chat templates (untrusted: from a GGUF or a config).

``ImmutableSandboxedEnvironment`` blocks Python internals and mutation but lets a template ask for any amount of
memory or time: ``{{ 'x' * 10**10 }}`` (which Jinja would even fold while compiling), ``'x'|center(10**9)``,
doubling a string in a loop, nested loops. Here every operation that can build a large value is checked before
it runs (``* ** + % ~``, ``range``, size-taking filters and string methods, ``format``), the output is counted
as it is produced, and a trace function raises once the thread's deadline passes, so an overrunning render
stops itself and gives its thread back.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from types import FrameType
from typing import Any

from jinja2.compiler import CodeGenerator, Frame
from jinja2.nodes import Concat
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_CHARS = 4 * 1024 * 1024  # the largest string, list or output a template may build
MAX_RANGE = 100_000
MAX_WIDTH = 100_000  # widths, counts and repeats given to filters and string methods
_WIDTH_TAKERS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap", "truncate",
                           "batch", "slice"})
_BIG_NUMBER_IN_FORMAT = re.compile(r"\d{6,}")
_TEMPLATE_FILE = "<template>"

_local = threading.local()


class RenderTimeout(SecurityError):
    """The template ran past its deadline."""


def size_of(value: Any, cap: int = MAX_CHARS) -> int:
    """Characters (strings) or elements plus their sizes (containers), counted up to just past ``cap``."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list | tuple):
        total = len(value)
        for item in value:
            if total > cap:
                break
            total += size_of(item, cap - total)
        return total
    return 1


def _check_size(n: float, what: str) -> None:
    if n > MAX_CHARS:
        raise SecurityError(f"{what} would build a value over {MAX_CHARS} characters")


def check_deadline() -> None:
    deadline = getattr(_local, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise RenderTimeout("the template ran too long")


def _trace(frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
    check_deadline()
    # Line events only in the template's own code: its loops are where a render spends runaway time.
    return _trace if frame.f_code.co_filename == _TEMPLATE_FILE else None


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bound the work done in this thread inside the block (the template's code and the calls it makes)."""
    _local.deadline = time.monotonic() + seconds
    previous = sys.gettrace()
    sys.settrace(_trace)
    try:
        yield
    finally:
        sys.settrace(previous)
        _local.deadline = None


def _check_format(fmt: Any, args: tuple[Any, ...]) -> None:
    if isinstance(fmt, str) and _BIG_NUMBER_IN_FORMAT.search(fmt):
        raise SecurityError("format widths over 99999 are not allowed")
    _check_width_args(args)


def _check_width_args(args: tuple[Any, ...] | list[Any]) -> None:
    if any(isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_WIDTH for a in args):
        raise SecurityError(f"a width or count over {MAX_WIDTH} is not allowed")


def _check_replace(s: Any, args: tuple[Any, ...]) -> None:
    if isinstance(s, str) and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        grows = max(0, len(args[1]) - len(args[0]))
        count = s.count(args[0]) if args[0] else len(s) + 1
        _check_size(len(s) + count * grows, "replace")


def _materialized(value: Any) -> Any:
    """An iterator (``map``, ``select``...) as a list, so its size can be checked before it is joined."""
    if isinstance(value, str | bytes | list | tuple | dict) or not hasattr(value, "__iter__"):
        return value
    items = list(itertools.islice(value, MAX_RANGE + 1))
    if len(items) > MAX_RANGE:
        raise SecurityError(f"joining more than {MAX_RANGE} items is not allowed")
    return items


def _precheck(name: str, obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse a filter or string method call whose result would be too large, before it allocates."""
    check_deadline()
    if name in _WIDTH_TAKERS:
        _check_width_args([*args, *kwargs.values()])
    elif name == "format":
        _check_format(obj, (*args, *kwargs.values()))
    elif name == "replace":
        _check_replace(obj, args)
    elif name == "join":
        # The filter joins its value with an optional separator; the method joins its argument with its string.
        items, sep = (args[0], obj) if isinstance(obj, str) and args else (obj, args[0] if args else "")
        n = len(items) if isinstance(items, list | tuple | dict | str) else 0
        _check_size(size_of(items) + n * len(sep if isinstance(sep, str) else ""), "join")
    for value in (*args, *kwargs.values()):
        _check_size(size_of(value), name)


def _bounded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def bounded(*args: Any, **kwargs: Any) -> Any:
        # Filters with pass_context / pass_environment get that first; the filtered value follows.
        offset = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0
        if name == "join" and len(args) > offset:
            args = (*args[:offset], _materialized(args[offset]), *args[offset + 1:])
        value, rest = (args[offset], args[offset + 1:]) if len(args) > offset else (None, ())
        _precheck(name, value, rest, kwargs)
        return fn(*args, **kwargs)

    for attr in ("jinja_pass_arg",):
        if hasattr(fn, attr):
            setattr(bounded, attr, getattr(fn, attr))
    return bounded


def _bounded_range(*args: int) -> range:
    check_deadline()
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise SecurityError(f"range() is limited to {MAX_RANGE} items")
    return r


def tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
           sort_keys: bool = False) -> str:
    """Hugging Face's ``tojson``: plain JSON, non-ASCII kept, nothing HTML-escaped (Jinja's own escapes ``<``)."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    # Hugging Face templates (Llama 3.x) date their system prompt with this global.
    _check_format(fmt, ())
    return datetime.now().strftime(fmt)


class _BoundedCodeGenerator(CodeGenerator):
    def visit_Concat(self, node: Concat, frame: Frame) -> None:
        # ``a ~ b`` compiles to a plain join that no sandbox hook sees; route it through a size check.
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus size and time bounds (see the module docstring)."""

    code_generator_class = _BoundedCodeGenerator
    # Intercepting these also stops Jinja from folding them while compiling, where nothing could bound them.
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters["tojson"] = tojson
        self.filters = {name: _bounded_filter(name, fn) for name, fn in self.filters.items()}
        self.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs
        self.globals["range"] = _bounded_range
        self.globals["strftime_now"] = _strftime_now

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        check_deadline()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int):
                    _check_size(size_of(seq) * max(n, 0), "'*'")
        elif operator == "+" and isinstance(left, str | list | tuple):
            _check_size(size_of(left) + size_of(right), "'+'")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if right * math.log2(abs(left) + 1) > 4096:
                raise SecurityError("'**' result too large")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, tuple) else (right,))
        return super().call_binop(context, operator, left, right)

    def bounded_concat(self, parts: tuple[Any, ...]) -> str:
        check_deadline()
        strs = [str(p) for p in parts]
        _check_size(sum(map(len, strs)), "'~'")
        return "".join(strs)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        name = getattr(__obj, "__name__", "")
        if isinstance(getattr(__obj, "__self__", None), str):
            if name == "join" and args:
                args = (_materialized(args[0]), *args[1:])
            _precheck(name, __obj.__self__, args, kwargs)
        else:
            check_deadline()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        check_deadline()
        return super().getitem(obj, argument)
