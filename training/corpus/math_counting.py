"""Math templates about counting things: giving away, packing, sharing and comparing.

Each ``t_<name>(r, s)`` draws its numbers from ``r`` (a ``random.Random``), records every
solution step through ``s`` (a ``Steps``) and returns ``(question, answer)``.
"""

from __future__ import annotations

from dspark.training.corpus.math_vocab import ITEMS, MONTHS, PEOPLE, SHOPS, THINGS, who


def t_half_as_many(r, s):
    p, o, i, n = who(r), r.choice(ITEMS)[1], r.randrange(11), 2 * r.randint(8, 60)
    m1, m2 = MONTHS[i], MONTHS[i + 1]
    q = r.choice(
        (
            f"{p.name} sold {o} to {n} of {p.his} friends in {m1}, and then {p.he} sold half as many "
            f"{o} in {m2}. How many {o} did {p.name} sell altogether?",
            f"In {m1}, {p.name} sold {n} {o}. In {m2}, {p.he} sold half as many {o} as in {m1}. "
            f"How many {o} did {p.he} sell in {m1} and {m2} combined?",
            f"{p.name} sold {n} {o} at the {r.choice(SHOPS)} in {m1}. In {m2}, {p.he} sold only half "
            f"as many. What is the total number of {o} {p.name} sold in the two months?",
        )
    )
    h = s(f"In {m2}, {p.name} sold @ {o}.", n, "/", 2)
    return q, s(f"Altogether, {p.name} sold @ {o}.", n, "+", h)


def t_share_equally(r, s):
    p, o, k, e = who(r), r.choice(THINGS)[1], r.randint(3, 8), r.randint(2, 12)
    t, v = k * e, r.randrange(3)
    if v == 2:
        q = (
            f"{p.name} and {k - 1} of {p.his} friends share {t} {o} equally. "
            f"How many {o} does each person get?"
        )
        k = s(f"{p.name} and {p.his} friends make @ people.", k - 1, "+", 1)
        return q, s(f"Each person gets @ {o}.", t, "/", k)
    q = (
        f"{p.name} has {t} {o} and wants to share them equally among {k} friends. "
        f"How many {o} does each friend get?",
        f"A bag holds {t} {o}. If {p.name} splits them evenly among {p.his} {k} friends, how many "
        f"{o} will each friend receive?",
    )[v]
    return q, s(f"Each friend gets @ {o}.", t, "/", k)


