"""Vocabulary and step recorder shared by the math word-problem templates.

The lists here are sampled by index through ``random.Random``, so their contents and
order are part of the seed -> problem mapping: editing them changes every generated
corpus.
"""

from __future__ import annotations

import random
from math import gcd
from typing import NamedTuple


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


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class Steps:
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


def who(r: random.Random) -> Person:
    return r.choice(PEOPLE)


def fraction(r: random.Random) -> tuple[int, int]:
    den = r.choice([3, 4, 5, 6, 8, 10])
    return r.choice([x for x in range(1, den) if gcd(x, den) == 1]), den
