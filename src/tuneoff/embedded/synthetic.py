"""Deterministic synthetic instruction data whose answers can be checked exactly.

Every task family draws one :class:`Example`: an alpaca-style record
(``instruction``/``input``/``output``) plus the same knowledge phrased as a
plain-text sentence (``fact``). The embedded base model is pretrained on the
sentences only, so it knows the vocabulary and the facts but fine-tuning still
has to teach it the instruction -> answer format.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# A (instruction template, input template) pair; an empty input template keeps
# the data inline in the instruction, as many alpaca records do.
Prompt = tuple[str, str]


@dataclass(frozen=True)
class Example:
    """One drawn task: the instruction record plus its plain-text fact."""

    instruction: str
    input: str
    output: str
    fact: str

    def record(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


Family = Callable[[random.Random], Example]

_REAL_WORD_TEXT = (
    "apple bread cloud dance eagle flame grape house juice knife lemon money night ocean "
    "paper queen river stone table uncle voice water youth zebra anchor basket candle "
    "dragon engine forest garden hammer island jacket kitten ladder magnet pillow orange "
    "pencil rabbit silver tomato violin window yellow bottle camera doctor finger guitar "
    "honey insect jungle kettle lantern market needle parrot rocket sugar ticket tunnel "
    "valley wagon bridge castle desert friend giant heart light metal piano planet "
    "salad shadow spoon storm tiger train wheel winter cotton mirror"
)
_REAL_WORDS = _REAL_WORD_TEXT.split()
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
# Mostly made-up words: real ones alone would repeat too often for a few
# thousand records to have distinct train and test sets.
_REAL_WORD_RATE = 0.15


def _word(rng: random.Random) -> str:
    if rng.random() < _REAL_WORD_RATE:
        return rng.choice(_REAL_WORDS)
    syllables = rng.randint(2, 3)
    word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
    return word + rng.choice(_CONSONANTS) if rng.random() < 0.4 else word


def _numbers(rng: random.Random, low: int = 0, high: int = 50) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(3, 6))]


def _spaced(values: list[int] | list[str]) -> str:
    return " ".join(str(v) for v in values)


def _render(
    rng: random.Random, prompts: list[Prompt], facts: list[str], answer: object, **values: object
) -> Example:
    instruction, input_ = rng.choice(prompts)
    fact = rng.choice(facts)
    output = str(answer)
    return Example(
        instruction=instruction.format(**values),
        input=input_.format(**values),
        output=output,
        fact=fact.format(answer=output, **values),
    )


def addition(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    prompts = [
        ("What is {a} + {b}?", ""),
        ("Add {a} and {b}.", ""),
        ("Compute the sum of the two numbers.", "{a} and {b}"),
        ("Calculate {a} plus {b}.", ""),
    ]
    facts = [
        "{a} plus {b} equals {answer}.",
        "The sum of {a} and {b} is {answer}.",
        "If you add {a} and {b}, you get {answer}.",
    ]
    return _render(rng, prompts, facts, a + b, a=a, b=b)


def subtraction(rng: random.Random) -> Example:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    prompts = [
        ("What is {a} - {b}?", ""),
        ("Subtract {b} from {a}.", ""),
        ("Compute the difference: first number minus second number.", "{a} and {b}"),
        ("Calculate {a} minus {b}.", ""),
    ]
    facts = [
        "{a} minus {b} equals {answer}.",
        "Taking {b} away from {a} leaves {answer}.",
        "If you subtract {b} from {a}, you get {answer}.",
    ]
    return _render(rng, prompts, facts, a - b, a=a, b=b)


def sort_numbers(rng: random.Random) -> Example:
    values = _numbers(rng)
    prompts = [
        ("Sort these numbers in ascending order.", "{items}"),
        ("Arrange the numbers from smallest to largest: {items}", ""),
        ("Put the following numbers in increasing order.", "{items}"),
        ("Sort {items} from low to high.", ""),
    ]
    facts = [
        "Sorted, {items} becomes {answer}.",
        "In increasing order, {items} reads {answer}.",
        "If you sort {items} from smallest to largest, you get {answer}.",
    ]
    return _render(rng, prompts, facts, _spaced(sorted(values)), items=_spaced(values))


def maximum(rng: random.Random) -> Example:
    values = _numbers(rng, high=99)
    prompts = [
        ("What is the largest number in this list?", "{items}"),
        ("Find the maximum of {items}.", ""),
        ("Which number is the biggest: {items}?", ""),
        ("Return the highest value.", "{items}"),
    ]
    facts = [
        "The largest of {items} is {answer}.",
        "Among {items}, the maximum is {answer}.",
        "The highest value in the list {items} is {answer}.",
    ]
    return _render(rng, prompts, facts, max(values), items=_spaced(values))


def minimum(rng: random.Random) -> Example:
    values = _numbers(rng, high=99)
    prompts = [
        ("What is the smallest number in this list?", "{items}"),
        ("Find the minimum of {items}.", ""),
        ("Which number is the lowest: {items}?", ""),
        ("Return the least value.", "{items}"),
    ]
    facts = [
        "The smallest of {items} is {answer}.",
        "Among {items}, the minimum is {answer}.",
        "The lowest value in the list {items} is {answer}.",
    ]
    return _render(rng, prompts, facts, min(values), items=_spaced(values))


def larger_of_two(rng: random.Random) -> Example:
    a, b = rng.sample(range(1000), 2)
    prompts = [
        ("Which is larger, {a} or {b}?", ""),
        ("Give the bigger of the two numbers.", "{a} and {b}"),
        ("Of {a} and {b}, which number is greater?", ""),
        ("Pick the larger number: {a} or {b}.", ""),
    ]
    facts = [
        "Between {a} and {b}, the larger is {answer}.",
        "Of {a} and {b}, {answer} is greater.",
        "The bigger number of {a} and {b} is {answer}.",
    ]
    return _render(rng, prompts, facts, max(a, b), a=a, b=b)


def parity(rng: random.Random) -> Example:
    n = rng.randint(0, 9999)
    prompts = [
        ("Is {n} even or odd?", ""),
        ("Say whether the number is even or odd.", "{n}"),
        ("Tell me if {n} is odd or even.", ""),
        ("Even or odd: {n}?", ""),
    ]
    facts = [
        "{n} is an {answer} number.",
        "The number {n} is {answer}.",
        "If you check whether {n} is even or odd, it is {answer}.",
    ]
    return _render(rng, prompts, facts, "even" if n % 2 == 0 else "odd", n=n)


def reverse_word(rng: random.Random) -> Example:
    word = _word(rng)
    prompts = [
        ("Reverse the word {w}.", ""),
        ("Write this word backwards.", "{w}"),
        ("Spell {w} in reverse.", ""),
        ("What is {w} written backwards?", ""),
    ]
    facts = [
        "The reverse of {w} is {answer}.",
        "Written backwards, {w} becomes {answer}.",
        "If you spell the word {w} in reverse, you get {answer}.",
    ]
    return _render(rng, prompts, facts, word[::-1], w=word)


def uppercase_word(rng: random.Random) -> Example:
    word = _word(rng)
    prompts = [
        ("Convert {w} to uppercase.", ""),
        ("Write this word in capital letters.", "{w}"),
        ("Make the word {w} all caps.", ""),
        ("Uppercase the following word.", "{w}"),
    ]
    facts = [
        "In capital letters, {w} is {answer}.",
        "The uppercase form of {w} is {answer}.",
        "If you convert {w} to all caps, you get {answer}.",
    ]
    return _render(rng, prompts, facts, word.upper(), w=word)


def count_letters(rng: random.Random) -> Example:
    word = _word(rng)
    prompts = [
        ("How many letters are in the word {w}?", ""),
        ("Count the letters in this word.", "{w}"),
        ("What is the length of {w} in letters?", ""),
        ("Give the number of letters in {w}.", ""),
    ]
    facts = [
        "The word {w} has {answer} letters.",
        "{w} is spelled {spelled}, {answer} letters.",
        "If you count the letters in {w}, you get {answer}.",
    ]
    return _render(rng, prompts, facts, len(word), w=word, spelled=_spaced(list(word)))


def count_items(rng: random.Random) -> Example:
    items = ", ".join(_word(rng) for _ in range(rng.randint(2, 6)))
    prompts = [
        ("How many items are in this list?", "{items}"),
        ("Count the words in the list: {items}", ""),
        ("Give the number of entries.", "{items}"),
        ("How many things are listed here: {items}?", ""),
    ]
    facts = [
        "The list {items} has {answer} items.",
        "There are {answer} entries in {items}.",
        "If you count the words in the list {items}, you get {answer}.",
    ]
    return _render(rng, prompts, facts, items.count(",") + 1, items=items)


# (from unit, to unit, factor)
_UNITS = (
    ("km", "meters", 1000),
    ("kg", "grams", 1000),
    ("meters", "cm", 100),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
)


def convert_units(rng: random.Random) -> Example:
    source, target, factor = rng.choice(_UNITS)
    v = rng.randint(2, 999)
    prompts = [
        ("Convert {v} {source} to {target}.", ""),
        ("How many {target} are in {v} {source}?", ""),
        ("Express the quantity in {target}.", "{v} {source}"),
        ("What is {v} {source} in {target}?", ""),
    ]
    facts = [
        "{v} {source} is {answer} {target}.",
        "There are {answer} {target} in {v} {source}.",
        "If you convert {v} {source} to {target}, you get {answer} {target}.",
    ]
    return _render(rng, prompts, facts, v * factor, v=v, source=source, target=target)


def repeat_word(rng: random.Random) -> Example:
    word, n = _word(rng), rng.randint(2, 4)
    prompts = [
        ("Repeat the word {w} {n} times.", ""),
        ("Write {w} {n} times, separated by spaces.", ""),
        ("Say this word {n} times.", "{w}"),
        ("Echo the word {n} times.", "{w}"),
    ]
    facts = [
        "{w} said {n} times is {answer}.",
        "Repeating {w} {n} times gives {answer}.",
        "If you write the word {w} {n} times, you get {answer}.",
    ]
    return _render(rng, prompts, facts, _spaced([word] * n), w=word, n=n)


def edge_letter(rng: random.Random) -> Example:
    word = _word(rng)
    first = rng.random() < 0.5
    which = "first" if first else "last"
    prompts = [
        ("What is the {which} letter of {w}?", ""),
        ("Give the {which} letter of this word.", "{w}"),
        ("Which letter does {w} {verb} with?", ""),
        ("Name the {which} letter in the word {w}.", ""),
    ]
    facts = [
        "The {which} letter of {w} is {answer}.",
        "{w} {verb}s with the letter {answer}.",
        "If you name the {which} letter in the word {w}, it is {answer}.",
    ]
    answer = word[0] if first else word[-1]
    return _render(
        rng, prompts, facts, answer, w=word, which=which, verb="start" if first else "end"
    )


TASK_FAMILIES: dict[str, Family] = {
    "addition": addition,
    "subtraction": subtraction,
    "sort_numbers": sort_numbers,
    "maximum": maximum,
    "minimum": minimum,
    "larger_of_two": larger_of_two,
    "parity": parity,
    "reverse_word": reverse_word,
    "uppercase_word": uppercase_word,
    "count_letters": count_letters,
    "count_items": count_items,
    "convert_units": convert_units,
    "repeat_word": repeat_word,
    "edge_letter": edge_letter,
}


def generate_examples(n: int, seed: int = 0) -> list[Example]:
    """Draw ``n`` examples, each from a uniformly chosen family; same args, same list."""
    rng = random.Random(seed)
    families = list(TASK_FAMILIES.values())
    return [rng.choice(families)(rng) for _ in range(n)]


def generate_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-style records with keys ``instruction``, ``input`` and ``output``."""
    return [example.record() for example in generate_examples(n, seed)]


def generate_facts(n: int, seed: int = 0) -> list[str]:
    """Plain-text sentences stating the same kind of facts, for pretraining."""
    return [example.fact for example in generate_examples(n, seed)]


def check_answer(record: dict[str, str], prediction: str) -> bool:
    """Exact match of the prediction with the record's output, ignoring outer whitespace."""
    return prediction.strip() == record["output"].strip()
