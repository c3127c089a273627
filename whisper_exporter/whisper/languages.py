"""Whisper's languages: one table and one lookup, for logs, answers, manifests and config."""
from __future__ import annotations

from typing import Any, Optional

# Whisper's languages (openai/whisper tokenizer.py LANGUAGES), code -> name.
WHISPER_LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian", "mk": "macedonian",
    "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian", "ne": "nepali",
    "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer",
    "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan",
    "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese",
    "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}
# Whisper's own aliases (TO_LANGUAGE_CODE) on top of the names.
LANGUAGE_ALIASES = {
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb",
    "pushto": "ps", "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si",
    "castilian": "es", "mandarin": "zh",
}
# Written for "the server did not know or did not say".
# Codes people write that Whisper spells differently (Cantonese must not become zh).
LANGUAGE_FIXES = {"cmn": "zh", "zh-cmn": "zh", "zh-yue": "yue", "yue-hk": "yue", "yue-hant": "yue",
                  "zh_yue": "yue", "zh_cmn": "zh"}
# Written for "the server did not know or did not say".
NO_LANGUAGE = frozenset({"", "auto", "none", "null", "unknown", "-"})

_NAME_TO_CODE = {name: code for code, name in WHISPER_LANGUAGES.items()} | LANGUAGE_ALIASES
_NAME_TO_CODE |= {name.replace(" ", "_"): code for name, code in _NAME_TO_CODE.items() if " " in name}


def language_code(value: Any) -> Optional[str]:
    """A Whisper language code for a code, name, alias or locale ('en', 'English', 'en-US',
    'Cantonese', 'zh-yue', 'cmn', 'haitian creole'); None when it is none of those."""
    if not isinstance(value, str):
        return None
    v = value.strip().lower()
    if v in WHISPER_LANGUAGES:
        return v
    code = LANGUAGE_FIXES.get(v) or _NAME_TO_CODE.get(v)
    if code:
        return code
    for sep in ("-", "_"):
        if sep in v:
            head = v.split(sep, 1)[0]
            if head in WHISPER_LANGUAGES:
                return head
    return None
