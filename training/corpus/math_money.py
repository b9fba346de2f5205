"""Math templates about money: prices, change, wages, discounts, savings and profit.

Each ``t_<name>(r, s)`` draws its numbers from ``r`` (a ``random.Random``), records every
solution step through ``s`` (a ``Steps``) and returns ``(question, answer)``.
"""

from __future__ import annotations

from dspark.training.corpus.math_vocab import BAKED, BIG_ITEMS, ITEMS, JOBS, SHOPS, THINGS, who


def t_change_from_bill(r, s):
    p, o, c = who(r), r.choice(ITEMS)[1], r.randint(2, 12)
    n = r.randint(2, min(9, 99 // c))
    bill = r.choice([b for b in (10, 20, 50, 100) if b > n * c])
    q = r.choice(
        (
            f"{p.name} buys {n} {o} at ${c} each. {p.He} pays with a ${bill} bill. "
            f"How much change does {p.he} get back?",
            f"At the {r.choice(SHOPS)}, {o} cost ${c} each. {p.name} buys {n} of them and hands the "
            f"cashier ${bill}. How much change should {p.name} receive?",
            f"{p.name} has ${bill}. {p.He} spends some of it on {n} {o} that cost ${c} each. "
            f"How many dollars does {p.he} have left?",
        )
    )
    cost = s(f"The {o} cost @.", n, "*", c, True)
    return q, s(f"{p.name} has @ left.", bill, "-", cost, True)


def t_hourly_wage(r, s):
    p, job, rate, h, d = who(r), r.choice(JOBS), r.randint(8, 25), r.randint(2, 8), r.randint(2, 5)
    q = r.choice(
        (
            f"{p.name} earns ${rate} an hour {job}. {p.He} works {h} hours a day for {d} days. "
            f"How much money does {p.he} earn?",
            f"{p.name} is paid ${rate} per hour for {job}. Over {d} days, {p.he} works {h} hours each "
            f"day. What are {p.his} total earnings?",
            f"For {job}, {p.name} makes ${rate} every hour. If {p.he} spends {h} hours a day {job} "
            f"for {d} days, how much does {p.he} make?",
        )
    )
    day = s(f"Each day, {p.name} earns @.", rate, "*", h, True)
    return q, s(f"In {d} days, {p.he} earns @.", day, "*", d, True)


def t_percent_discount(r, s):
    p, it, pct = who(r), r.choice(BIG_ITEMS), r.choice([10, 20, 25, 30, 40, 50])
    price = 20 * r.randint(2, 15)
    q = r.choice(
        (
            f"A {it} at the {r.choice(SHOPS)} normally costs ${price}. It is on sale for {pct}% off. "
            f"How much does {p.name} pay for the {it}?",
            f"{p.name} wants to buy a {it} that costs ${price}. The store is offering a {pct}% "
            f"discount. How much will {p.he} pay after the discount?",
            f"The price of a {it} is ${price}. {p.name} has a coupon for {pct}% off. How many dollars "
            f"does {p.name} spend on the {it}?",
        )
    )
    if pct in (25, 50):
        d = s(f"{pct}% of ${price} is @.", price, "/", 100 // pct, True)
    else:
        d = s(f"10% of ${price} is @.", price, "/", 10, True)
        if pct > 10:
            d = s(f"{pct}% of ${price} is @.", pct // 10, "*", d, True)
    return q, s(f"After the discount, the {it} costs @.", price, "-", d, True)


def t_savings_goal(r, s):
    p, it, w, have = who(r), r.choice(BIG_ITEMS), r.randint(5, 25), r.randint(10, 100)
    goal = have + w * r.randint(3, 20)
    q = r.choice(
        (
            f"{p.name} is saving money for a {it} that costs ${goal}. {p.He} already has ${have}. If "
            f"{p.he} saves ${w} each week, how many weeks will it take {p.him} to have enough money?",
            f"A {it} costs ${goal}. {p.name} has saved ${have} so far and puts away ${w} every week. "
            f"How many more weeks does {p.he} need to save?",
        )
    )
    need = s(f"{p.name} still needs @.", goal, "-", have, True)
    return q, s(f"It will take {p.him} @ weeks.", need, "/", w)


def t_boxes_sold(r, s):
    p, f = who(r), r.choice(BAKED)[1]
    per, nb, price = r.randint(4, 12), r.randint(3, 20), r.randint(3, 15)
    q = r.choice(
        (
            f"{p.name} baked {per * nb} {f} and packed them into boxes of {per}. {p.He} sold every "
            f"box for ${price}. How much money did {p.he} make?",
            f"{p.name} has {per * nb} {f}. {p.He} puts {per} {f} in each box and sells each box for "
            f"${price}. How many dollars does {p.he} earn if {p.he} sells all the boxes?",
        )
    )
    b = s(f"{p.name} filled @ boxes.", per * nb, "/", per)
    return q, s(f"{p.He} made @.", b, "*", price, True)


def t_shopping_left(r, s):
    p, ((_, o1), (_, o2)) = who(r), r.sample(THINGS, 2)
    a, pa, b, pb = r.randint(2, 6), r.randint(1, 15), r.randint(2, 6), r.randint(1, 15)
    money = r.choice([m for m in (50, 100, 200) if m > a * pa + b * pb])
    q = r.choice(
        (
            f"{p.name} has ${money}. {p.He} buys {a} {o1} for ${pa} each and {b} {o2} for ${pb} "
            f"each. How much money does {p.he} have left?",
            f"{p.name} went to the {r.choice(SHOPS)} with ${money}. {p.He} bought {a} {o1} at ${pa} "
            f"each and {b} {o2} at ${pb} each. How many dollars did {p.he} have left after shopping?",
        )
    )
    c1 = s(f"The {o1} cost @.", a, "*", pa, True)
    c2 = s(f"The {o2} cost @.", b, "*", pb, True)
    tot = s(f"{p.name} spent @ in total.", c1, "+", c2, True)
    return q, s(f"{p.He} has @ left.", money, "-", tot, True)


def t_split_cost(r, s):
    p, z, c = who(r), r.randint(2, 6), r.randint(6, 20)
    k = r.choice([d for d in range(2, 9) if z * c % d == 0])
    food = r.choice(["pizzas", "cakes", "pies", "buckets of chicken"])
    q = r.choice(
        (
            f"{p.name} and {p.his} friends ordered {z} {food} that cost ${c} each. They split the "
            f"bill equally among {k} people. How much does each person pay?",
            f"A group of {k} friends buys {z} {food} at ${c} each and shares the cost evenly. "
            "How many dollars does each friend pay?",
        )
    )
    tot = s(f"The {food} cost @ in total.", z, "*", c, True)
    return q, s("Each person pays @.", tot, "/", k, True)


def t_profit(r, s):
    p, o, n, c = who(r), r.choice(THINGS)[1], r.randint(5, 40), r.randint(1, 10)
    sp = c + r.randint(1, 10)
    q = r.choice(
        (
            f"{p.name} buys {n} {o} for ${c} each and sells all of them for ${sp} each. "
            f"How much profit does {p.he} make?",
            f"At the {r.choice(['market', 'school fair', 'flea market'])}, {p.name} sold {n} {o} for "
            f"${sp} each. {p.He} had paid ${c} for each one. What was {p.his} profit?",
        )
    )
    cost = s(f"The {o} cost {p.name} @.", n, "*", c, True)
    rev = s(f"{p.He} sells them for @.", n, "*", sp, True)
    return q, s(f"{p.His} profit is @.", rev, "-", cost, True)
