"""Math templates about fractions of a whole and scaling a ratio.

Each ``t_<name>(r, s)`` draws its numbers from ``r`` (a ``random.Random``), records every
solution step through ``s`` (a ``Steps``) and returns ``(question, answer)``.
"""

from __future__ import annotations

from dspark.training.corpus.math_vocab import (
    BAKED,
    DENOM,
    FOODS,
    HALF_ETC,
    ITEMS,
    PEOPLE,
    article,
    fraction,
    who,
)


def t_book_half_remaining(r, s):
    p, y, h = who(r), r.randint(6, 30), r.randint(10, 100)
    tot = 3 * y + 2 * h
    q = r.choice(
        (
            f"{p.name} is reading a {tot}-page book. Yesterday, {p.he} was able to read {y} pages and "
            f"today, {p.he} read twice as many pages as yesterday. If {p.he} wants to read half of the "
            f"remaining pages tomorrow, how many pages should {p.he} read?",
            f"A book has {tot} pages. {p.name} read {y} pages yesterday and twice as many pages today. "
            f"Tomorrow {p.he} plans to read half of the pages that are left. How many pages will "
            f"{p.he} read tomorrow?",
        )
    )
    td = s(f"Today, {p.name} read @ pages.", y, "*", 2)
    so_far = s(f"So far, {p.he} has read @ pages.", y, "+", td)
    rem = s("There are @ pages remaining.", tot, "-", so_far)
    return q, s(f"Tomorrow, {p.he} should read @ pages.", rem, "/", 2)


def t_fraction_eaten(r, s):
    p, f, k, u = who(r), r.choice(FOODS)[1], r.randint(2, 5), r.randint(3, 20)
    n = k * u
    m = r.randint(1, n - u - 1)
    q = r.choice(
        (
            f"{p.name} bought {n} {f}. {p.He} ate {HALF_ETC[k]} of them and gave {m} to {p.his} "
            f"neighbors. How many {f} does {p.name} have left?",
            f"There were {n} {f} in a basket. {p.name} ate {HALF_ETC[k]} of them, and then {p.he} gave "
            f"{m} away. How many {f} are left in the basket?",
        )
    )
    e = s(f"{p.name} ate @ {f}.", n, "/", k)
    rest = s(f"After eating, there were @ {f}.", n, "-", e)
    return q, s(f"After giving some away, there are @ {f} left.", rest, "-", m)


def t_fraction_given(r, s):
    (p, b), o, (num, den) = r.sample(PEOPLE, 2), r.choice(ITEMS)[1], fraction(r)
    n = den * r.randint(2, 15)
    q = r.choice(
        (
            f"{p.name} has {n} {o}. {p.He} gives {num}/{den} of them to {b.name}. "
            f"How many {o} does {p.name} have left?",
            f"{p.name} collected {n} {o}. {p.He} gave {num}/{den} of {p.his} {o} to {p.his} friend "
            f"{b.name}. How many {o} does {p.name} keep?",
        )
    )
    one = s(f"One {DENOM[den]} of the {o} is @.", n, "/", den)
    g = s(f"{p.name} gives away @ {o}.", num, "*", one)
    return q, s(f"{p.name} has @ {o} left.", n, "-", g)


def t_fraction_of_group(r, s):
    grp, mem, x, y = r.choice(
        [
            ("class", "students", "girls", "boys"),
            ("party", "guests", "adults", "children"),
            ("orchard", "trees", "apple trees", "pear trees"),
            ("club", "members", "seniors", "juniors"),
        ]
    )
    num, den = fraction(r)
    n = den * r.randint(2, 10)
    q = r.choice(
        (
            f"There are {n} {mem} in {article(grp)}. {num}/{den} of them are {x}, and the rest are {y}. "
            f"How many {y} are there?",
            f"Of the {n} {mem} in {article(grp)}, {num}/{den} are {x}. The others are {y}. "
            f"How many {y} are in the {grp}?",
        )
    )
    one = s(f"One {DENOM[den]} of the {mem} is @.", n, "/", den)
    g = s(f"There are @ {x}.", num, "*", one)
    return q, s(f"There are @ {y}.", n, "-", g)


def t_recipe_scale(r, s):
    p, f = who(r), r.choice(BAKED)[1]
    ing = r.choice(
        ["cups of flour", "cups of sugar", "eggs", "tablespoons of butter", "cups of milk"]
    )
    a, b, k = r.randint(2, 5), r.randint(6, 24), r.randint(2, 6)
    q = r.choice(
        (
            f"A recipe uses {a} {ing} to make {b} {f}. {p.name} wants to make {b * k} {f}. "
            f"How many {ing} does {p.he} need?",
            f"{p.name} needs {a} {ing} for every {b} {f} {p.he} bakes. How many {ing} will {p.he} "
            f"use to bake {b * k} {f}?",
        )
    )
    bt = s(f"{p.name} needs to make @ batches.", b * k, "/", b)
    return q, s(f"{p.He} needs @ {ing}.", bt, "*", a)
