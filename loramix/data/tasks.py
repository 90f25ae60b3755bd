"""The commonsense tasks the paper reports, with the reference implementation's prompts and the LLM-Adapters files.

Two sources feed the same task names:
* records in the original (hub) schema, rendered with the reference prompts: the prompt ends at "Answer:"
  (PIQA: "Correct solution:") and the answer is " " + a label letter or word;
* records in the LLM-Adapters JSON format (``instruction``, ``input``, ``output``, ``answer``), whose
  instructions end in "Answer format: answer1/answer2/..." and whose outputs read "the correct answer is X".
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import LoramixError
from .example import Example
from .readers import Record, field

_LETTERS = "ABCDE"


def _gold(labels: list[str], value: Any, where: str) -> int:
    value = str(value).strip()
    if value not in labels:
        raise LoramixError(f"{where}: answer {value!r} is not one of the choices {labels}")
    return labels.index(value)


def _example(task: str, prompt: str, labels: list[str], gold: int) -> Example:
    return Example(instruction=prompt, output=labels[gold], choices=tuple(labels), label=gold, task=task)


def _arc_like(task: str, question_key: str) -> Callable[[Record, str], Example]:
    def parse(rec: Record, where: str) -> Example:
        q = field(rec, question_key, where)
        choices = field(rec, "choices", where, types=(dict,))
        labels = [str(x) for x in choices.get("label", [])]
        texts = choices.get("text", [])
        if not labels or len(labels) != len(texts):
            raise LoramixError(f"{where}: field 'choices' needs equal-length 'label' and 'text' lists")
        prompt = f"Please choose the correct answer to the question: {q}"
        prompt += "".join(f" ({lab}) {txt}" for lab, txt in zip(labels, texts)) + "\nAnswer:"
        return _example(task, prompt, labels, _gold(labels, field(rec, "answerKey", where), where))
    return parse


def _boolq(rec: Record, where: str) -> Example:
    q = field(rec, "question", where)
    ans = field(rec, "answer", where, types=(bool, str))
    prompt = f"Please answer the following question with true or false: {q}?\nAnswer:"
    return _example("boolq", prompt, ["true", "false"], 0 if str(ans).lower() == "true" else 1)


def _lettered(options: list[str]) -> str:
    return "".join(f"\n({_LETTERS[i]}) {o}" for i, o in enumerate(options))


def _piqa(rec: Record, where: str) -> Example:
    goal, sol1, sol2 = (field(rec, k, where) for k in ("goal", "sol1", "sol2"))
    prompt = ("Below is a common task along with two possible solutions labeled (A) and (B). Please select the "
              f"appropriate solution to achieve the task:\n{goal}\n\n(A) {sol1}\n(B) {sol2}\n\nCorrect solution:")
    return _example("piqa", prompt, ["A", "B"], int(field(rec, "label", where, types=(int, str))))


def _siqa(rec: Record, where: str) -> Example:
    ctx, q = field(rec, "context", where), field(rec, "question", where)
    options = [field(rec, k, where) for k in ("answerA", "answerB", "answerC")]
    prompt = f"Please choose the correct answer to the question.\nQuestion: {ctx} {q}{_lettered(options)}\nAnswer:"
    return _example("siqa", prompt, ["A", "B", "C"], int(field(rec, "label", where, types=(int, str))) - 1)


def _hellaswag(rec: Record, where: str) -> Example:
    act, ctx = field(rec, "activity_label", where), field(rec, "ctx", where)
    endings = field(rec, "endings", where, types=(list,))
    prompt = (f"Please choose the correct ending to complete the given sentence.\nSentence: {act}. {ctx}"
              f"{_lettered(endings)}\nAnswer:")
    return _example("hellaswag", prompt, list(_LETTERS[:len(endings)]),
                    int(field(rec, "label", where, types=(int, str))))


def _winogrande(rec: Record, where: str) -> Example:
    s, o1, o2 = (field(rec, k, where) for k in ("sentence", "option1", "option2"))
    prompt = ("Please choose the correct answer to fill in the blank to complete the given sentence.\n"
              f"Sentence: {s}\n(A) {o1}\n(B) {o2}\nAnswer:")
    return _example("winogrande", prompt, ["A", "B"], int(field(rec, "answer", where, types=(int, str))) - 1)


@dataclass(frozen=True)
class TaskInfo:
    """A built-in task: its reference-prompt parser, the fields that identify its schema, and its hub source."""

    name: str
    parse: Callable[[Record, str], Example]
    schema_keys: tuple[str, ...]
    hub: tuple[str, str | None, str]  # (dataset id, subset, evaluation split)


TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    TaskInfo("arc-e", _arc_like("arc-e", "question"), ("question", "choices", "answerKey"),
             ("allenai/ai2_arc", "ARC-Easy", "test")),
    TaskInfo("arc-c", _arc_like("arc-c", "question"), ("question", "choices", "answerKey"),
             ("allenai/ai2_arc", "ARC-Challenge", "test")),
    TaskInfo("obqa", _arc_like("obqa", "question_stem"), ("question_stem", "choices", "answerKey"),
             ("allenai/openbookqa", "main", "test")),
    TaskInfo("boolq", _boolq, ("question", "answer"), ("google/boolq", None, "validation")),
    TaskInfo("piqa", _piqa, ("goal", "sol1", "sol2"), ("ybisk/piqa", None, "validation")),
    TaskInfo("siqa", _siqa, ("context", "question", "answerA"), ("allenai/social_i_qa", None, "validation")),
    TaskInfo("hellaswag", _hellaswag, ("ctx", "endings"), ("Rowan/hellaswag", None, "validation")),
    TaskInfo("winogrande", _winogrande, ("sentence", "option1", "option2"),
             ("allenai/winogrande", "winogrande_debiased", "validation")),
)}

# LLM-Adapters folder names -> task names.
_ALIASES = {"arc-easy": "arc-e", "arc-challenge": "arc-c", "openbookqa": "obqa", "social_i_qa": "siqa",
            "social-iqa": "siqa", "arc_easy": "arc-e", "arc_challenge": "arc-c"}


def canonical_task_name(name: str) -> str:
    """Map "ARC-Easy", "openbookqa", "social_i_qa" ... to the task names above; others are returned lower-cased."""
    low = name.strip().lower()
    return _ALIASES.get(low, low)


def builtin_task(name: str) -> TaskInfo:
    """The built-in task called ``name``, or a LoramixError that lists the known names (with a did-you-mean)."""
    key = canonical_task_name(name)
    if key in TASKS:
        return TASKS[key]
    close = difflib.get_close_matches(key, list(TASKS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise LoramixError(f"unknown task {name!r} (built-in tasks: {', '.join(TASKS)}; other tasks need a data "
                       f"file){hint}")


_FORMAT_RE = re.compile(r"Answer format:\s*(\S+)\s*$")
_OUTPUT_PREFIX = "the correct answer is "


def parse_commonsense(rec: Record, where: str, task: str) -> Example:
    """An LLM-Adapters record: the candidates come from its "Answer format: a/b/..." line.

    The candidates are whole outputs ("the correct answer is answer1", ...) so that training on ``output``
    and scoring the candidates use the same text.
    """
    instruction = field(rec, "instruction", where)
    answer = field(rec, "answer", where).strip()
    output = field(rec, "output", where)
    m = _FORMAT_RE.search(instruction)
    if not m:
        raise LoramixError(f"{where}: instruction has no 'Answer format: a/b/...' line to take the choices from")
    options = m.group(1).split("/")
    prefix = _OUTPUT_PREFIX if output.startswith(_OUTPUT_PREFIX) else ""
    return Example(instruction=instruction, input=str(rec.get("input") or ""), output=output,
                   choices=tuple(prefix + o for o in options), label=_gold(options, answer, where), task=task)
