"""Prompt policy: deny rules checked on prompts before any model time is spent.

The built-in ``minors`` rule refuses sexual content involving minors. Text is first
normalized (homoglyphs, invisible characters, leetspeak and spaced-out letters undone) so
that the rules see words, not their disguises. Extra deny rules are regular expressions on
the normalized text; an optional external classifier is consulted when the rules allow.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from ourvidz_serve.errors import ClassifierUnavailable, PromptRefused

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ourvidz_serve.settings import Settings

__all__ = [
    "RULE_CUSTOM",
    "RULE_MINORS",
    "PolicyVerdict",
    "PromptClassifier",
    "PromptPolicy",
    "normalize",
]

RULE_MINORS = "minors"
RULE_CUSTOM = "custom"
# A classifier's reason becomes the reported rule only if it looks like a rule name, so a
# classifier that returns the offending text cannot make the error echo it.
_CLASSIFIER_RULE = "classifier"
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


@dataclass(frozen=True)
class PolicyVerdict:
    """The built-in rules' answer: allowed, or the name of the rule that refused."""

    allowed: bool
    rule: str | None = None


class PromptClassifier(Protocol):
    """An external classifier: returns a refusal reason (a rule name), or None to allow."""

    async def classify(self, text: str) -> str | None: ...


def _split(text: str) -> list[str]:
    return text.split()


def _words(text: str) -> frozenset[str]:
    return frozenset(_split(text))


# --- Normalization ---------------------------------------------------------------------

# Combining marks (strike-throughs, accents) and format characters (zero-width spaces and
# joiners, soft hyphens, bidi controls, tag characters) are invisible or decorative: drop them
# so they cannot split a word.
_DROPPED_CATEGORIES = frozenset({"Mn", "Me", "Cf"})

# Letters that look like ASCII ones but survive NFKD (after casefold, so lower case only).
_CONFUSABLES: dict[str, str] = {
    # Cyrillic
    **dict(zip("авьсԁеєгһніӏјкмпорԛѕтуүхԝѵ", "abbcdeerhhiljkmnopqstyyxwv", strict=True)),
    # Greek
    **dict(zip("αβγδεηικμνορσϲτυχωϳ", "abydenikuvopoctuxwj", strict=True)),
    # Armenian
    **dict(zip("օսհոց", "ouhng", strict=True)),  # noqa: RUF001
    # Latin look-alikes and small capitals
    **dict(zip("ıɩɑɡȷ€", "iiagje", strict=True)),
    **dict(zip("ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢ", "abcdefghijklmnoprstuvwyz", strict=True)),
}
# Regional indicator symbols (the letters of flag emoji) read as letters too.
_CONFUSABLES.update({chr(0x1F1E6 + i): chr(ord("a") + i) for i in range(26)})
# Apostrophes join rather than split, so "kid's" reads "kids", not "kid s".
_FOLD_TABLE = str.maketrans({**_CONFUSABLES, "'": None, "\u2019": None, "\u2018": None})
_ASCII_FOLD_TABLE = str.maketrans({"'": None})

# Leetspeak, applied only inside words that mix letters and digits, so numbers stay numbers.
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g"}
_LEET_ONE_AS_I = str.maketrans({**_LEET, "1": "i"})
_LEET_ONE_AS_L = str.maketrans({**_LEET, "1": "l"})
# Symbols read as letters only between word characters ("n@ked", "ch!ld") or, for @ and $,
# before a letter ("$ex"); elsewhere they are punctuation ("kid!", "$5").
_SYMBOL_INSIDE = re.compile(r"(?<=[a-z0-9])[@$!|](?=[a-z0-9])")
_SYMBOL_LEADING = re.compile(r"(?<![a-z0-9])[@$](?=[a-z])")
_SYMBOLS_I = {"@": "a", "$": "s", "!": "i", "|": "i"}
_SYMBOLS_L = {**_SYMBOLS_I, "|": "l"}

_WORD = re.compile(r"[a-z0-9]+")
_LITERAL_WORD = re.compile(r"[a-z]+|[0-9]+")
_DIGITS_THEN_LETTERS = re.compile(r"([0-9]+)([a-z]+)")
_LETTERS_THEN_DIGITS = re.compile(r"([a-z]+)([0-9]+)")
# Common short words: never half of a word that was split in two.
_SHORT_WORDS = _words(
    "a i s an as us or at in on to be we he me my by is it of so no do go up am if al"
)
_TRIPLED = re.compile(r"([a-z])\1{2,}")
# Suffixes after a number that mark it as a number ("12yo", "7th", "6mo"), not leetspeak.
_NUMBER_SUFFIXES = _words(
    "y yo yr yrs year years yearold yearsold yrold yro mo mos month months st nd rd th s"
)


