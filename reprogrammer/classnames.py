"""The class names a classifier is built for: a non-empty sequence of distinct strings."""
from collections import Counter
from collections.abc import Sequence


def checked_classnames(classnames: Sequence[str]) -> list[str]:
    """`classnames` as a list, or a ValueError naming what is wrong with it."""
    if isinstance(classnames, (str, bytes)):  # a string is a sequence of one-letter classes
        raise ValueError(f"classnames must be a list of class names, got the string {classnames!r}; "
                         f"write [{classnames!r}] for a single class")
    names = list(classnames)
    if not names:
        raise ValueError("classnames is empty: a classifier needs at least one class")
    bad = [name for name in names if not isinstance(name, str) or not name.strip()]
    if bad:
        raise ValueError(f"classnames must be non-empty strings, got {bad[:5]}")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"class names {repeated[:5]} appear more than once: two classes with one name have one "
                         "prompt and cannot be told apart; give each class its own name")
    return names
