"""The `copies` source: deterministic digit-copy lines whose numbers have distinct digits."""

from __future__ import annotations

import re

import pytest

from data_prep.sources import open_source

LINE = re.compile(r"^Copy (\d+) again (\d+)\.$")


def test_copies_are_deterministic_and_well_formed():
    source = open_source("copies:docs=30,seed=5,lines=12")
    assert [source.count(split) for split in ("train", "validation", "test")] == [30, 2, 2]
    first = list(source.documents("train"))
    assert first == list(open_source("copies:docs=30,seed=5,lines=12").documents("train"))  # by seed
    assert first != list(open_source("copies:docs=30,seed=6,lines=12").documents("train"))
    assert list(source.documents("validation")) != first[:2]  # splits draw their own documents
    numbers = []
    for document in first:
        lines = document.splitlines()
        assert len(lines) == 12
        for line in lines:
            match = LINE.match(line)
            assert match and match.group(1) == match.group(2), line
            number = match.group(1)
            assert 5 <= len(number) <= 10 and len(set(number)) == len(number)  # every next digit unambiguous
            numbers.append(number)
    assert len(set(numbers)) > 0.95 * len(numbers)


@pytest.mark.parametrize("spec, message", [
    ("copies:lines=0", "copies:lines=0: lines must be in 1..10000, got 0"),
    ("copies:docs=0", "copies:docs=0: docs must be >= 1, got 0"),
    ("copies:words=3", "copies:words=3: bad option 'words=3', expected key=integer with key in docs, seed, lines"),
])
def test_bad_parameters_give_one_line(spec, message):
    with pytest.raises(ValueError) as info:
        open_source(spec)
    assert str(info.value) == message