def _fold(text: str) -> str:
    """Lower case, compatibility forms decomposed, marks and invisibles dropped, look-alikes mapped.

    NFKD rather than NFKC so that accents come apart from their letters and can be dropped.
    """
    if text.isascii():
        return text.lower().translate(_ASCII_FOLD_TABLE)
    decomposed = unicodedata.normalize("NFKD", text).casefold()
    visible = "".join(
        ch for ch in decomposed if unicodedata.category(ch) not in _DROPPED_CATEGORIES
    )
    return visible.translate(_FOLD_TABLE)


def _split_or_unleet(token: str, leet: dict[int, str]) -> list[str]:
    """A number with a unit stays a number ("12yo" -> "12 yo"); other mixes are leetspeak."""
    if token.isalpha() or token.isdigit():
        return [token]
    match = _DIGITS_THEN_LETTERS.fullmatch(token)
    if match and (match[2] in _NUMBER_SUFFIXES or len(match[1]) >= 2):
        return [match[1], match[2]]
    match = _LETTERS_THEN_DIGITS.fullmatch(token)
    if match and len(match[2]) >= 2:
        return [match[1], match[2]]
    return [token.translate(leet)]


def _deobfuscate(folded: str, one_as_l: bool) -> tuple[list[str], list[str]]:
    """Words with leetspeak undone and spaced-out letters joined; also the joined words."""
    symbols = _SYMBOLS_L if one_as_l else _SYMBOLS_I
    leet = _LEET_ONE_AS_L if one_as_l else _LEET_ONE_AS_I
    text = _SYMBOL_INSIDE.sub(lambda m: symbols[m[0]], folded)
    text = _SYMBOL_LEADING.sub(lambda m: symbols[m[0]], text)
    tokens = _WORD.findall(text)
    words: list[str] = []
    glued: list[str] = []
    i = 0
    while i < len(tokens):
        end = i
        while end < len(tokens) and len(tokens[end]) == 1:
            end += 1
        run = tokens[i:end]
        # Two or more letters spelled apart ("c h i l d", "k.1.d") are one word; a lone
        # letter next to a digit ("a 5 year old") is not.
        if len(run) >= 2 and sum(t.isalpha() for t in run) >= 2:
            joined = _split_or_unleet("".join(run), leet)
            words.extend(joined)
            glued.extend(joined)
            i = end
        elif run:
            words.extend(run)
            i = end
        else:
            words.extend(_split_or_unleet(tokens[i], leet))
            i += 1
    return words, glued


def normalize(text: str) -> str:
    """The text as the rules read it: lower-case ASCII words separated by single spaces."""
    words, _ = _deobfuscate(_fold(text), one_as_l=False)
    return " ".join(words)


# --- Terms -----------------------------------------------------------------------------

_UNITS = {
    word: value
    for value, word in enumerate(
        _split(
            "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
            "fifteen sixteen seventeen eighteen nineteen"
        )
    )
}
_TENS = {
    word: 10 * (value + 2)
    for value, word in enumerate(_split("twenty thirty forty fifty sixty seventy eighty ninety"))
}
_NUMBER_WORDS = frozenset(_UNITS) | frozenset(_TENS)


def _numbers_as_digits(words: Sequence[str]) -> str:
    """Number words as digits ("twenty five" -> "25"), so ages read the same either way."""
    if _NUMBER_WORDS.isdisjoint(words):
        return " ".join(words)
    out: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word in _TENS:
            value = _TENS[word]
            following = words[i + 1] if i + 1 < len(words) else ""
            if 1 <= _UNITS.get(following, 0) <= 9:
                value += _UNITS[following]
                i += 1
            out.append(str(value))
        elif word in _UNITS:
            out.append(str(_UNITS[word]))
        else:
            out.append(word)
        i += 1
    return " ".join(out)


