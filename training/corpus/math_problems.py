"""Seeded generator of GSM8K-style grade-school math word problems with worked solutions.

Every solution line restates what it computes with exactly one integer operation written
out as "A op B = C" (op is one of + - * /), and the last line is "The answer is \\boxed{N}.".
All values are non-negative integers and every division is exact. Only random.Random(seed)
is used, so generate_problems(seed, count) is identical in any process; every problem is
self-checked (arithmetic, format, ASCII) before it is returned.

The templates live by family in ``math_money``, ``math_counting``, ``math_fractions`` and
``math_rates``; their shared vocabulary and the ``Steps`` recorder in ``math_vocab``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from dspark.training.corpus import math_counting as counting
from dspark.training.corpus import math_fractions as fractions
from dspark.training.corpus import math_money as money
from dspark.training.corpus import math_rates as rates
from dspark.training.corpus.math_vocab import Steps


@dataclass(frozen=True)
class MathProblem:
    question: str
    solution: str
    answer: int
    template: str


# NOTE: the order of this list is part of the seed -> problem mapping (generate_problems
# draws an index into it), so a new template goes at the end.
TEMPLATES: list[tuple[str, Callable[[random.Random, Steps], tuple[str, int]]]] = [
    (fn.__name__[2:], fn)
    for fn in (
        counting.t_half_as_many,
        money.t_change_from_bill,
        money.t_hourly_wage,
        counting.t_share_equally,
        money.t_percent_discount,
        rates.t_age_in_future,
        rates.t_speed_distance,
        rates.t_two_leg_trip,
        rates.t_pages_left,
        fractions.t_book_half_remaining,
        money.t_savings_goal,
        fractions.t_fraction_eaten,
        fractions.t_fraction_given,
        fractions.t_fraction_of_group,
        counting.t_remaining_after_removals,
        counting.t_packs_total,
        money.t_boxes_sold,
        rates.t_rectangle_area,
        rates.t_rectangle_perimeter,
        counting.t_doubling_tripling,
        counting.t_how_many_more,
        counting.t_three_people_total,
        money.t_shopping_left,
        money.t_split_cost,
        money.t_profit,
        counting.t_animal_legs,
        fractions.t_recipe_scale,
        rates.t_weekly_total,
        rates.t_minutes_to_hours,
        counting.t_more_than_twice,
        rates.t_fill_tank,
    )
]
_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)")
_OPS = {
    "+": int.__add__,
    "-": int.__sub__,
    "*": int.__mul__,
    "/": lambda a, b: a // b if a % b == 0 else -1,
}


def _check(p: MathProblem) -> None:
    lines = p.solution.split("\n")
    assert len(lines) >= 2 and lines[-1] == f"The answer is \\boxed{{{p.answer}}}.", p
    for ln in lines[:-1]:
        eqs = _EQ.findall(ln)
        assert len(eqs) == 1, ln
        a, op, b, c = eqs[0]
        assert (op != "/" or int(b) > 0) and _OPS[op](int(a), int(b)) == int(c), ln
    assert int(_EQ.findall(lines[-2])[0][3]) == p.answer, p
    text = p.question + p.solution
    assert p.question.endswith("?") and "\n" not in p.question and text.isascii(), p
    assert not any(bad in text for bad in ("<mask>", "<|", "|>")), p


def generate_problems(seed: int, count: int) -> list[MathProblem]:
    """Deterministic for (seed, count): same inputs -> identical list, in any process."""
    r = random.Random(seed)
    out: list[MathProblem] = []
    for _ in range(count):
        name, fn = r.choice(TEMPLATES)
        s = Steps()
        question, ans = fn(r, s)
        assert ans == s.last and ans >= 0, (name, ans)
        solution = "\n".join([*s.lines, f"The answer is \\boxed{{{ans}}}."])
        prob = MathProblem(question, solution, ans, name)
        _check(prob)
        out.append(prob)
    return out


def format_prompt(p: MathProblem) -> str:
    return p.question
