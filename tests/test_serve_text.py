"""The server's output text as it streams: stop strings cut the text wherever the tokens split them,
a partial UTF-8 character is held back until complete, and the pieces add up to the whole text."""

import pytest

from moejax.checkpoint import load_tokenizer
from moejax.assets import shipped_checkpoint
from moejax.serve.text import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(shipped_checkpoint("stdlib-moe"))


TEXT = "def join(a, b):\n    return os.path.join(a, b)  # é → ok\n"


def pieces(tokenizer, stop, chunk):
    ids = tokenizer.encode(TEXT).ids
    stream, out = TextStream(tokenizer, stop), []
    for i in range(0, len(ids), chunk):
        out.append(stream.add(ids[i:i + chunk], finished=i + chunk >= len(ids)))
        if stream.stopped:
            break
    return out, stream


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_pieces_add_up_to_the_text(tokenizer, chunk):
    out, stream = pieces(tokenizer, [], chunk)
    assert "".join(out) == TEXT and not stream.stopped
    assert all("\ufffd" not in p for p in out)  # no piece ends inside a character


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("stop, before", [(["return"], "def join(a, b):\n    "), (["(a", "zz"], "def join"),
                                          (["é"], "def join(a, b):\n    return os.path.join(a, b)  # ")])
def test_stop_strings_cut_the_text(tokenizer, chunk, stop, before):
    out, stream = pieces(tokenizer, stop, chunk)
    assert stream.stopped and "".join(out) == before
    # the tokens kept end with the first one whose text completes a stop string, however many came
    ids = tokenizer.encode(TEXT).ids
    through = next(n for n in range(1, len(ids) + 1) if any(s in tokenizer.decode(ids[:n]) for s in stop))
    assert stream.token_ids == ids[:through]


def test_without_tokenizer_no_text():
    stream = TextStream(None, ["x"])
    assert stream.add([1, 2], finished=True) == "" and stream.token_ids == [1, 2]
