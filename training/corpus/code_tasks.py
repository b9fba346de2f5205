"""Code domain: tasks on standard-library functions, answered the way a coding assistant does.

Two kinds, one per function (so no function's body leaks across splits):
- *implement*: prompt = signature and docstring; answer = the whole function, restated and
  implemented;
- *document*: prompt = the function without its docstring; answer = the same function with
  its docstring added (an editing task: most of the answer is grounded in the prompt).

Code is canonicalised with ``ast.unparse`` (comments dropped, one formatting style) and kept
short, and framed the way a coding assistant frames it (an intro line, the code block, a
closing line), so the answers are as regular as an instruction-tuned model's.
"""

from __future__ import annotations

import ast
import copy
import random
from collections.abc import Iterator
from dataclasses import dataclass

from dspark.training.corpus.stdlib_source import FORBIDDEN, SourceItem, iter_documented

MAX_BODY_LINES = 14
MAX_LINE_CHARS = 90
MAX_ANSWER_CHARS = 640
MAX_DOC_CHARS = 300

_ASK = (
    "Complete the following Python function.",
    "Write the body of this Python function.",
    "Implement this function from the `{module}` module.",
    "Finish this Python code.",
)
_ASK_METHOD = (
    "Complete this method of the class `{cls}`.",
    "Implement this method of `{cls}` from the `{module}` module.",
)
_INTRO = (
    "Here is the implementation:\n",
    "Here is the completed function:\n",
    "Sure, here is the function:\n",
    "Here is one way to write it:\n",
)
_CLOSING = (
    "Let me know if you would like tests for it.",
    "I hope this helps.",
    "Let me know if you have any questions about it.",
    "Feel free to ask if anything is unclear.",
)
_ASK_DOC = (
    "Add a docstring to this Python function.",
    "Document this function from the `{module}` module with a short docstring.",
    "Write a one-paragraph docstring for this function.",
)
_INTRO_DOC = ("", "Here is the function with a docstring:\n", "Sure:\n")
# Share of functions posed as "add a docstring" instead of "implement". 0 for the demo
# target: a model that cannot copy from its context finds documenting as hard as
# implementing (docs/target-model.md); a larger target can use both kinds.
DOCUMENT_SHARE = 0.0


@dataclass(frozen=True)
class CodeTask:
    key: str  # "module:qualname", unique
    prompt: str
    answer: str


def _signature_with_doc(fn: ast.FunctionDef | ast.AsyncFunctionDef, doc: str) -> str:
    # NOTE: a shallow copy: only the copy's own decorator and body lists are replaced, and
    # ast.unparse never mutates, so the shared subtrees stay untouched (a deep copy of every
    # function was most of the corpus build's time).
    stub = copy.copy(fn)
    stub.decorator_list = []
    stub.body = [ast.Expr(ast.Constant(doc))]
    return ast.unparse(stub)


def _implementation(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    impl = copy.copy(fn)  # NOTE: shallow, as in _signature_with_doc
    impl.decorator_list = []
    body = impl.body[1:] if ast.get_docstring(fn) is not None else impl.body
    if not body or all(isinstance(s, ast.Pass | ast.Expr) for s in body):
        return None  # abstract or trivial stubs teach nothing
    impl.body = body
    try:
        text = ast.unparse(impl)
    except (ValueError, RecursionError):
        return None
    lines = text.split("\n")
    if len(lines) - 1 > MAX_BODY_LINES or any(len(line) > MAX_LINE_CHARS for line in lines):
        return None
    if len(text) > MAX_ANSWER_CHARS or not text.isascii() or any(f in text for f in FORBIDDEN):
        return None
    return text


def _task_of(item: SourceItem, rng: random.Random) -> CodeTask | None:
    fn = item.node
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or fn.decorator_list:
        return None
    if len(item.doc) > MAX_DOC_CHARS or len(item.doc) < 12:
        return None
    impl = _implementation(fn)
    if impl is None:
        return None
    if rng.random() < DOCUMENT_SHARE:
        return _document_task(item, impl, rng)
    stub = _signature_with_doc(fn, item.doc)
    if item.kind == "method":
        ask = rng.choice(_ASK_METHOD).format(cls=item.qualname.split(".")[0], module=item.module)
    else:
        ask = rng.choice(_ASK).format(module=item.module)
    prompt = f"{ask}\n\n```python\n{stub}\n```"
    answer = f"{rng.choice(_INTRO)}```python\n{impl}\n```\n{rng.choice(_CLOSING)}"
    return CodeTask(key=f"{item.module}:{item.qualname}", prompt=prompt, answer=answer)


def _document_task(item: SourceItem, impl: str, rng: random.Random) -> CodeTask:
    documented = copy.deepcopy(item.node)
    documented.decorator_list = []
    body = documented.body[1:] if ast.get_docstring(item.node) is not None else documented.body
    documented.body = [ast.Expr(ast.Constant(item.doc)), *body]
    ask = rng.choice(_ASK_DOC).format(module=item.module)
    prompt = f"{ask}\n\n```python\n{impl}\n```"
    answer = f"{rng.choice(_INTRO_DOC)}```python\n{ast.unparse(documented)}\n```"
    return CodeTask(key=f"{item.module}:{item.qualname}", prompt=prompt, answer=answer)


def iter_code_tasks(seed: int) -> Iterator[CodeTask]:
    """All code tasks in stdlib order; phrasing choices are seeded per task."""
    seen: set[str] = set()
    for item in iter_documented(include_modules=False):
        if item.kind == "class":
            continue
        rng = random.Random(f"{seed}:{item.module}:{item.qualname}")
        task = _task_of(item, rng)
        if task is None or task.answer in seen or task.key in seen:
            continue
        seen.add(task.answer)
        seen.add(task.key)
        yield task
