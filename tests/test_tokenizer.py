"""Our BPE tokenizer against the two tokenizers SD used: Hugging Face CLIPTokenizer (SD1, pad 49407), built offline
from open_clip's vocabulary file, and `open_clip.tokenize` (SD2, pad 0)."""
from __future__ import annotations

import gzip
import json
import warnings

import open_clip
import pytest
import torch
from open_clip.tokenizer import bytes_to_unicode as open_clip_bytes_to_unicode
from transformers import CLIPTokenizer

from imagic.config import TextConfig
from imagic.tokenizer import Tokenizer, clean, vocab_path

LONG = "a very detailed photograph of " + ", ".join(f"item number {i}" for i in range(40))
PROMPTS = [
    "a photo of a dog sitting on a bench",
    "",
    LONG,
    "un café naïve à la crème",
    "a dog 🐶 with a party hat 🎉🎉",
    "一只猫坐在桌子上 and a 犬",
    "Hello!!! What's this?? (really) -- [yes] {no}; it's 100% #1 @home",
    "  lots   of \t spaces\n\nand newlines  ",
    "A PHOTO OF AN ASTRONAUT Riding A Horse",
    "salt &amp; pepper &lt;3 &quot;quoted&quot; &amp;amp;",
    "“curly quotes” and ﬁne ligatures and ＦＵＬＬＷＩＤＴＨ",
]
# Prompts whose text transformers 5's CLIPTokenizer does not clean as CLIP does: it normalises with NFC +
# whitespace + lower-case only, without CLIP's ftfy.fix_text and html.unescape (its old slow tokenizer used
# ftfy when installed). ftfy turns curly quotes into straight ones, ligatures into letters, full-width forms into
# ASCII; html.unescape turns `&amp;` into `&`. SD1 itself ran transformers 4's tokenizer, which did use ftfy if
# present but never unescaped HTML. test_transformers_differs_only_by_cleaning checks that this is the only cause.
HF_CLEANING_DIFFERS = {PROMPTS[-2], PROMPTS[-1]}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> CLIPTokenizer:
    """CLIPTokenizer from vocab.json + merges.txt written from the .gz the way CLIP builds its vocabulary:
    the 256 byte symbols, the same with '</w>', one symbol per merge, then the two special tokens."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = list(open_clip_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def hf_ids(tok: CLIPTokenizer, texts) -> torch.Tensor:
    """What ldm's FrozenCLIPEmbedder.forward asks of the tokenizer."""
    return tok(texts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]


def tokenize(tok: Tokenizer, texts) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(texts)


def test_vocabulary_comes_from_open_clip():
    assert vocab_path().parent.name == "open_clip" and vocab_path().is_file()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sd2_matches_open_clip(prompt):
    ids = tokenize(Tokenizer(pad_token=0), prompt)
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert torch.equal(ids, open_clip.tokenize(prompt))


@pytest.mark.parametrize("prompt", [p for p in PROMPTS if p not in HF_CLEANING_DIFFERS])
def test_sd1_matches_transformers(prompt, hf_tokenizer):
    assert torch.equal(tokenize(Tokenizer(pad_token=49407), prompt), hf_ids(hf_tokenizer, prompt))


@pytest.mark.parametrize("prompt", sorted(HF_CLEANING_DIFFERS))
def test_transformers_differs_only_by_cleaning(prompt, hf_tokenizer):
    ours = tokenize(Tokenizer(pad_token=49407), prompt)
    assert not torch.equal(ours, hf_ids(hf_tokenizer, prompt))  # else the prompt belongs in the main test
    assert torch.equal(ours, hf_ids(hf_tokenizer, clean(prompt)))


def test_batch_and_padding(hf_tokenizer):
    sd1 = Tokenizer.for_text_config(TextConfig(kind="openai"))
    sd2 = Tokenizer.for_text_config(TextConfig(kind="openclip"))
    batch = ["a dog", "a cat on a mat"]
    assert torch.equal(sd1(batch), hf_ids(hf_tokenizer, batch))
    assert torch.equal(sd2(batch), open_clip.tokenize(batch))
    assert sd1(batch)[0, 3:].eq(49407).all() and sd2(batch)[0, 4:].eq(0).all()


def test_long_prompt_warns_and_keeps_75_tokens():
    tok = Tokenizer(pad_token=49407)
    n = len(tok.encode(LONG))
    assert n > 75
    with pytest.warns(UserWarning, match=f"last {n - 75} tokens are dropped"):
        ids = tok(LONG)
    assert ids[0, 0] == 49406 and ids[0, 76] == 49407
    assert ids[0, 1:76].tolist() == tok.encode(LONG)[:75]


def test_decode_round_trip():
    tok = Tokenizer(pad_token=0)
    text = "a photo of a café, 2 dogs 🐶 and 一只猫!"
    assert tok.decode(tok(text)[0]) == clean(text).replace(",", " ,").replace("!", " !")
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_literal_special_tokens_follow_openai_clip(hf_tokenizer):
    """CLIP's pattern matches its special-token names inside the text. We keep OpenAI's names (as transformers
    does); open_clip renamed them `<start_of_text>`/`<end_of_text>`, so only there does the literal differ."""
    text = "a <|endoftext|> b"
    ours = tokenize(Tokenizer(pad_token=49407), text)
    assert torch.equal(ours, hf_ids(hf_tokenizer, text))
    assert ours[0, :5].tolist() == [49406, 320, 49407, 321, 49407]
