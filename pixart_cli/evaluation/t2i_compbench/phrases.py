"""Noun phrases and spatial relations of a prompt, without spaCy (whose model cannot be downloaded offline).

``noun_phrases`` is a small rule-based chunker: a phrase starts at a determiner or a content word and ends before a
conjunction, preposition, auxiliary verb, pronoun or punctuation, or at a word ending in -ed/-ing (or a common verb)
once the phrase has its noun. Phrases that only name a side ("the left", "top") are dropped, as in T2I-CompBench.
"a green bench and a blue bowl" → ["a green bench", "a blue bowl"]. spaCy chunks some complex sentences
differently.
"""

from __future__ import annotations

import re


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


DETERMINERS = _words(
    "a an the this that these those some many several few one two three four five six seven eight nine ten "
    "his her its their my your our each every another"
)
BOUNDARY_WORDS = _words(
    # conjunctions, prepositions, auxiliaries, pronouns and adverbs: never inside a noun phrase
    "and or but nor while as so yet with without on in at of to near next beside besides behind under underneath "
    "above below over between among inside into onto through past from by for against around across along atop "
    "beneath toward towards up down off out after before during like than then is are was were be been being am "
    "has have had does do did it they them he she him we you i there here which who whom whose what where when "
    "very too also not can could will would should may might must while themselves itself himself herself "
    "ourselves yourself"
)
VERBS = _words(
    "sits sat lay lies stands stood hangs hung rests rose shines flies flew runs ran holds held grows grew sings "
    "sang swims swam eats ate drinks drank looks flash flashes sleeps slept plays jumps walks leans reads hold led "
    "give gives gave make makes made take takes took go goes went come comes came sit stand lie hang fly run"
)
ING_ED_NOUNS = _words("building painting ceiling wedding clothing earring bedding pudding stocking railing drawing")
SIDE_WORDS = _words("top bottom side left right front back middle center centre")
ATTRIBUTE_WORDS = _words(
    # colours
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden beige tan "
    "colorful colourful dark light bright pale "
    # shapes and sizes
    "oblong teardrop spherical rectangular pyramidal pentagonal triangular round cylindrical cubic conical square "
    "oval diamond circular crescent hexagonal octagonal heart-shaped star-shaped big small large little tiny huge "
    "short long tall "
    # materials and textures
    "metallic wooden fluffy leather glass fabric rubber plastic soft smooth rough hard sleek shiny striped jagged "
    "fuzzy bumpy spiky prickly glossy textured translucent silky velvety furry woolen knitted "
    # other frequent adjectives in the complex prompts
    "warm cool hot cold sharp sweet crisp crispy fresh crunchy juicy delicate intricate fragrant bold vibrant tired "
    "old new ancient cozy calm gentle dull clean comfortable rich sticky tender spicy ripe heavy rusty twisted "
    "gnarled grand sturdy thorny distant glowing flickering"
)
SPATIAL_RELATIONS: tuple[str, ...] = (
    # T2I-CompBench's locality words, searched in this order
    "on side of",
    "next to",
    "near",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",
)
PERSON_WORDS = frozenset({"girl", "boy", "man", "woman"})  # T2I-CompBench maps these to the detector's "person"

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*|[^\sA-Za-z0-9]")


def _is_word(token: str) -> bool:
    return token[0].isalnum()


def _looks_like_verb(word: str) -> bool:
    if word in ATTRIBUTE_WORDS or word in ING_ED_NOUNS:  # "striped", "twisted", "painting"
        return False
    return word in VERBS or (len(word) > 4 and word.endswith(("ed", "ing")))


def _chunks(prompt: str) -> list[list[tuple[int, str]]]:
    """Noun-phrase chunks as lists of (token position, word)."""
    chunks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    has_noun = False

    def close() -> None:
        nonlocal current, has_noun
        if current and any(w.lower() not in DETERMINERS for _, w in current):
            chunks.append(current)
        current, has_noun = [], False

    tokens = _TOKEN.findall(prompt)
    for pos, token in enumerate(tokens):
        word = token.lower()
        if token == "," and current and not has_noun and pos + 1 < len(tokens) and _is_word(tokens[pos + 1]):
            continue  # "the bold, vibrant colors": a comma between adjectives stays inside the phrase
        if not _is_word(token) or word in BOUNDARY_WORDS:
            close()
        elif word in DETERMINERS:
            close()
            current.append((pos, token))
        elif _looks_like_verb(word) and (has_noun or not current):
            close()  # "the omelet cooked the eggs", "is chasing a ball": a verb ends a phrase and starts none
        else:
            current.append((pos, token))
            if word not in ATTRIBUTE_WORDS and not _looks_like_verb(word):
                has_noun = True
    close()
    return [c for c in chunks if not all(w.lower() in SIDE_WORDS | DETERMINERS for _, w in c)]


def noun_phrases(prompt: str) -> list[str]:
    """The noun phrases of a prompt, in order (see the module docstring)."""
    return [" ".join(w for _, w in chunk) for chunk in _chunks(prompt)]


def spatial_relation(prompt: str) -> str | None:
    """The first of T2I-CompBench's locality words found in the prompt, or None."""
    text = " ".join(prompt.lower().split())
    return next((r for r in SPATIAL_RELATIONS if r in text), None)


def spatial_objects(prompt: str) -> tuple[str | None, str | None, str | None]:
    """(first object, relation, second object): the nouns just before and just after the locality words."""
    relation = spatial_relation(prompt)
    if relation is None:
        return None, None, None
    text = " ".join(prompt.split())
    at = text.lower().find(relation)
    before, after = _chunks(text[:at]), _chunks(text[at + len(relation) :])
    first = before[-1][-1][1].lower() if before else None
    second = after[0][-1][1].lower() if after else None
    return first, relation, second


def without_attributes(prompt: str) -> str:
    """The prompt with its attribute words (colours, shapes, materials, ...) removed: complex's CLIP text."""
    return " ".join(w for w in prompt.split() if w.lower().strip(".,;:!?") not in ATTRIBUTE_WORDS)
