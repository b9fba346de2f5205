"""Math templates about rates, time and measurement: speed, ages, reading, filling, area.

Each ``t_<name>(r, s)`` draws its numbers from ``r`` (a ``random.Random``), records every
solution step through ``s`` (a ``Steps``) and returns ``(question, answer)``.
"""

from __future__ import annotations

from math import gcd

from dspark.training.corpus.math_vocab import PEOPLE, RECTS, who


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
    p, t = who(r), r.randint(2, 6)
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
    p, t1, t2 = who(r), r.randint(2, 5), r.randint(2, 4)
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
    p, k, d, left = who(r), r.randint(5, 30), r.randint(2, 10), r.randint(10, 150)
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


def t_weekly_total(r, s):
    p, n, w = who(r), r.randint(2, 15), r.randint(2, 6)
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
    p, m = who(r), r.choice([15, 20, 30, 45, 60, 90])
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


def t_fill_tank(r, s):
    p, rate, t, cur = who(r), r.randint(2, 20), r.randint(3, 30), r.randint(5, 50)
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
