"""Seeded generator of GSM8K-style grade-school math word problems with worked solutions.

Every solution line restates what it computes with exactly one integer operation written
out as "A op B = C" (op is one of + - * /), and the last line is "The answer is \\boxed{N}.".
All values are non-negative integers and every division is exact. Only random.Random(seed)
is used, so generate_problems(seed, count) is identical in any process; every problem is
self-checked (arithmetic, format, ASCII) before it is returned.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from math import gcd
from typing import NamedTuple


@dataclass(frozen=True)
class MathProblem:
    question: str
    solution: str
    answer: int
    template: str


class Person(NamedTuple):
    name: str
    he: str
    his: str
    him: str
    He: str
    His: str


FEMALE = (
    "Natalia Emma Olivia Ava Sophia Mia Isabella Amelia Harper Ella Grace Chloe Lily Zoe "
    "Nora Hannah Maria Sara Julia Rosa Aisha Priya Mei Yuki Fatima Leah Ruby Alice Clara "
    "Elena Nina Wendy Betty"
).split()
MALE = (
    "Liam Noah James Lucas Ethan Mason Logan Jack Henry Owen Samuel David Daniel Carlos "
    "Diego Omar Ravi Kenji Ali Tom Ben Max Leo Hugo Marco Felix Oscar Peter Kevin Tyler John "
    "Mark Weng"
).split()
PEOPLE = [Person(n, "she", "her", "her", "She", "Her") for n in FEMALE]
PEOPLE += [Person(n, "he", "his", "him", "He", "His") for n in MALE]
_IRREGULAR = {
    "paintbrush": "paintbrushes",
    "scarf": "scarves",
    "watch": "watches",
    "dish": "dishes",
    "glass": "glasses",
    "peach": "peaches",
    "potato": "potatoes",
    "strawberry": "strawberries",
    "cherry": "cherries",
    "sandwich": "sandwiches",
    "tomato": "tomatoes",
}
ITEMS = [
    (w, _IRREGULAR.get(w, w + "s"))
    for w in (
        "clip,pencil,marker,sticker,marble,book,toy car,crayon,eraser,notebook,balloon,seashell,"
        "postcard,stamp,trading card,bracelet,ribbon,button,puzzle,comic book,candle,rubber duck,kite,"
        "yo-yo,flower pot,paintbrush,scarf,watch,dish,hat,glass,toy,ball,key chain,magnet,bookmark"
    ).split(",")
]
FOODS = [
    (w, _IRREGULAR.get(w, w + "s"))
    for w in (
        "cookie,cupcake,apple,orange,muffin,candy bar,banana,peach,strawberry,cherry,donut,brownie,"
        "pretzel,sandwich,pie,tomato,potato,lemon,pear,cracker"
    ).split(",")
]
BAKED = [f for f in FOODS if f[0] in "cookie cupcake muffin brownie pretzel pie donut".split()]
THINGS = ITEMS + FOODS
BIG_ITEMS = [
    "bike",
    "jacket",
    "pair of shoes",
    "video game",
    "backpack",
    "lamp",
    "guitar",
    "tablet",
    "chair",
    "skateboard",
    "tent",
    "coat",
    "board game",
    "scooter",
    "camera",
]
SHOPS = [
    "store",
    "mall",
    "toy store",
    "bookstore",
    "market",
    "corner shop",
    "supermarket",
    "gift shop",
    "school fair",
]
MONTHS = (
    "January February March April May June July August September October November December"
).split()
JOBS = [
    "babysitting",
    "tutoring",
    "walking dogs",
    "mowing lawns",
    "washing cars",
    "working at the library",
]
DENOM = {2: "half", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth", 8: "eighth", 10: "tenth"}
HALF_ETC = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}
RECTS = [
    ("garden", "feet"),
    ("room", "feet"),
    ("rug", "feet"),
    ("field", "meters"),
    ("playground", "meters"),
    ("patio", "yards"),
]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class _Sol:
    """Collects solution lines; each call performs one exact operation and records it at '@'."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.last = -1

    def __call__(self, text: str, a: int, op: str, b: int, money: bool = False) -> int:
        if op == "/":
            assert b > 0 and a % b == 0, (a, b)
        v = {"+": a + b, "-": a - b, "*": a * b, "/": a // max(b, 1)}[op]
        assert v >= 0, (a, op, b)
        self.lines.append(text.replace("@", f"{a} {op} {b} = {'$' if money else ''}{v}"))
        self.last = v
        return v


def _who(r: random.Random) -> Person:
    return r.choice(PEOPLE)


def _fraction(r: random.Random) -> tuple[int, int]:
    den = r.choice([3, 4, 5, 6, 8, 10])
    return r.choice([x for x in range(1, den) if gcd(x, den) == 1]), den


# Templates: t_<name>(r, s) returns (question, answer); the steps are recorded through s.


def t_half_as_many(r, s):
    p, o, i, n = _who(r), r.choice(ITEMS)[1], r.randrange(11), 2 * r.randint(8, 60)
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


def t_change_from_bill(r, s):
    p, o, c = _who(r), r.choice(ITEMS)[1], r.randint(2, 12)
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
    p, job, rate, h, d = _who(r), r.choice(JOBS), r.randint(8, 25), r.randint(2, 8), r.randint(2, 5)
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


def t_share_equally(r, s):
    p, o, k, e = _who(r), r.choice(THINGS)[1], r.randint(3, 8), r.randint(2, 12)
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


def t_percent_discount(r, s):
    p, it, pct = _who(r), r.choice(BIG_ITEMS), r.choice([10, 20, 25, 30, 40, 50])
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


def t_age_in_future(r, s):
    (a, b), x, y, n = r.sample(PEOPLE, 2), r.randint(2, 30), r.randint(2, 15), r.randint(4, 40)
    q = r.choice(
        (
            f"{a.name} is {n} years old. {b.name} is {x} years older than {a.name}. "
            f"How old will {b.name} be in {y} years?",
            f"{b.name} is {x} years older than {a.name}. If {a.name} is {n} years old now, "
            f"how old will {b.name} be {y} years from now?",
            f"{a.name} is {n}. {a.His} cousin {b.name} is {x} years older. "
            f"How old will {b.name} be in {y} years?",
        )
    )
    now = s(f"{b.name} is @ years old now.", n, "+", x)
    return q, s(f"In {y} years, {b.name} will be @ years old.", now, "+", y)


def t_speed_distance(r, s):
    p, t = _who(r), r.randint(2, 6)
    if r.random() < 0.3:
        veh, lo, hi = r.choice(
            [("car", 30, 70), ("bus", 30, 60), ("train", 50, 90), ("boat", 10, 30)]
        )
        v = r.randint(lo, hi)
        q = f"A {veh} travels at a speed of {v} miles per hour. How far does it go in {t} hours?"
        return q, s(f"In {t} hours, the {veh} travels @ miles.", v, "*", t)
    verb, lo, hi = r.choice(
        [("drives", 30, 65), ("rides a bike", 8, 16), ("jogs", 4, 8), ("sails", 10, 25)]
    )
    v = r.randint(lo, hi)
    q = r.choice(
        (
            f"{p.name} {verb} at {v} miles per hour for {t} hours. How many miles does {p.he} travel?",
            f"If {p.name} {verb} for {t} hours at a steady {v} miles per hour, how many miles will "
            f"{p.he} cover?",
        )
    )
    return q, s(f"In {t} hours, {p.name} travels @ miles.", v, "*", t)


def t_two_leg_trip(r, s):
    p, t1, t2 = _who(r), r.randint(2, 5), r.randint(2, 4)
    v1, v2 = 5 * r.randint(6, 14), 5 * r.randint(4, 12)
    q = r.choice(
        (
            f"{p.name} drives at {v1} miles per hour for {t1} hours, and then at {v2} miles per hour "
            f"for {t2} hours. How many miles does {p.he} drive in total?",
            f"On a road trip, {p.name} drove {t1} hours at {v1} miles per hour. After lunch, {p.he} "
            f"drove {t2} more hours at {v2} miles per hour. How far did {p.he} drive altogether?",
        )
    )
    d1 = s(f"First, {p.name} drives @ miles.", v1, "*", t1)
    d2 = s(f"Then, {p.he} drives @ miles.", v2, "*", t2)
    return q, s(f"In total, {p.he} drives @ miles.", d1, "+", d2)


def t_pages_left(r, s):
    p, k, d, left = _who(r), r.randint(5, 30), r.randint(2, 10), r.randint(10, 150)
    tot = k * d + left
    q = r.choice(
        (
            f"{p.name} is reading a {tot}-page book. {p.He} reads {k} pages every day for {d} days. "
            f"How many pages does {p.he} still have to read?",
            f"A book has {tot} pages. {p.name} reads {k} pages a day. After {d} days, how many pages "
            f"are left for {p.him} to read?",
        )
    )
    rd = s(f"In {d} days, {p.name} reads @ pages.", k, "*", d)
    return q, s("There are @ pages left.", tot, "-", rd)


def t_book_half_remaining(r, s):
    p, y, h = _who(r), r.randint(6, 30), r.randint(10, 100)
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


def t_savings_goal(r, s):
    p, it, w, have = _who(r), r.choice(BIG_ITEMS), r.randint(5, 25), r.randint(10, 100)
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


def t_fraction_eaten(r, s):
    p, f, k, u = _who(r), r.choice(FOODS)[1], r.randint(2, 5), r.randint(3, 20)
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
    (p, b), o, (num, den) = r.sample(PEOPLE, 2), r.choice(ITEMS)[1], _fraction(r)
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
    num, den = _fraction(r)
    n = den * r.randint(2, 10)
    q = r.choice(
        (
            f"There are {n} {mem} in {_a(grp)}. {num}/{den} of them are {x}, and the rest are {y}. "
            f"How many {y} are there?",
            f"Of the {n} {mem} in {_a(grp)}, {num}/{den} are {x}. The others are {y}. "
            f"How many {y} are in the {grp}?",
        )
    )
    one = s(f"One {DENOM[den]} of the {mem} is @.", n, "/", den)
    g = s(f"There are @ {x}.", num, "*", one)
    return q, s(f"There are @ {y}.", n, "-", g)


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
    p, o, c = _who(r), r.choice(ITEMS)[1], r.choice(["packs", "boxes", "bags"])
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


def t_boxes_sold(r, s):
    p, f = _who(r), r.choice(BAKED)[1]
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


def t_rectangle_area(r, s):
    (thing, u), w, ln = r.choice(RECTS), r.randint(3, 20), r.randint(4, 30)
    q = r.choice(
        (
            f"A rectangular {thing} is {ln} {u} long and {w} {u} wide. What is the area of the "
            f"{thing} in square {u}?",
            f"The {thing} is a rectangle measuring {ln} {u} by {w} {u}. How many square {u} is its "
            "area?",
        )
    )
    return q, s(f"The area is @ square {u}.", ln, "*", w)


def t_rectangle_perimeter(r, s):
    (thing, u), ln, w = r.choice(RECTS), r.randint(5, 40), r.randint(3, 30)
    q = r.choice(
        (
            f"A rectangular {thing} is {ln} {u} long and {w} {u} wide. How many {u} of fence are "
            "needed to go all the way around it?",
            f"What is the perimeter of a rectangular {thing} that measures {ln} {u} by {w} {u}?",
        )
    )
    a = s(f"The two long sides are @ {u}.", 2, "*", ln)
    b = s(f"The two short sides are @ {u}.", 2, "*", w)
    return q, s(f"The perimeter is @ {u}.", a, "+", b)


def t_doubling_tripling(r, s):
    p, o, n = _who(r), r.choice(THINGS)[1], r.randint(5, 40)
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


def t_shopping_left(r, s):
    p, ((_, o1), (_, o2)) = _who(r), r.sample(THINGS, 2)
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
    p, z, c = _who(r), r.randint(2, 6), r.randint(6, 20)
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
    p, o, n, c = _who(r), r.choice(THINGS)[1], r.randint(5, 40), r.randint(1, 10)
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


def t_animal_legs(r, s):
    p, n, m = _who(r), r.randint(3, 30), r.randint(2, 20)
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


def t_recipe_scale(r, s):
    p, f = _who(r), r.choice(BAKED)[1]
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


def t_weekly_total(r, s):
    p, n, w = _who(r), r.randint(2, 15), r.randint(2, 6)
    verb, inf, unit = r.choice(
        [
            ("runs", "run", "miles"),
            ("drinks", "drink", "glasses of water"),
            ("reads", "read", "pages"),
            ("does", "do", "push-ups"),
            ("walks", "walk", "kilometers"),
            ("folds", "fold", "paper cranes"),
            ("bakes", "bake", "loaves of bread"),
        ]
    )
    q = r.choice(
        (
            f"{p.name} {verb} {n} {unit} every day. How many {unit} does {p.he} {inf} in {w} weeks?",
            f"Every day, {p.name} {verb} {n} {unit}. How many {unit} is that in {w} weeks?",
        )
    )
    wk = s(f"In one week, {p.he} {verb} @ {unit}.", n, "*", 7)
    return q, s(f"In {w} weeks, {p.he} {verb} @ {unit}.", wk, "*", w)


def t_minutes_to_hours(r, s):
    p, m = _who(r), r.choice([15, 20, 30, 45, 60, 90])
    step = 60 // gcd(m, 60)
    d = r.choice([x for x in range(2, 15) if x % step == 0 and m * x >= 120])
    act = r.choice(
        [
            "practices the piano",
            "plays soccer",
            "studies math",
            "swims",
            "draws",
            f"rides {p.his} bike",
        ]
    )
    q = r.choice(
        (
            f"{p.name} {act} for {m} minutes every day for {d} days. How many hours does {p.he} "
            "spend in total?",
            f"For {d} days, {p.name} {act} {m} minutes a day. How many hours is that altogether?",
        )
    )
    mins = s(f"{p.name} spends @ minutes.", m, "*", d)
    return q, s("That is @ hours.", mins, "/", 60)


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


def t_fill_tank(r, s):
    p, rate, t, cur = _who(r), r.randint(2, 20), r.randint(3, 30), r.randint(5, 50)
    tank = r.choice(["pool", "fish tank", "water tank", "bathtub", "rain barrel"])
    one, unit = r.choice([("gallon", "gallons"), ("liter", "liters")])
    cap = cur + rate * t
    q = r.choice(
        (
            f"A {tank} holds {cap} {unit} of water. It already has {cur} {unit} in it. {p.name} "
            f"fills it with a hose that adds {rate} {unit} per minute. How many minutes will it take "
            f"to fill the {tank}?",
            f"{p.name} is filling a {cap}-{one} {tank} that already contains {cur} {unit}. Water flows "
            f"in at {rate} {unit} each minute. How many minutes until the {tank} is full?",
        )
    )
    need = s(f"The {tank} needs @ more {unit}.", cap, "-", cur)
    return q, s("It takes @ minutes.", need, "/", rate)


TEMPLATES: list[tuple[str, Callable[[random.Random, _Sol], tuple[str, int]]]] = [
    (k[2:], v) for k, v in list(globals().items()) if k.startswith("t_") and callable(v)
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
        s = _Sol()
        question, ans = fn(r, s)
        assert ans == s.last and ans >= 0, (name, ans)
        solution = "\n".join([*s.lines, f"The answer is \\boxed{{{ans}}}."])
        prob = MathProblem(question, solution, ans, name)
        _check(prob)
        out.append(prob)
    return out


def format_prompt(p: MathProblem) -> str:
    return p.question
