"""`/api/check_nsfw_cp`: a prompt check by word lists. It is a filter on words, not a classifier:
it catches the obvious, misses paraphrases, and a prompt it passes is not thereby safe.

A prompt is NSFW when it holds a word of `NSFW_WORDS`; it is flagged CP (sexual content involving
minors) when it holds both a word of `MINOR_WORDS` and an NSFW word. The filtered prompt is the
prompt with the NSFW words (and, for CP, the minor words) removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NSFW_WORDS = frozenset(
    """
    nude nudes naked nudity topless bottomless nsfw porn porno pornographic xxx sex sexy sexual
    erotic erotica hentai lewd explicit fetish bdsm bondage nipple nipples breasts boobs tits
    areola genitals genital penis vagina pussy cock dick testicles butt buttocks ass anus
    masturbation masturbating orgasm cum cumshot ejaculation intercourse blowjob handjob
    undressed undressing stripper striptease lingerie onlyfans playboy orgy threesome
    """.split()
)
MINOR_WORDS = frozenset(
    """
    child children kid kids minor minors underage teen teens teenage teenager preteen
    loli lolita shota toddler infant baby babies schoolgirl schoolboy youngster juvenile
    boy boys girl girls little young
    """.split()
)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@dataclass(frozen=True)
class PromptCheck:
    is_nsfw: bool
    is_cp: bool
    filtered_prompt: str


def check_prompt(prompt: str) -> PromptCheck:
    words = set(_WORD.findall(prompt.lower()))
    nsfw = bool(words & NSFW_WORDS)
    # "girl", "young" alone are fine; with an NSFW word they are not.
    cp = nsfw and bool(words & MINOR_WORDS)
    banned = NSFW_WORDS | (MINOR_WORDS if cp else frozenset())

    def keep(match: re.Match) -> str:
        return "" if match.group(0).lower() in banned else match.group(0)

    filtered = re.sub(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?", keep, prompt)
    filtered = re.sub(r"\s*,(\s*,)+", ",", filtered)  # "a, , b" -> "a, b"
    filtered = re.sub(r"\s{2,}", " ", filtered).strip(" ,")
    return PromptCheck(nsfw, cp, filtered)
