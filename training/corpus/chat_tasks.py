"""Chat domain: English prose shaped as question -> answer turns.

Sources: the reference-manual topics of ``pydoc_data`` and the standard library's
docstrings. Each passage becomes one task, of one of these kinds (chosen by a seeded coin):

- *explain* (closed book): "What does `os.path.join` do?" -> a framing sentence built from
  what the question names, then the documentation's prose;
- *summarise* (grounded): the passage is in the prompt; the answer states its subject and
  main point in the passage's own words.

Answers have the shape of an instruction-tuned assistant's: an opener, a sentence naming the
subject, at most two sentences of the documentation's prose, and a closing offer. That
framing is deliberately regular (a tiny target must reach 1-2.5 nats per answer token; see
docs/target-model.md) and deliberately multimodal ("Sure." / "Of course." / nothing).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from dspark.training.corpus.stdlib_source import (
    FORBIDDEN,
    clean_paragraph,
    clean_paragraphs,
    iter_documented,
)

MIN_PROSE_CHARS = 60
MAX_PROSE_CHARS = 520
EXPLAIN_SHARE = 0.4

_ASK_ITEM = {
    "function": (
        "What does the `{name}` function in `{module}` do?",
        "Can you explain `{module}.{name}`?",
        "What is `{module}.{name}` used for?",
    ),
    "method": (
        "What does the `{name}` method of `{cls}` do?",
        "Can you explain `{cls}.{name}` in the `{module}` module?",
    ),
    "class": (
        "What is the `{name}` class in `{module}`?",
        "Can you explain the class `{module}.{name}`?",
    ),
    "module": (
        "What is the `{module}` module for?",
        "Can you tell me about the Python module `{module}`?",
    ),
}
_SUBJECT = {
    "function": "`{module}.{name}` is a function in the `{module}` module.",
    "method": "`{cls}.{name}` is a method of the `{cls}` class in `{module}`.",
    "class": "`{name}` is a class in the `{module}` module.",
    "module": "`{module}` is a module of the Python standard library.",
    "topic": "This passage is about {topic} in Python.",
}
_ASK_TOPIC = (
    "Can you explain {topic} in Python?",
    "Tell me about {topic} in Python.",
    "How does {topic} work in Python?",
)
_ASK_SUMMARY = (
    "Summarize this passage from the Python documentation{about}.",
    "What is the main point of this documentation{about}?",
    "Explain this passage{about} in a few words.",
)
_OPENERS = ("", "Sure. ", "Of course. ", "Certainly. ")
_MAIN_POINT = ("The main point is: ", "In short: ", "Put simply: ")
_TOPIC_SUBJECT = "Here is how {topic} works in Python."
_CLOSINGS = (
    "Let me know if you would like an example of {ref}.",
    "I hope this helps you use {ref}.",
    "If you want, I can show how {ref} is used in practice.",
    "Feel free to ask if anything about {ref} is unclear.",
)
MAX_SENTENCES = 2


@dataclass(frozen=True)
class ChatTask:
    key: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class _Passage:
    key: str
    text: str
    kind: str  # function, method, class, module or topic
    fields: dict


def prose_ok(text: str) -> bool:
    if not MIN_PROSE_CHARS <= len(text) <= MAX_PROSE_CHARS:
        return False
    if any(tok in text for tok in (">>>", "::=", "::", "    ", "|")):
        return False
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters / len(text) > 0.85 and text[-1] in ".!?"


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"`(])", text) if s]


def _topic_passages() -> Iterator[_Passage]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name]
        title = text.split("\n")[0].strip()
        if not title or not title.isascii():
            continue
        topic = title[0].lower() + title[1:] if title[1:2].islower() else title
        for n, para in enumerate(re.split(r"\n\s*\n", text)):
            if para.startswith((" ", "*", "-", "=")) or "\n   " in para:
                continue  # grammar, code examples, lists and underlines
            para = clean_paragraph(para)
            if para and prose_ok(para):
                yield _Passage(f"topic:{name}:{n}", para, "topic", {"topic": topic})


def _doc_passages() -> Iterator[tuple[_Passage, bool]]:
    """(passage, is_first_paragraph) for every prose paragraph of every docstring."""
    for item in iter_documented(include_modules=True):
        if item.qualname.split(".")[-1].startswith("_"):
            continue
        name = item.qualname.split(".")[-1]
        fields = {"module": item.module, "name": name, "cls": item.qualname.split(".")[0]}
        for n, para in enumerate(clean_paragraphs(item.full_doc)):
            if para and prose_ok(para):
                key = f"doc:{item.module}:{item.qualname}:{n}"
                yield _Passage(key, para, item.kind, fields), n == 0


def _about(p: _Passage) -> str:
    if p.kind == "topic":
        return f" about {p.fields['topic']}"
    if p.kind == "module":
        return f" of `{p.fields['module']}`"
    if p.kind == "method":
        return f" of `{p.fields['cls']}.{p.fields['name']}`"
    return f" of `{p.fields['module']}.{p.fields['name']}`"


def _reference(p: _Passage) -> str:
    if p.kind == "topic":
        return p.fields["topic"]
    if p.kind == "module":
        return f"the `{p.fields['module']}` module"
    if p.kind == "method":
        return f"`{p.fields['cls']}.{p.fields['name']}`"
    return f"`{p.fields['name']}`"


def _closing(p: _Passage, rng: random.Random) -> str:
    return rng.choice(_CLOSINGS).format(ref=_reference(p))


def _explain(p: _Passage, rng: random.Random) -> ChatTask:
    prose = " ".join(sentences(p.text)[:MAX_SENTENCES])
    if p.kind == "topic":
        prompt = rng.choice(_ASK_TOPIC).format(**p.fields)
        subject = _TOPIC_SUBJECT.format(**p.fields)
    else:
        prompt = rng.choice(_ASK_ITEM[p.kind]).format(**p.fields)
        subject = _SUBJECT[p.kind].format(**p.fields)
    answer = f"{rng.choice(_OPENERS)}{subject} {prose} {_closing(p, rng)}"
    return ChatTask(p.key, prompt, answer)


def _grounded(p: _Passage, rng: random.Random) -> ChatTask:
    sents = sentences(p.text)
    ask = rng.choice(_ASK_SUMMARY).format(about=_about(p))
    subject = _SUBJECT[p.kind].format(**p.fields)
    answer = (
        f"{rng.choice(_OPENERS)}{subject} {rng.choice(_MAIN_POINT)}{sents[0]} {_closing(p, rng)}"
    )
    return ChatTask(p.key, f'{ask}\n\n"{p.text}"', answer)


def iter_chat_tasks(seed: int) -> Iterator[ChatTask]:
    seen: set[str] = set()
    passages = [(p, True) for p in _topic_passages()] + list(_doc_passages())
    for passage, first in passages:
        if passage.text in seen or any(f in passage.text for f in FORBIDDEN):
            continue
        seen.add(passage.text)
        rng = random.Random(f"{seed}:{passage.key}")
        task = _explain(passage, rng) if first and rng.random() < EXPLAIN_SHARE else None
        if task is None or task.prompt in seen:  # e.g. a method defined twice in a module
            task = _grounded(passage, rng)
        if task.prompt in seen:
            continue
        seen.add(task.prompt)
        yield task
