"""The one exception type loramix raises for bad user input, and a collector that reports many at once."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class LoramixError(Exception):
    """A config, data file, adapter file or flag is wrong; the message says what and where.

    One error may carry several problems found in one pass, one line each (``lines``); the CLI prints
    each as its own ``loramix: <label>:`` line and exits with ``exit_code``.
    """

    exit_code = 2
    label = "error"

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))

    @property
    def lines(self) -> list[str]:
        return str(self).splitlines() or [""]


class Problems:
    """The problems of one validation pass: checks run through it record their LoramixError and go on."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __len__(self) -> int:
        return len(self.lines)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def run(self, check: Callable[..., T], *args: Any, prefix: str = "", **kwargs: Any) -> tuple[bool, T | None]:
        """``(True, check(*args, **kwargs))``, or ``(False, None)`` with its error's lines recorded (each after
        ``prefix``)."""
        try:
            return True, check(*args, **kwargs)
        except LoramixError as e:
            self.lines.extend(prefix + line for line in e.lines)
            return False, None

    def result(self, check: Callable[..., T], *args: Any, prefix: str = "", **kwargs: Any) -> T | None:
        """What ``check`` returned, or None when it raised (recorded)."""
        return self.run(check, *args, prefix=prefix, **kwargs)[1]

    def check(self, check: Callable[..., Any], *args: Any, prefix: str = "", **kwargs: Any) -> bool:
        """Whether ``check`` passed (its error recorded when not)."""
        return self.run(check, *args, prefix=prefix, **kwargs)[0]

    def raise_if_any(self, prefix: str = "") -> None:
        """One LoramixError with every recorded line, each after ``prefix``."""
        if self.lines:
            raise LoramixError(*(prefix + line for line in self.lines))
