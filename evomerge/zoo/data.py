"""Synthetic tasks of the zoo: generators with a difficulty range, deterministic from a seed.

Every task item is a short prompt with a short generative answer scored by exact match:

- ``add``: multi-digit addition, ``"37+485="`` -> ``"522"``.
- ``rev``: string reversal, ``"rev kqzt="`` -> ``"tzqk"``.
- ``lang``: numbers in a toy second language, one syllable per digit, ``"say 409="`` ->
  ``"te zo si"``.
- ``addlang`` (compositional, no expert): the sum written in the toy language,
  ``"say 12+7="`` -> ``"ka ri"``.

``level`` is the difficulty knob (operand digits / string length / number of digits). The base
is pretrained on the easy levels of every task; an expert is fine-tuned on the full range of
its own task; evaluation items span the full range (subgroup = level).
"""

from __future__ import annotations

import random
import string

SYLLABLES = ["zo", "ka", "mi", "pu", "te", "lo", "ri", "nu", "ve", "si"]
LETTERS = string.ascii_lowercase


def to_lang(n: int) -> str:
    return " ".join(SYLLABLES[int(d)] for d in str(n))


def _num(rng: random.Random, digits: int) -> int:
    if digits == 1:
        return rng.randrange(0, 10)
    return rng.randrange(10 ** (digits - 1), 10 ** digits)


def gen_add(rng: random.Random, level: int) -> tuple[str, str]:
    da = level
    db = rng.randint(1, level)
    a, b = _num(rng, da), _num(rng, db)
    if rng.random() < 0.5:
        a, b = b, a
    return f"{a}+{b}=", str(a + b)


def gen_rev(rng: random.Random, level: int) -> tuple[str, str]:
    s = "".join(rng.choice(LETTERS) for _ in range(level))
    return f"rev {s}=", s[::-1]


def gen_lang(rng: random.Random, level: int) -> tuple[str, str]:
    n = _num(rng, level)
    return f"say {n}=", to_lang(n)


def gen_addlang(rng: random.Random, level: int) -> tuple[str, str]:
    p, a = gen_add(rng, level)
    return f"say {p}", to_lang(int(a))


# name -> generator, easy levels (base pretraining), full levels (expert fine-tuning),
# eval levels (search / heldout items), max_new_tokens, has_expert
TASKS: dict[str, dict] = {
    "add": dict(gen=gen_add, easy=(1, 2), full=(1, 2, 3), eval=(2, 3), max_new_tokens=6,
                expert=True),
    "rev": dict(gen=gen_rev, easy=(2, 3, 4), full=(2, 3, 4, 5, 6, 7), eval=(3, 4, 5, 6, 7),
                max_new_tokens=10, expert=True),
    "lang": dict(gen=gen_lang, easy=(1, 2, 3), full=(1, 2, 3, 4, 5, 6), eval=(3, 4, 5, 6),
                 max_new_tokens=20, expert=True),
    "addlang": dict(gen=gen_addlang, easy=(1, 2), full=(1, 2, 3), eval=(2, 3),
                    max_new_tokens=14, expert=False),
}


def sample(task: str, rng: random.Random, levels) -> tuple[str, str, int]:
    spec = TASKS[task]
    level = rng.choice(levels)
    p, a = spec["gen"](rng, level)
    return p, a, level


def make_eval_items(task: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct items over the full difficulty range, balanced over levels."""
    spec = TASKS[task]
    rng = random.Random(f"{seed}-eval-{task}")
    levels = spec["eval"]
    seen: set[str] = set()
    items: list[dict] = []
    i = 0
    tries = 0
    while len(items) < n:
        level = levels[i % len(levels)]
        p, a = spec["gen"](rng, level)
        tries += 1
        if p in seen:
            if tries > 100 * n:
                raise RuntimeError(f"cannot draw {n} distinct items for {task}")
            continue
        seen.add(p)
        items.append({"id": f"{task}-{len(items):04d}", "prompt": p, "answer": a,
                      "subgroup": f"level{level}"})
        i += 1
    rng.shuffle(items)
    for k, it in enumerate(items):
        it["id"] = f"{task}-{k:04d}"
    return items


def generic_text(rng: random.Random) -> str:
    """Generic synthetic text: counting, letter runs, nonce-word sentences."""
    kind = rng.randrange(4)
    if kind == 0:
        start = rng.randrange(0, 90)
        return " ".join(str(start + k) for k in range(rng.randint(3, 7)))
    if kind == 1:
        start = rng.randrange(0, 20)
        return "".join(LETTERS[start:start + rng.randint(3, 7)])
    if kind == 2:
        words = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 5)))
                 for _ in range(rng.randint(2, 5))]
        return " ".join(words) + "."
    n = rng.randrange(0, 100)
    return f"{n} is " + to_lang(n) + "."
