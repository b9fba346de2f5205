import ast
import re

from dspark.training.corpus.build import DOMAINS, SPLITS, CorpusConfig, build_corpus
from dspark.training.corpus.math_problems import generate_problems


def test_same_seed_same_corpus_other_seed_differs(corpus):
    again = build_corpus(CorpusConfig(seed=0, math_train=2000, math_eval=100))
    assert again == corpus
    other = build_corpus(CorpusConfig(seed=1, math_train=2000, math_eval=100))
    assert other["math"]["train"] != corpus["math"]["train"]
    assert other["code"]["heldout"] != corpus["code"]["heldout"]


def test_every_domain_has_disjoint_nonempty_splits(corpus):
    for domain in DOMAINS:
        answers = {}
        for split in SPLITS:
            recs = corpus[domain][split]
            assert recs, (domain, split)
            answers[split] = {r["messages"][1]["content"] for r in recs}
            prompts = {r["messages"][0]["content"] for r in recs}
            if split != "train":
                train_prompts = {r["messages"][0]["content"] for r in corpus[domain]["train"]}
                assert not prompts & train_prompts, (domain, split)
        if domain != "math":  # two different word problems may share a solution text
            assert not answers["heldout"] & answers["train"]
            assert not answers["calibration"] & answers["heldout"]


def test_math_solutions_are_correct_and_boxed():
    for p in generate_problems(7, 500):
        lines = p.solution.split("\n")
        assert lines[-1] == f"The answer is \\boxed{{{p.answer}}}."
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)", p.solution):
            assert eval(f"{a} {op} {b}") == int(c), p.solution


def test_code_answers_are_python_restating_the_signature(corpus):
    for rec in corpus["code"]["train"][:400]:
        prompt, answer = (m["content"] for m in rec["messages"])
        code = answer.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        tree = ast.parse(code)
        assert isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef)
        signature = code.split("\n", 1)[0]
        assert signature in prompt


def test_chat_answers_are_prose(corpus):
    for rec in corpus["chat"]["train"][:400]:
        answer = rec["messages"][1]["content"]
        assert answer[-1] in ".!?" and answer.isascii()
        assert sum(c.isalpha() or c == " " for c in answer) / len(answer) > 0.8
