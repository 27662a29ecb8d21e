"""The 93 languages of the synthesis mix, and their default sampling weights.

The paper synthesises in 93 languages with English the most frequent, but publishes neither the list nor
the weights. This list (ISO 639-1 codes) and `DEFAULT_ENGLISH_SHARE` are our documented defaults, not the
paper's verified values; pass your own weights to `mme5.synthesis.plan.make_plan` to change the mix.
"""

from __future__ import annotations

LANGUAGES: dict[str, str] = {
    "en": "English", "zh": "Chinese", "es": "Spanish", "fr": "French", "de": "German",
    "ja": "Japanese", "ru": "Russian", "pt": "Portuguese", "it": "Italian", "ko": "Korean",
    "ar": "Arabic", "hi": "Hindi", "nl": "Dutch", "pl": "Polish", "tr": "Turkish",
    "vi": "Vietnamese", "id": "Indonesian", "th": "Thai", "sv": "Swedish", "cs": "Czech",
    "el": "Greek", "he": "Hebrew", "fa": "Persian", "uk": "Ukrainian", "ro": "Romanian",
    "hu": "Hungarian", "da": "Danish", "fi": "Finnish", "no": "Norwegian", "bg": "Bulgarian",
    "sk": "Slovak", "hr": "Croatian", "sr": "Serbian", "sl": "Slovenian", "lt": "Lithuanian",
    "lv": "Latvian", "et": "Estonian", "ms": "Malay", "tl": "Tagalog", "bn": "Bengali",
    "ur": "Urdu", "ta": "Tamil", "te": "Telugu", "mr": "Marathi", "gu": "Gujarati",
    "kn": "Kannada", "ml": "Malayalam", "pa": "Punjabi", "ne": "Nepali", "si": "Sinhala",
    "my": "Burmese", "km": "Khmer", "lo": "Lao", "mn": "Mongolian", "kk": "Kazakh",
    "uz": "Uzbek", "ky": "Kyrgyz", "tg": "Tajik", "az": "Azerbaijani", "ka": "Georgian",
    "hy": "Armenian", "sw": "Swahili", "am": "Amharic", "ha": "Hausa", "yo": "Yoruba",
    "ig": "Igbo", "zu": "Zulu", "xh": "Xhosa", "so": "Somali", "af": "Afrikaans",
    "sq": "Albanian", "mk": "Macedonian", "bs": "Bosnian", "be": "Belarusian", "is": "Icelandic",
    "ga": "Irish", "cy": "Welsh", "eu": "Basque", "ca": "Catalan", "gl": "Galician",
    "mt": "Maltese", "lb": "Luxembourgish", "eo": "Esperanto", "la": "Latin", "ps": "Pashto",
    "ku": "Kurdish", "sd": "Sindhi", "or": "Odia", "as": "Assamese", "jv": "Javanese",
    "su": "Sundanese", "mg": "Malagasy", "gd": "Scottish Gaelic",
}

# Unverified default: English gets this share of samples, the other 92 languages split the rest equally.
DEFAULT_ENGLISH_SHARE = 0.3


def default_language_weights(english_share: float = DEFAULT_ENGLISH_SHARE) -> dict[str, float]:
    """Weights over `LANGUAGES` (summing to 1): English `english_share`, the rest equal."""
    if not 0.0 <= english_share <= 1.0:
        raise ValueError(f"english_share must be in [0, 1], found {english_share}")
    other = (1.0 - english_share) / (len(LANGUAGES) - 1)
    return {code: english_share if code == "en" else other for code in LANGUAGES}


def language_name(code: str) -> str:
    """The English name of a language code, for prompts ("write in Swahili")."""
    try:
        return LANGUAGES[code]
    except KeyError:
        raise KeyError(f"unknown language code {code!r}; see mme5.synthesis.languages.LANGUAGES") from None
