"""numbers-fr: a generated English → French corpus of number phrases (offline, deterministic).

``french_number`` writes numbers in French words with the traditional rules (before the 1990
reform): *vingt et un*, *soixante-dix*, *quatre-vingts* but *quatre-vingt-un*, *deux cents* but
*deux cent un*, invariable *mille*, *un* → *une* before a feminine noun. ``english_number`` writes
them in US English. ``numbers_fr`` puts them in sentence templates with nouns of both genders,
singular and plural, punctuated as Tatoeba's French is (a narrow no-break space before ``?`` and
``!``), one ``English<TAB>French`` pair per line like ``fra.txt``.
"""

from __future__ import annotations

import random

from divekit.errors import DivekitError

NUMBERS_FR_SIZE = 20_000  # pairs in the registered numbers-fr dataset

_EN_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_FR_UNITS = (
    "zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize"
).split()
_FR_TENS = {2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante"}
MAX_NUMBER = 999_999


def _check_number(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_NUMBER:
        raise DivekitError(f"number must be an integer in 0..{MAX_NUMBER}, got {n!r}")


def english_number(n: int) -> str:
    """``n`` in English words, US style: ``1990`` → ``'one thousand nine hundred ninety'``."""
    _check_number(n)
    if n < 20:
        return _EN_UNITS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return _EN_TENS[tens] + (f"-{_EN_UNITS[unit]}" if unit else "")
    for size, word in ((1000, "thousand"), (100, "hundred")):
        if n >= size:
            head, rest = divmod(n, size)
            return f"{english_number(head)} {word}" + (f" {english_number(rest)}" if rest else "")
    raise AssertionError(n)  # unreachable


def _fr_below_100(n: int, final: bool) -> str:
    if n <= 16:
        return _FR_UNITS[n]
    if n < 20:
        return "dix-" + _FR_UNITS[n - 10]
    if n < 70:
        tens, unit = divmod(n, 10)
        if unit == 0:
            return _FR_TENS[tens]
        return _FR_TENS[tens] + (" et un" if unit == 1 else "-" + _FR_UNITS[unit])
    if n < 80:  # 60 + 10..19: soixante-dix, soixante et onze, soixante-douze
        return "soixante et onze" if n == 71 else "soixante-" + _fr_below_100(n - 60, final)
    if n == 80:  # 4 x 20: vingt takes an s when it ends the number
        return "quatre-vingts" if final else "quatre-vingt"
    return "quatre-vingt-" + _fr_below_100(n - 80, final)  # no "et": quatre-vingt-un, -onze


def _fr_below_1000(n: int, final: bool) -> str:
    hundreds, rest = divmod(n, 100)
    if hundreds == 0:
        return _fr_below_100(rest, final)
    head = "cent" if hundreds == 1 else f"{_FR_UNITS[hundreds]} cent"
    if rest:
        return f"{head} {_fr_below_100(rest, final)}"
    return head + ("s" if hundreds > 1 and final else "")  # deux cents, but deux cent un


def french_number(n: int, feminine: bool = False) -> str:
    """``n`` in French words, traditional spelling (before the 1990 reform).

    Hyphens join tens and units below 100; ``et`` joins 21, 31, ..., 61 and 71; ``vingt`` and
    ``cent`` take an ``s`` when multiplied and ending the number (``quatre-vingts``, ``deux
    cents``) but not before another number or ``mille`` (``quatre-vingt-un``, ``deux cent
    mille``); ``mille`` is invariable and has no ``un`` before it. ``feminine`` makes a final
    ``un`` agree with a feminine noun: ``vingt et une pommes``.
    """
    _check_number(n)
    if n < 1000:
        words = _fr_below_1000(n, final=True)
    else:
        thousands, rest = divmod(n, 1000)
        head = "mille" if thousands == 1 else _fr_below_1000(thousands, final=False) + " mille"
        words = head + (f" {_fr_below_1000(rest, final=True)}" if rest else "")
    if feminine and (words == "un" or words.endswith((" un", "-un"))):
        words += "e"
    return words


# (English singular, English plural, French singular, French plural, French noun is feminine)
_NOUNS = (
    ("apple", "apples", "pomme", "pommes", True),
    ("book", "books", "livre", "livres", False),
    ("cat", "cats", "chat", "chats", False),
    ("house", "houses", "maison", "maisons", True),
    ("car", "cars", "voiture", "voitures", True),
    ("dog", "dogs", "chien", "chiens", False),
    ("flower", "flowers", "fleur", "fleurs", True),
    ("tree", "trees", "arbre", "arbres", False),
    ("page", "pages", "page", "pages", True),
    ("bird", "birds", "oiseau", "oiseaux", False),
    ("horse", "horses", "cheval", "chevaux", False),
    ("chair", "chairs", "chaise", "chaises", True),
    ("key", "keys", "clé", "clés", True),
    ("star", "stars", "étoile", "étoiles", True),
    ("boat", "boats", "bateau", "bateaux", False),
    ("bottle", "bottles", "bouteille", "bouteilles", True),
    ("egg", "eggs", "œuf", "œufs", False),
    ("day", "days", "jour", "jours", False),
    ("week", "weeks", "semaine", "semaines", True),
    ("letter", "letters", "lettre", "lettres", True),
)

# (English, French); {n} is the number and {x} the noun, singular or plural to agree with it.
# French puts a narrow no-break space (U+202F) before ? and !, as Tatoeba's fra.txt does.
_TEMPLATES = (
    ("{n}.", "{n}."),
    ("{n} {x}.", "{n} {x}."),
    ("I have {n} {x}.", "J'ai {n} {x}."),
    ("We bought {n} {x}.", "Nous avons acheté {n} {x}."),
    ("Do you have {n} {x}?", "As-tu {n} {x}\u202f?"),
    ("There {are} {n} {x}!", "Il y a {n} {x}\u202f!"),
)


def _draw(rng: random.Random, k: int) -> int:
    """A uniform integer in ``0..k-1`` from ``rng.random()``, the one draw Python promises to
    keep identical across versions (``randrange`` may change)."""
    return int(rng.random() * k)


def numbers_fr(n: int = NUMBERS_FR_SIZE, seed: int = 0, max_number: int = 9999) -> str:
    """``n`` generated English→French pairs in ``fra.txt``'s format, e.g.
    ``'I have twenty-one apples.\\tJ'ai vingt et une pommes.'``.

    Numbers from 1 to ``max_number`` (at most 999,999), drawn so that every length in digits is
    equally likely; a template (a bare number or a counted noun in a short sentence) and a noun
    are drawn uniformly. French numbers agree with the noun's gender (``un``/``une``) and nouns
    with the number (one, singular). The text depends only on ``(seed, max_number)`` and each
    pair takes the same number of draws, so a smaller ``n`` gives a prefix of a larger one.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DivekitError(f"n must be a positive number of pairs, got {n!r}")
    if (
        isinstance(max_number, bool)
        or not isinstance(max_number, int)
        or not 1 <= max_number <= MAX_NUMBER
    ):
        raise DivekitError(f"max_number must be an integer in 1..{MAX_NUMBER}, got {max_number!r}")
    rng = random.Random(seed)
    digits = len(str(max_number))
    lines = []
    for _ in range(n):
        d = 1 + _draw(rng, digits)
        low, high = 10 ** (d - 1), min(10**d - 1, max_number)
        number = low + _draw(rng, high - low + 1)
        en, fr = _TEMPLATES[_draw(rng, len(_TEMPLATES))]
        en_sg, en_pl, fr_sg, fr_pl, feminine = _NOUNS[_draw(rng, len(_NOUNS))]
        plural = number > 1
        en = en.format(
            n=english_number(number), x=en_pl if plural else en_sg, are="are" if plural else "is"
        )
        fr = fr.format(
            n=french_number(number, feminine and "{x}" in fr), x=fr_pl if plural else fr_sg
        )
        lines.append(f"{en[0].upper()}{en[1:]}\t{fr[0].upper()}{fr[1:]}")
    return "\n".join(lines) + "\n"