def _phrases(*patterns: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b")


def _inside(words: Iterable[str]) -> re.Pattern[str]:
    """Any of the words anywhere, for joined spaced-out letters ("achild", "nakedkid")."""
    return re.compile("|".join(sorted(words, key=len, reverse=True)))


# Refused on their own: these name sexual content involving minors.
_INHERENT_WORDS = _words(
    "loli lolis lolicon lolicons shota shotas shotacon shotacons toddlercon jailbait "
    "pedo pedos pedophile pedophiles pedophilia pedophilic paedo paedos paedophile "
    "paedophiles paedophilia pedobear pthc csam childporn kiddieporn kiddyporn"
)
_INHERENT_PHRASES = _phrases(r"(?:child|kiddie|kiddy) porn(?:o|ography)?")

# Refused together with a sexual term. "teen" is included on purpose: on its own next to
# sexual content it is refused (conservative); adults are described as adults or by age.
_MINOR_WORDS = _words(
    "child children childs childlike kid kids kiddie kiddies kiddy kiddo kiddos minor minors "
    "underage underaged preteen preteens prepubescent pubescent prepubertal tween tweens "
    "tweenager toddler toddlers infant infants newborn newborns schoolgirl schoolgirls "
    "schoolboy schoolboys schoolchild schoolchildren schoolkid schoolkids kindergarten "
    "kindergartener kindergarteners kindergartner kindergartners preschool preschooler "
    "preschoolers teen teens teenage teenaged teenager teenagers adolescent adolescents "
    "juvenile juveniles youngster youngsters lolita lolitas highschooler highschoolers "
    "middleschooler middleschoolers"
)
_ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth"
_MINOR_PHRASES = _phrases(
    # "little girl", "young blonde girl": one word in between at most, and not
    # an adult noun, so that "little black dress, girl next door" stays an adult prompt.
    r"(?:little|lil|young)(?: (?!(?:woman|women|lady|ladies|man|men|adult|adults|bit)\b)[a-z]+)?"
    r" (?:girl|girls|boy|boys)",
    r"(?:small|tiny) (?:girl|girls|boy|boys)",
    r"(?:middle|elementary|primary|grade) school(?:er|ers)?",
    r"junior high",
    r"nursery school",
    r"high school(?:er|ers| girl| girls| boy| boys| student| students| kid| kids)",
    r"(?:girl|boy|cub) scouts?",
    r"(?:" + _ORDINALS.replace(" ", "|") + r") grade(?:r|rs)?",
    r"[0-9]{1,2} (?:st|nd|rd|th) grade(?:r|rs)?",
)

_SEXUAL_WORDS = _words(
    "nude nudes nudity nudist nudists naked nakedness sex sexes sexy sexier sexiest sexual "
    "sexually sexualized sexualised sexualize sexualise sexualizing sexting porn porno porns "
    "pornographic pornography pornstar nsfw explicit erotic erotica erotically eroticism "
    "topless bottomless genital genitals genitalia lingerie breast breasts boob boobs "
    "boobies tits titty titties nipple nipples areola areolas areolae vagina vaginas vaginal "
    "vulva vulvas pussy pussies labia clit clitoris penis penises phallus phallic cock cocks "
    "dick dicks erection erections testicle testicles scrotum anus anal ass asses butt butts "
    "buttocks orgasm orgasms orgasmic orgasming masturbate masturbates masturbating "
    "masturbation fuck fucks fucked fucking fucker blowjob blowjobs handjob handjobs "
    "footjob cum cums cumming cumshot cumshots creampie semen ejaculate ejaculating "
    "ejaculation intercourse copulation coitus undressed undressing undress unclothed "
    "disrobed disrobing stripping stripper strippers striptease seductive seductively "
    "seduce seduced seducing seduction provocative provocatively suggestive sensual "
    "sensuality aroused arousal arousing horny lewd lust lustful hentai ecchi xxx bdsm "
    "bondage fetish fetishes rape raped raping rapes molest molested molesting molestation "
    "grope groped groping fondle fondled fondling panties panty thong thongs underwear bra "
    "bras bikini bikinis upskirt downblouse cameltoe pantyshot spank spanked spanking slut "
    "sluts slutty whore whores smut smutty orgy orgies threesome gangbang bukkake "
    "deepthroat fellatio cunnilingus sodomy sodomize incest"
)
_SEXUAL_PHRASES = _phrases(
    r"spread(?:ing)? (?:her |his |their )?legs",
    r"legs spread",
    r"spread eagle",
    r"see through",
    r"(?:no|without) (?:clothes|clothing)",
    r"wearing nothing",
)

_INHERENT_INSIDE = _inside(_INHERENT_WORDS)
_MINOR_INSIDE = _inside(_MINOR_WORDS)
_SEXUAL_INSIDE = _inside(_SEXUAL_WORDS)
# "nineteen" spelled apart must not read as "teen".
_TEEN_NUMBERS = re.compile(r"(?:thir|four|fif|six|seven|eigh|nine)teen")

# Ages, on text whose number words are digits. Each pattern captures the number.
_AGE = re.compile(
    r"\b(?:"
    r"([0-9]{1,3}) (?:years?|yrs?|y) (?:old|young)"  # 12 year old, 12-years-old, 12 yr old
    r"|([0-9]{1,3}) (?:yo|y o|yro|yearold|yearsold|yrold)"  # 12yo, 12 y/o, 12yearold
    r"|([0-9]{1,3}) years? of age"
    r"|(?:aged?|ages) ([0-9]{1,3})"  # aged 12, age: 12
    r")\b"
)
_UNDER_AGE = re.compile(
    r"\b(?:"
    r"(?:under|below|younger than|less than|not yet) (?:the )?age (?:of )?([0-9]{1,2})"
    r"|(?:younger than|not yet) ([0-9]{1,2})"
    r"|(?:under|below) ([0-9]{1,2}) (?:years?|yrs?|yo)"
    r"|(?:under|below) (18)"
    r")\b"
)
_INFANT_AGE = re.compile(r"\b[0-9]{1,3} (?:months?|mos?|weeks?|days?) old\b")
_ADULT_AGE = 18


@dataclass(frozen=True)
class _Reading:
    """The readings of one text the rules look at."""

    texts: tuple[str, ...]  # normalized (1 as i), 1 as l, and literal (no leet, no joining)
    numeric: tuple[str, ...]  # the same with number words as digits
    words: frozenset[str]  # their words, adjacent words run together, tripled letters collapsed
    glued: tuple[str, ...]  # words joined from spaced-out letters


def _read(text: str) -> _Reading:
    folded = _fold(text)
    primary, glued = _deobfuscate(folded, one_as_l=False)
    word_lists = [primary]
    if "1" in folded or "|" in folded:
        alternative, glued_l = _deobfuscate(folded, one_as_l=True)
        if alternative != primary:
            word_lists.append(alternative)
            glued = glued + glued_l
    # The literal reading keeps what joining and leetspeak could hide ("a 5 y o", "age12").
    word_lists.append(_LITERAL_WORD.findall(folded))
    texts = tuple(" ".join(words) for words in word_lists)
    all_words: set[str] = set()
    for words in word_lists:
        all_words.update(words)
        # "school girl", "pre teen", "chi ld": a word split in two is still that word. Not
        # with a short common word, or "an al fresco lunch" would read "anal".
        all_words.update(
            a + b
            for a, b in itertools.pairwise(words)
            if a not in _SHORT_WORDS and b not in _SHORT_WORDS
        )
    if any(_TRIPLED.search(text) for text in texts):  # "chiiild", "teeeen"
        for text in texts:
            all_words.update(_TRIPLED.sub(r"\1", text).split())
            all_words.update(_TRIPLED.sub(r"\1\1", text).split())
    return _Reading(
        texts=texts,
        numeric=tuple(_numbers_as_digits(words) for words in word_lists),
        words=frozenset(all_words),
        glued=tuple(_TEEN_NUMBERS.sub(" ", word) for word in glued),
    )


def _mentions(
    reading: _Reading,
    words: frozenset[str],
    phrases: re.Pattern[str],
    inside: re.Pattern[str],
) -> bool:
    if not words.isdisjoint(reading.words):
        return True
    if any(phrases.search(text) for text in reading.texts):
        return True
    return any(inside.search(word) for word in reading.glued)


def _minor_age(numeric: str) -> bool:
    for match in _AGE.finditer(numeric):
        if int(next(group for group in match.groups() if group)) < _ADULT_AGE:
            return True
    for match in _UNDER_AGE.finditer(numeric):
        if int(next(group for group in match.groups() if group)) <= _ADULT_AGE:
            return True
    return _INFANT_AGE.search(numeric) is not None


def _refused_by_minors_rule(reading: _Reading) -> bool:
    if _mentions(reading, _INHERENT_WORDS, _INHERENT_PHRASES, _INHERENT_INSIDE):
        return True
    if not _mentions(reading, _SEXUAL_WORDS, _SEXUAL_PHRASES, _SEXUAL_INSIDE):
        return False
    if _mentions(reading, _MINOR_WORDS, _MINOR_PHRASES, _MINOR_INSIDE):
        return True
    return any(_minor_age(numeric) for numeric in reading.numeric)


# --- Policy ----------------------------------------------------------------------------


class PromptPolicy:
    """Built-in deny rules, custom deny patterns, then an optional external classifier."""

    def __init__(
        self,
        *,
        minors_rule: bool = True,
        deny_patterns: Sequence[str] = (),
        classifier: PromptClassifier | None = None,
    ) -> None:
        self._minors_rule = minors_rule
        self._deny: list[re.Pattern[str]] = []
        for pattern in deny_patterns:
            try:
                # Case-insensitive: the normalized text is lower case whatever the pattern says.
                self._deny.append(re.compile(pattern, re.IGNORECASE))
            except re.error as exc:
                raise ValueError(f"invalid prompt deny pattern {pattern!r}: {exc}") from exc
        self._classifier = classifier

    @classmethod
    def from_settings(cls, settings: Settings) -> PromptPolicy:
        """The policy the settings describe, importing the classifier if one is named."""
        classifier = (
            _load_classifier(settings.prompt_classifier) if settings.prompt_classifier else None
        )
        return cls(
            minors_rule=settings.prompt_policy_minors_rule,
            deny_patterns=settings.prompt_deny_patterns,
            classifier=classifier,
        )

    def evaluate(self, text: str) -> PolicyVerdict:
        """The built-in rules and deny patterns only (synchronous, no classifier)."""
        if not self._minors_rule and not self._deny:
            return PolicyVerdict(allowed=True)
        reading = _read(text)
        if self._minors_rule and _refused_by_minors_rule(reading):
            return PolicyVerdict(allowed=False, rule=RULE_MINORS)
        for pattern in self._deny:
            if any(pattern.search(variant) for variant in reading.texts):
                return PolicyVerdict(allowed=False, rule=RULE_CUSTOM)
        return PolicyVerdict(allowed=True)

    async def check(self, text: str, *, field: str = "prompt") -> None:
        """Raise PromptRefused if the rules, or else the classifier, refuse ``text``."""
        verdict = self.evaluate(text)
        if not verdict.allowed:
            raise _refusal(field, verdict.rule or RULE_CUSTOM)
        if self._classifier is None:
            return
        try:
            reason = await self._classifier.classify(text)
        except Exception as exc:
            # Fail closed: a prompt nobody could check is not a prompt that passed.
            logger.warning("prompt classifier failed: %r", exc)
            raise ClassifierUnavailable(
                "the prompt classifier is unavailable; retry shortly"
            ) from exc
        if reason is not None:
            rule = reason if _RULE_NAME.fullmatch(reason) else _CLASSIFIER_RULE
            raise _refusal(field, rule)

    async def check_request(self, prompt: str, negative_prompt: str | None) -> None:
        """Check a request's prompt and, when given, its negative prompt."""
        await self.check(prompt, field="prompt")
        if negative_prompt:
            await self.check(negative_prompt, field="negative_prompt")


def _refusal(field: str, rule: str) -> PromptRefused:
    # Names the field and the rule only: echoing the text or the matched term would hand
    # back exactly what to disguise next time.
    return PromptRefused(
        f"the {field.replace('_', ' ')} was refused by the content policy (rule: {rule})",
        details={"field": field, "rule": rule},
    )


def _load_classifier(path: str) -> PromptClassifier:
    """Import ``module:callable`` and call it with no arguments to get the classifier."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"prompt_classifier must be 'module:callable', got {path!r}")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"cannot import the prompt classifier module {module_name!r}: {exc}"
        ) from exc
    for name in attribute.split("."):
        try:
            target = getattr(target, name)
        except AttributeError as exc:
            raise ValueError(f"prompt classifier {path!r} not found: {exc}") from exc
    if not callable(target):
        raise ValueError(f"prompt classifier {path!r} is not callable")
    classifier = target()
    if not callable(getattr(classifier, "classify", None)):
        raise ValueError(f"prompt classifier {path!r} returned an object without classify()")
    return cast("PromptClassifier", classifier)
