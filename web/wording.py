"""How the console words a message built from a reason: one full stop at most."""


def sentence(text):
    """`text` ending as a sentence: a full stop added unless it ends in . ? or !"""
    text = text.rstrip()
    return text if text.endswith((".", "?", "!")) else text + "."


def counted(count, word):
    """A count and its noun: `1 violation`, `3 violations` (plural adds an s)."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"