def t_remaining_after_removals(r, s):
    (p, b), o, n = r.sample(PEOPLE, 2), r.choice(THINGS)[1], r.randint(40, 200)
    x, y, z = r.randint(5, n // 3), r.randint(3, n // 4), r.randint(1, n // 6)
    q = r.choice(
        (
            f"{p.name} had {n} {o}. {p.He} gave {x} to {b.name}, gave {y} to {p.his} brother, and "
            f"lost {z}. How many {o} does {p.name} have now?",
            f"{p.name} started the week with {n} {o}. On Monday {p.he} gave {b.name} {x} {o}, on "
            f"Tuesday {p.he} gave away {y} more, and on Wednesday {p.he} lost {z}. "
            f"How many {o} are left?",
        )
    )
    a1 = s(f"After giving {x} to {b.name}, {p.name} has @ {o}.", n, "-", x)
    a2 = s(f"After giving away {y} more, {p.he} has @ {o}.", a1, "-", y)
    return q, s(f"After losing {z}, {p.he} has @ {o}.", a2, "-", z)


def t_packs_total(r, s):
    p, o, c = who(r), r.choice(ITEMS)[1], r.choice(["packs", "boxes", "bags"])
    k, per, had = r.randint(2, 9), r.randint(4, 24), r.randint(1, 30)
    q = r.choice(
        (
            f"{p.name} buys {k} {c} of {o}. Each of the {c} has {per} {o}. {p.He} already had "
            f"{had} {o}. How many {o} does {p.he} have now?",
            f"{p.name} had {had} {o}. Then {p.he} bought {k} {c} with {per} {o} in each. "
            f"How many {o} does {p.name} have in all?",
        )
    )
    got = s(f"{p.name} bought @ {o}.", k, "*", per)
    return q, s(f"Now {p.he} has @ {o}.", had, "+", got)


def t_doubling_tripling(r, s):
    p, o, n = who(r), r.choice(THINGS)[1], r.randint(5, 40)
    verb, inf = r.choice(
        [("picked", "pick"), ("collected", "collect"), ("made", "make"), ("sold", "sell")]
    )
    q = r.choice(
        (
            f"{p.name} {verb} {n} {o} on Monday. On Tuesday, {p.he} {verb} twice as many as on "
            f"Monday. On Wednesday, {p.he} {verb} three times as many as on Monday. How many {o} did "
            f"{p.he} {inf} in total?",
            f"On Monday {p.name} {verb} {n} {o}. {p.He} doubled that number on Tuesday and tripled "
            f"the Monday number on Wednesday. How many {o} did {p.name} {inf} over the three days?",
        )
    )
    t = s(f"On Tuesday, {p.name} {verb} @ {o}.", n, "*", 2)
    w = s(f"On Wednesday, {p.he} {verb} @ {o}.", n, "*", 3)
    mt = s(f"On Monday and Tuesday, {p.he} {verb} @ {o}.", n, "+", t)
    return q, s(f"In total, {p.he} {verb} @ {o}.", mt, "+", w)


def t_how_many_more(r, s):
    (a, b), o, n, k = r.sample(PEOPLE, 2), r.choice(THINGS)[1], r.randint(5, 60), r.randint(2, 5)
    q = r.choice(
        (
            f"{a.name} has {n} {o}. {b.name} has {k} times as many {o} as {a.name}. How many more "
            f"{o} does {b.name} have than {a.name}?",
            f"{b.name} owns {k} times as many {o} as {a.name}, who owns {n}. How many more {o} does "
            f"{b.name} own?",
        )
    )
    bb = s(f"{b.name} has @ {o}.", n, "*", k)
    return q, s(f"{b.name} has @ more {o} than {a.name}.", bb, "-", n)


def t_three_people_total(r, s):
    (a, b, c), o, n, k = r.sample(PEOPLE, 3), r.choice(THINGS)[1], r.randint(5, 50), r.randint(2, 4)
    m = r.randint(1, n * k - 1)
    q = r.choice(
        (
            f"{a.name} has {n} {o}. {b.name} has {k} times as many {o} as {a.name}, and {c.name} has "
            f"{m} fewer {o} than {b.name}. How many {o} do they have altogether?",
            f"{b.name} collected {k} times as many {o} as {a.name}. {c.name} collected {m} fewer than "
            f"{b.name}. If {a.name} collected {n} {o}, how many {o} did the three of them collect?",
        )
    )
    bb = s(f"{b.name} has @ {o}.", n, "*", k)
    cc = s(f"{c.name} has @ {o}.", bb, "-", m)
    ab = s(f"{a.name} and {b.name} have @ {o}.", n, "+", bb)
    return q, s(f"Altogether, they have @ {o}.", ab, "+", cc)


def t_animal_legs(r, s):
    p, n, m = who(r), r.randint(3, 30), r.randint(2, 20)
    two = r.choice(["chickens", "ducks", "geese", "turkeys"])
    four = r.choice(["cows", "goats", "pigs", "horses", "sheep", "dogs"])
    q = r.choice(
        (
            f"{p.name} has {n} {two} and {m} {four} on {p.his} farm. How many legs do the animals "
            "have in total?",
            f"On a farm there are {n} {two} and {m} {four}. How many animal legs are there "
            "altogether?",
        )
    )
    a = s(f"The {two} have @ legs.", n, "*", 2)
    b = s(f"The {four} have @ legs.", m, "*", 4)
    return q, s("In total, there are @ legs.", a, "+", b)


def t_more_than_twice(r, s):
    (a, b), o, n, x = r.sample(PEOPLE, 2), r.choice(THINGS)[1], r.randint(5, 60), r.randint(2, 20)
    q = r.choice(
        (
            f"{a.name} has {n} {o}. {b.name} has {x} more than twice as many {o} as {a.name}. "
            f"How many {o} do they have together?",
            f"{b.name} has {x} more {o} than twice the number {a.name} has. If {a.name} has {n} {o}, "
            f"how many {o} do the two of them have in all?",
        )
    )
    d = s(f"Twice {a.name}'s {o} is @.", n, "*", 2)
    bb = s(f"{b.name} has @ {o}.", d, "+", x)
    return q, s(f"Together, they have @ {o}.", n, "+", bb)
