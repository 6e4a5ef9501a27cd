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
