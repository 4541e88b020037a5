"""Language codes, names, and an offline language identifier.

Names are used in the cross-lingual reward prefix ("...using only {Language}..."), so they are the
English names the paper's prompts use. Identification uses `lingua` (offline, no model download).
"""

from __future__ import annotations

import functools

from .errors import IcrError

LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "es": "Spanish", "de": "German", "fr": "French", "ru": "Russian",
    "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "pl": "Polish", "tr": "Turkish", "ar": "Arabic", "hi": "Hindi",
    "bn": "Bengali", "sw": "Swahili", "th": "Thai", "vi": "Vietnamese", "id": "Indonesian",
    "uk": "Ukrainian", "cs": "Czech", "sv": "Swedish", "fi": "Finnish", "el": "Greek",
    "he": "Hebrew", "fa": "Persian", "ro": "Romanian", "hu": "Hungarian", "da": "Danish",
}


def language_name(code: str) -> str:
    try:
        return LANGUAGE_NAMES[code]
    except KeyError:
        known = ", ".join(sorted(LANGUAGE_NAMES))
        raise IcrError(f"unknown language code {code!r}; known codes: {known}") from None


def check_language_codes(codes, where: str = "languages") -> None:
    for code in codes:
        if code not in LANGUAGE_NAMES:
            known = ", ".join(sorted(LANGUAGE_NAMES))
            raise IcrError(f"{where}: unknown language code {code!r}; known codes: {known}")


class LanguageIdentifier:
    """Identifies which of a fixed set of languages a text is in (lingua, offline).

    Restricting lingua to the run's languages (plus English, the usual leak) makes it fast and
    accurate on short answers. `identify` returns an ISO 639-1 code or None when undecidable
    (for example a text of digits and punctuation only).
    """

    def __init__(self, codes):
        from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

        wanted = sorted(set(codes) | {"en"})
        langs = []
        for code in wanted:
            iso = getattr(IsoCode639_1, code.upper(), None)
            if iso is None:
                raise IcrError(f"language identifier: lingua does not know language {code!r}")
            langs.append(Language.from_iso_code_639_1(iso))
        self._detector = LanguageDetectorBuilder.from_languages(*langs).build()

    def identify(self, text: str) -> str | None:
        lang = self._detector.detect_language_of(text)
        return None if lang is None else lang.iso_code_639_1.name.lower()

    def identify_many(self, texts) -> list[str | None]:
        results = self._detector.detect_languages_in_parallel_of(list(texts))
        return [None if r is None else r.iso_code_639_1.name.lower() for r in results]

    def is_in(self, text: str, code: str) -> bool:
        """True when `text` is identified as `code`. Texts with no letters count as in-language."""
        if not any(ch.isalpha() for ch in text):
            return True
        return self.identify(text) == code


@functools.lru_cache(maxsize=8)
def language_identifier(codes: tuple[str, ...]) -> LanguageIdentifier:
    return LanguageIdentifier(codes)
