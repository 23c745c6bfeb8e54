import hashlib
import pickle

import pytest
import torch

from flip.tokenizer import PAD_ID, UNK_ID, VOCAB_PATH, VOCAB_SIZE, Tokenizer

CAT_IDS = [1037, 6302, 1997, 1037, 4937, 1012]  # a photo of a cat .
LONG_CAPTION = " ".join(f"word number {i} of a very long caption about a cat." for i in range(20))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _vocab_lines():
    return VOCAB_PATH.read_text(encoding="utf-8").split("\n")[:-1]


def test_vocab_file_md5_and_size():
    assert hashlib.md5(VOCAB_PATH.read_bytes()).hexdigest() == "64800d5d8528ce344256daf115d4965e"
    lines = _vocab_lines()
    assert len(lines) == VOCAB_SIZE == 30522


def test_vocab_size(tok):
    assert tok.vocab_size == VOCAB_SIZE == 30522


@pytest.mark.parametrize(
    "token,idx",
    [
        ("[PAD]", 0),
        ("[UNK]", 100),
        ("[CLS]", 101),
        ("[SEP]", 102),
        ("the", 1996),
        ("cat", 4937),
        ("a", 1037),
        ("photo", 6302),
        ("of", 1997),
        (".", 1012),
    ],
)
def test_known_ids(tok, token, idx):
    assert _vocab_lines()[idx] == token  # checked against the file itself
    assert tok._tok.token_to_id(token) == idx


def test_photo_of_a_cat(tok):
    ids = tok("A photo of a cat.")
    assert ids.dtype == torch.long
    assert ids.shape == (1, 32)
    assert ids[0].tolist() == CAT_IDS + [0] * (32 - len(CAT_IDS))


def test_lowercasing_and_accents(tok):
    assert torch.equal(tok("A PHOTO OF A CAT."), tok("a photo of a cat."))
    assert torch.equal(tok("Café"), tok("cafe"))


def test_truncation_is_prefix_of_untruncated(tok):
    ids = tok(LONG_CAPTION)
    assert ids.shape == (1, 32)
    full = Tokenizer(context_length=1024)(LONG_CAPTION)[0]
    n_tokens = int((full != PAD_ID).sum())
    assert n_tokens > 32
    assert ids[0].tolist() == full[:32].tolist()
    assert (ids != PAD_ID).all()


def test_padding_with_zeros(tok):
    ids = tok("the cat")[0]
    assert ids[:2].tolist() == [1996, 4937]
    assert (ids[2:] == 0).all()


def test_empty_caption_is_all_padding(tok):
    assert tok("")[0].tolist() == [0] * 32
    assert tok("   ")[0].tolist() == [0] * 32


def test_unknown_words_map_to_unk(tok):
    assert tok("\U0001f431")[0, 0].item() == UNK_ID  # cat emoji
    assert tok("\u2603")[0, 0].item() == UNK_ID  # snowman
    assert tok("the \U0001f431 cat")[0, :3].tolist() == [1996, UNK_ID, 4937]


def test_no_cls_or_sep(tok):
    ids = tok(["A photo of a cat.", "", LONG_CAPTION, "[CLS] hello [SEP]", "[PAD] [MASK] [UNK]"])
    assert not torch.isin(ids, torch.tensor([101, 102, 103])).any()


def test_special_token_text_is_ordinary_text(tok):
    # Literal "[PAD]" in a web caption must not become padding (id 0), nor "[SEP]" id 102.
    ids = tok("[PAD] cat [SEP]")[0]
    expected = [1031, 11687, 1033, 4937, 1031, 19802, 1033]  # [ pad ] cat [ sep ]
    assert [_vocab_lines()[i] for i in expected] == ["[", "pad", "]", "cat", "[", "sep", "]"]
    assert ids.tolist() == expected + [0] * (32 - len(expected))
    assert tok.decode(ids) == "[ pad ] cat [ sep ]"


def test_determinism(tok):
    captions = ["A photo of a cat.", LONG_CAPTION, "\U0001f431 emoji"]
    assert torch.equal(tok(captions), tok(captions))
    assert torch.equal(tok(captions), Tokenizer()(captions))


def test_batch_equals_per_item(tok):
    captions = ["A photo of a cat.", "", LONG_CAPTION, "Two dogs playing in the snow", "\u2603"]
    batch = tok(captions)
    assert batch.shape == (len(captions), 32)
    for i, c in enumerate(captions):
        assert torch.equal(batch[i : i + 1], tok(c))
    assert torch.equal(tok(tuple(captions)), batch)


def test_empty_batch(tok):
    assert tok([]).shape == (0, 32)


def test_custom_context_length():
    t = Tokenizer(context_length=4)
    assert t("A photo of a cat.")[0].tolist() == CAT_IDS[:4]
    assert Tokenizer(context_length=8)("A photo of a cat.")[0].tolist() == CAT_IDS + [0, 0]
    assert Tokenizer(context_length=1)(["the cat", ""]).tolist() == [[1996], [0]]


def test_pickle_roundtrip(tok):
    captions = ["A photo of a cat.", LONG_CAPTION, ""]
    t5 = Tokenizer(context_length=5)
    for t in (tok, t5):
        clone = pickle.loads(pickle.dumps(t))
        assert clone.context_length == t.context_length
        assert torch.equal(clone(captions), t(captions))
    assert len(pickle.dumps(tok)) < 1000  # only settings + path, not the vocabulary


def test_decode(tok):
    assert tok.decode(tok("A photo of a cat.")[0]) == "a photo of a cat."
    assert tok.decode(tok("A photo of a cat.")) == "a photo of a cat."
    assert tok.decode(CAT_IDS) == "a photo of a cat."


@pytest.mark.parametrize("bad", [None, 123, b"bytes", ["ok", None], ["ok", 3]])
def test_non_string_inputs_raise(tok, bad):
    with pytest.raises(ValueError, match="str"):
        tok(bad)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "32"])
def test_bad_context_length_raises(bad):
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(context_length=bad)


def test_missing_vocab_raises(tmp_path):
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer(vocab_path=missing)
