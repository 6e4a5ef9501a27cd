"""Incremental detokenization: multi-byte characters split across tokens, and stop strings never emitted."""

from __future__ import annotations

from pdserve.engine.detokenizer import Detokenizer

TEXT = " Café ☕ 日本語のテキスト 🤖🎉 naïve — done."


def _stream(tokenizer, text: str, stop: list[str]) -> tuple[list[str], bool]:
    ids = tokenizer.encode(text)
    detok = Detokenizer(tokenizer, tokenizer.encode("Say:"), stop, skip_special=True)
    pieces = []
    stopped = False
    for i, t in enumerate(ids):
        stopped = detok.add_token(t)
        pieces.append(detok.take(finished=stopped or i == len(ids) - 1))
        if stopped:
            break
    return pieces, stopped


def test_multibyte_split_across_tokens(tokenizer):
    ids = tokenizer.encode(TEXT)
    # the test only means something if some characters really are split across tokens
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    pieces, _ = _stream(tokenizer, TEXT, [])
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_never_emitted(tokenizer):
    pieces, stopped = _stream(tokenizer, TEXT, ["テキ"])
    assert stopped
    assert "".join(pieces) == tokenizer.decode(tokenizer.encode(TEXT)).split("テキ")[0]
    assert not any("テ" in p for p in pieces)


def test_stop_string_spanning_tokens_is_held_back(tokenizer):
    pieces, stopped = _stream(tokenizer, " one two three four", ["two thr"])
    assert stopped
    assert "".join(pieces) == " one "


def test_rust_decode_matches_the_tokenizer_with_and_without_special_tokens(tokenizer):
    """The detokenizer calls the Rust tokenizer directly (no clean-up configured for this one); the
    text must be what `tokenizer.decode` gives, special tokens kept or skipped."""
    assert not tokenizer.clean_up_tokenization_spaces
    ids = tokenizer.encode(" a <b> " + TEXT) + [tokenizer.eos_token_id] + tokenizer.encode(" after")
    for skip in (True, False):
        detok = Detokenizer(tokenizer, [], [], skip_special=skip)
        assert detok.backend is tokenizer.backend_tokenizer
        for t in ids:
            detok.add_token(t)
        assert detok.take(finished=True) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_a_tokenizer_that_cleans_up_spaces_decodes_through_transformers(tokenizer):
    class CleaningUp:  # what decode would do differently: the detokenizer must not bypass it
        clean_up_tokenization_spaces = True
        backend_tokenizer = tokenizer.backend_tokenizer

        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).replace(" .", ".")

    detok = Detokenizer(CleaningUp(), [], [], skip_special=True)
    assert detok.backend is None
    for t in tokenizer.encode(" end ."):
        detok.add_token(t)
    assert detok.take(finished=True) == " end."


def test_special_tokens_skipped_stay_out_of_the_window(tokenizer):
    """ignore_eos past an EOS: a model may emit EOS for thousands of steps; each must cost one lookup,
    not a decode of every EOS so far, and the text must come out as tokenizer.decode gives it."""
    ids = tokenizer.encode(" before") + [tokenizer.eos_token_id] * 2000 + tokenizer.encode(" after")
    detok = Detokenizer(tokenizer, [], [], skip_special=True)
    window = 0
    for t in ids:
        detok.add_token(t)
        window = max(window, len(detok.ids) - detok.prefix_offset)
    assert window <= 4
    assert detok.take(finished=True) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_strings_wait_for_min_tokens(tokenizer):
    """As vLLM: no stop string ends a request before min_tokens; text from then on is searched, the
    text before is not searched again."""
    ids = tokenizer.encode(" 1, 2, 3, 4, 5, 6")
    detok = Detokenizer(tokenizer, [], [","], skip_special=True)
    assert [tokenizer.decode([t]) for t in ids[:6]] == [" ", "1", ",", " ", "2", ","]
    stopped_at = next(i for i, t in enumerate(ids) if detok.add_token(t, check_stop=i >= 5))
    assert stopped_at == 5 and detok.take(finished=True) == " 1, 2"  # the first "," did not stop it
