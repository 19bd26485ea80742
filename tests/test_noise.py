"""bltkit.eval.noise: the character noise of robustness evaluation."""

from __future__ import annotations

import pytest

from bltkit.eval import noise

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


def test_each_kind_does_what_it_says():
    assert noise.apply("Hello, wörld", "uppercase") == "HELLO, WÖRLD"
    assert noise.apply("Ab c", "antspeak") == "A B   C"
    dropped = noise.apply(TEXT, "drop:0.1")
    assert 0.05 < 1 - len(dropped) / len(TEXT) < 0.15  # ~10 % of 900 characters
    assert all(c in TEXT for c in dropped)
    mixed = noise.apply(TEXT, "randomcase")
    assert mixed.lower() == TEXT.lower()
    letters = [c for c in mixed if c.isalpha()]
    assert 0.4 < sum(c.isupper() for c in letters) / len(letters) < 0.6
    repeated = noise.apply(TEXT, "repeat:0.2")
    assert 1.2 < len(repeated) / len(TEXT) < 1.8  # 20 % of characters, each 2-4 times
    assert noise.apply(TEXT, "drop:0") == TEXT
    assert noise.apply(TEXT, "repeat:1").count("T") >= 2 * TEXT.count("T")


def test_noise_depends_on_the_seed_and_the_text_only():
    """The same text and seed give the same noise whatever came before (batches, reruns); another
    seed gives other noise."""
    a = noise.apply(TEXT, "drop:0.3", seed=1)
    noise.apply("something else first", "drop:0.3", seed=1)
    assert noise.apply(TEXT, "drop:0.3", seed=1) == a
    assert noise.apply(TEXT, "drop:0.3", seed=2) != a


@pytest.mark.parametrize(("spec", "match"), [("blur", "unknown noise 'blur'"), ("drop:2", r"in \[0, 1\]"),
                                             ("drop:x", "must be a number"), ("uppercase:0.5", "takes no probability")])
def test_bad_specs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        noise.apply("text", spec)
