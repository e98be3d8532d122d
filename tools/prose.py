"""English prose available offline on any CPython: the Python Language Reference.

CPython ships the text of its Language Reference topics (the pages `help()`
shows: "Assignment statements", "The import system", ...) as
`pydoc_data.topics.topics`, a dict of 79 topics and about 465,000 characters
in Python 3.11. It is real English prose written by people, with grammar
rules and code examples between the paragraphs. This module keeps the prose:
indented blocks (code, grammar productions), headings and short fragments are
dropped, and the lines of each paragraph are joined.

Topics are split into two disjoint halves by their sorted position (even ->
"calib", odd -> "eval"), so calibration text and held-out evaluation text never
share a topic.  Used by tools/export_smollm2.py and tools/export_minilm.py.
"""

from __future__ import annotations

import re

SOURCE = "CPython's Language Reference text, pydoc_data.topics (Python {version})"


def _paragraphs(text):
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if not lines or lines[0].startswith("   "):  # code, grammar, nested examples
            continue
        if all(set(line.strip()) <= set("*=-~^") for line in lines[1:]) and len(lines) <= 2:
            continue  # a heading and its underline
        para = " ".join(line.strip() for line in lines)
        words = para.split()
        if len(words) < 8:
            continue
        letters = sum(ch.isalpha() or ch.isspace() for ch in para)
        if letters < 0.85 * len(para):  # mostly symbols: a table or a signature
            continue
        yield re.sub(r"^[*] ", "", para)


def topics_split():
    """{'calib': [topic names], 'eval': [topic names]} (disjoint, deterministic)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    return {"calib": names[0::2], "eval": names[1::2]}


def prose(split):
    """The prose paragraphs of one half ('calib' or 'eval'), in topic order."""
    from pydoc_data.topics import topics

    out = []
    for name in topics_split()[split]:
        out.extend(_paragraphs(topics[name]))
    return out


def sentences(split, min_words=6, max_words=40):
    """Sentences of one half's prose, deduplicated, in order."""
    seen, out = set(), []
    for para in prose(split):
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para):
            n = len(sent.split())
            if min_words <= n <= max_words and sent not in seen:
                seen.add(sent)
                out.append(sent)
    return out


def source():
    import sys

    return SOURCE.format(version=sys.version.split()[0])
