"""Synthetic tasks of the zoo: generators with a difficulty range, deterministic from a seed.

Every task item is a short prompt with a short generative answer scored by exact match:

- ``lang``: numbers in a toy second language, one syllable per digit: ``"say 409="`` ->
  ``"te zo si"``.
- ``cipher``: a fixed substitution cipher on letters: ``"enc abc="`` -> ``"qwe"``.
- ``upper``: upper-casing: ``"up kaz="`` -> ``"KAZ"``.
- ``upenc`` (compositional, no expert): the cipher written in upper case,
  ``"up enc abc="`` -> ``"QWE"`` (the skill of the cipher expert in the "language" of the
  upper expert).

Multiple choice (scored by log-likelihood; no expert, no training data of its own):

- ``cipher_choice``: the cipher's prompts with the right ciphertext and 3 distractors, each the
  ciphertext of another plaintext of the same length that differs from the prompt's in one
  letter of the half of the alphabet the base never saw (so only the full mapping tells
  them apart; items whose plaintext has none of those letters are left out).

Each task is knowledge of a symbol mapping. The base is pretrained on every task but only over
half of the alphabet (digits 0-4, letters a-m), so it knows every format and half of every
mapping; an expert is fine-tuned on its own task over the whole alphabet. Evaluation items
use the whole alphabet, with lengths 3-5 (``subgroup`` = ``level<length>``), so the base
answers only the items that happen to avoid the unknown half.
"""

from __future__ import annotations

import random
import string

SYLLABLES = ["zo", "ka", "mi", "pu", "te", "lo", "ri", "nu", "ve", "si"]
LETTERS = string.ascii_lowercase
# the cipher: a fixed permutation of the alphabet (fixed here, not drawn from the seed, so the
# task is the same for every zoo)
CIPHER = dict(zip(LETTERS, "qwertyuiopasdfghjklzxcvbnm"))
# what the base is pretrained on ("easy"): digits 0-4, letters a-m; experts see all
EASY_DIGITS = "01234"
EASY_LETTERS = LETTERS[:13]


def to_lang(n: int | str) -> str:
    return " ".join(SYLLABLES[int(d)] for d in str(n))


def _digits(rng: random.Random, n: int, alphabet: str) -> str:
    first = [d for d in alphabet if d != "0"]
    return rng.choice(first) + "".join(rng.choice(alphabet) for _ in range(n - 1))


def _letters(rng: random.Random, n: int, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def gen_lang(rng: random.Random, level: int, easy: bool = False) -> tuple[str, str]:
    """Numbers in a toy second language, one syllable per digit: "say 409=" -> "te zo si"."""
    n = _digits(rng, level, EASY_DIGITS if easy else "0123456789")
    return f"say {n}=", to_lang(n)


def gen_cipher(rng: random.Random, level: int, easy: bool = False) -> tuple[str, str]:
    """A substitution cipher on letters: "enc abc=" -> "qwe"."""
    s = _letters(rng, level, EASY_LETTERS if easy else LETTERS)
    return f"enc {s}=", "".join(CIPHER[c] for c in s)


def gen_upper(rng: random.Random, level: int, easy: bool = False) -> tuple[str, str]:
    """Upper-casing: "up kaz=" -> "KAZ"."""
    s = _letters(rng, level, EASY_LETTERS if easy else LETTERS)
    return f"up {s}=", s.upper()


def gen_upenc(rng: random.Random, level: int, easy: bool = False) -> tuple[str, str]:
    """Compositional: the cipher written in upper case: "up enc abc=" -> "QWE"."""
    s = _letters(rng, level, EASY_LETTERS if easy else LETTERS)
    return f"up enc {s}=", "".join(CIPHER[c] for c in s).upper()


# The training tasks (pretraining mixture, experts, merge-aware loss; see build.py).
# name -> generator, levels (length) for base pretraining ("easy", restricted alphabet),
# expert fine-tuning ("full", whole alphabet) and evaluation items (whole alphabet),
# max_new_tokens, has_expert
TASKS: dict[str, dict] = {
    "lang": dict(gen=gen_lang, easy=(1, 2, 3, 4, 5), full=(1, 2, 3, 4, 5), eval=(3, 4, 5),
                 max_new_tokens=16, expert=True),
    "cipher": dict(gen=gen_cipher, easy=(2, 3, 4, 5), full=(2, 3, 4, 5), eval=(3, 4, 5),
                   max_new_tokens=7, expert=True),
    "upper": dict(gen=gen_upper, easy=(2, 3, 4, 5), full=(2, 3, 4, 5), eval=(3, 4, 5),
                  max_new_tokens=7, expert=True),
    "upenc": dict(gen=gen_upenc, easy=(2, 3, 4, 5), full=(2, 3, 4, 5), eval=(3, 4, 5),
                  max_new_tokens=7, expert=False),
}


# Multiple-choice tasks built from a training task's items (evaluation only: never trained on,
# so adding one leaves the models unchanged). name -> source task, choices per item.
CHOICE_TASKS: dict[str, dict] = {
    "cipher_choice": dict(source="cipher", n_choices=4),
}
HARD_LETTERS = LETTERS[13:]


def make_choice_items(task: str, source_items: list[dict], seed: int) -> list[dict]:
    """Multiple-choice versions of ``source_items`` (items of the cipher task): the right
    ciphertext among distractors that each change one hard letter (n-z) of the plaintext
    into another. Items without a hard letter are skipped; ids and subgroups are kept."""
    spec = CHOICE_TASKS[task]
    assert spec["source"] == "cipher", spec
    k = spec["n_choices"]
    rng = random.Random(f"{seed}-choice-{task}")
    out = []
    for it in source_items:
        plain = it["prompt"][len("enc "):-1]
        hard = [i for i, c in enumerate(plain) if c in HARD_LETTERS]
        if not hard:
            continue
        answer = it["answer"]
        choices = [answer]
        while len(choices) < k:
            i = rng.choice(hard)
            alt = plain[:i] + rng.choice(HARD_LETTERS.replace(plain[i], "")) + plain[i + 1:]
            c = "".join(CIPHER[ch] for ch in alt)
            if c not in choices:
                choices.append(c)
        rng.shuffle(choices)
        out.append({"id": it["id"].replace(spec["source"], task, 1), "prompt": it["prompt"],
                    "choices": choices, "answer": choices.index(answer),
                    "subgroup": it["subgroup"]})
    return out


def sample(task: str, rng: random.Random, kind: str) -> tuple[str, str, int]:
    """One training example of ``task``: kind "easy" (base) or "full" (expert)."""
    spec = TASKS[task]
    level = rng.choice(spec[kind])
    p, a = spec["gen"](rng, level, easy=(kind == "easy"))
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
    n = _digits(rng, rng.randint(1, 3), EASY_DIGITS)
    return f"{n} is " + to_lang(n) + "."
