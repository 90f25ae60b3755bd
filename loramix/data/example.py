"""One training or evaluation item, independent of the file format it came from."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A prompt (instruction + optional input), the text to learn, and, for scored tasks, the candidates.

    ``output`` is what training appends after the prompt; ``choices`` are the candidate continuations
    evaluation compares (``choices[label]`` is the right one; empty for free-text data).
    ``task`` names the task; it travels to evaluation and router statistics. ``template`` names the prompt
    template (see templates.py) that renders it.
    """

    instruction: str
    input: str = ""
    output: str = ""
    choices: tuple[str, ...] = ()
    label: int | None = None
    task: str = "default"
    template: str = "plain"

    @property
    def scored(self) -> bool:
        """True when the example has candidates and a gold index, so accuracy can be measured."""
        return bool(self.choices) and self.label is not None
