"""CLIP's byte-level BPE tokenizer, written from the algorithm of OpenAI CLIP's `clip/simple_tokenizer.py`.

Both SD families tokenize the same way: clean the text (ftfy, HTML unescape, collapse whitespace, lower-case),
split it with CLIP's regex, map every UTF-8 byte to a printable character (so no input is ever unknown), and
merge characters with the 48,894 ranked BPE merges. A prompt becomes `<start_of_text> tokens <end_of_text>`,
padded to 77. The only difference between the families is the padding id: SD1's FrozenCLIPEmbedder (Hugging Face
CLIPTokenizer) pads with `<end_of_text>` (49407), SD2's FrozenOpenCLIPEmbedder (`open_clip.tokenize`) with 0.

The vocabulary is the `bpe_simple_vocab_16e6.txt.gz` that ships inside the installed `open_clip` package; it is
read from disk, never downloaded.
"""
from __future__ import annotations

import functools
import gzip
import heapq
import html
import importlib.util
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import regex
import torch

from imagic.config import EOT_TOKEN, SOT_TOKEN, TextConfig

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The file holds more merges than CLIP uses: CLIP keeps 49152 - 256 - 2 of them (vocab 49408 = 2*256 byte
# symbols + merges + 2 special tokens).
NUM_MERGES = 49152 - 256 - 2
# OpenAI CLIP's names, which transformers keeps; open_clip renamed them `<start_of_text>`/`<end_of_text>`. The
# names matter only when a prompt contains them literally: the pattern below then yields the special token.
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer: the special tokens, English contractions, runs of letters, single digits, runs of
# anything else that is not a space. `regex` (not `re`) for the Unicode classes \p{L} and \p{N}.
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

try:  # ftfy comes with open_clip; CLIP's own cleaning uses it to repair mojibake, curly quotes, full-width forms.
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None


def vocab_path() -> Path:
    """The BPE file inside the installed open_clip package (located without importing open_clip itself)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the CLIP vocabulary {VOCAB_FILE} comes with open_clip: pip install open_clip_torch")
    path = Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed open_clip package")
    return path


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> Dict[int, str]:
    """A reversible byte -> character map. Printable Latin-1 bytes map to themselves; the other 68 bytes
    (controls, space, ...) to characters 256+, so BPE symbols never contain whitespace or control codes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@functools.lru_cache(maxsize=None)
def load_bpe() -> Tuple[Dict[str, int], Dict[Tuple[str, str], int]]:
    """(encoder: symbol -> id, ranks: merge pair -> priority), built in CLIP's order:
    256 byte symbols, the same with the end-of-word marker `</w>`, one symbol per merge, then SOT and EOT."""
    lines = gzip.open(vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    encoder = {s: i for i, s in enumerate(vocab)}
    assert encoder[SOT] == SOT_TOKEN and encoder[EOT] == EOT_TOKEN, "unexpected CLIP vocabulary file"
    return encoder, {m: i for i, m in enumerate(merges)}


def clean(text: str) -> str:
    """CLIP's basic_clean + whitespace_clean + lower(). HTML is unescaped twice, as CLIP does ('&amp;amp;')."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class Tokenizer:
    """Text -> (B, context_length) token ids for a CLIP text encoder.

    `pad_token` is what fills the row after `<end_of_text>`: 49407 for SD1, 0 for SD2 (`TextConfig.pad_token`).
    """

    def __init__(self, pad_token: int, context_length: int = 77):
        self.pad_token = pad_token
        self.context_length = context_length
        self.encoder, self.ranks = load_bpe()
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # Per-instance cache (a decorated method would be shared by all instances and keep them alive).
        self.bpe = functools.lru_cache(maxsize=65536)(self._bpe)

    @classmethod
    def for_text_config(cls, cfg: TextConfig) -> "Tokenizer":
        return cls(cfg.pad_token, cfg.context_length)

    def _bpe(self, word: str) -> Tuple[str, ...]:
        """Merge the characters of one pre-token, lowest-ranked pair first, until no known pair is left.
        The last character carries `</w>` so word-final pieces get their own ids.

        CLIP's loop rescans the whole word for its best pair after every merge, which is quadratic: a pasted
        100,000-letter "word" takes it many minutes. Here the same merges are made in the same order (all
        occurrences of the best pair, left to right, then the next best pair) from a heap of candidate pairs
        over a linked list of symbols, in O(n log n).
        """
        if word in (SOT, EOT):
            return (word,)
        parts: List[Optional[str]] = list(word[:-1]) + [word[-1] + "</w>"]
        nxt = list(range(1, len(parts))) + [-1]  # linked list over `parts`; merged-away symbols become None
        prv = list(range(-1, len(parts) - 1))
        heap = [(self.ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in self.ranks]
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            starts = set()
            while heap and heap[0][0] == rank:
                starts.add(heapq.heappop(heap)[1])
            merged = []
            for i in sorted(starts):  # every occurrence of this pair, left to right, as CLIP's scan does
                j = nxt[i]
                if parts[i] is None or j < 0 or self.ranks.get((parts[i], parts[j])) != rank:
                    continue  # stale: a neighbour was merged since this pair was queued
                parts[i], parts[j] = parts[i] + parts[j], None  # type: ignore[operator]
                nxt[i] = nxt[j]
                if nxt[i] >= 0:
                    prv[nxt[i]] = i
                merged.append(i)
            for i in {k for m in merged for k in (prv[m], m) if k >= 0 and nxt[k] >= 0}:  # the new pairs
                pair = (parts[i], parts[nxt[i]])
                if pair in self.ranks:
                    heapq.heappush(heap, (self.ranks[pair], i))  # type: ignore[index]
        return tuple(p for p in parts if p is not None)

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`, without start/end tokens and without truncation."""
        ids: List[int] = []
        for piece in PATTERN.findall(clean(text)):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(symbols))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`. A leading `<start_of_text>` is skipped and decoding stops at `<end_of_text>`, so a
        padded row from `__call__` decodes to its prompt whatever the padding id."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == SOT_TOKEN:
            ids = ids[1:]
        if EOT_TOKEN in ids:
            ids = ids[:ids.index(EOT_TOKEN)]
        symbols = "".join(self.decoder[i] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """(B, context_length) int64 ids: SOT, tokens, EOT, padding. Too-long prompts keep their first
        context_length - 2 tokens (then EOT), as both SD tokenizers do, with a warning."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_token, dtype=torch.long)
        keep = self.context_length - 2
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > keep:
                shown = self.decode(ids[keep:keep + 16]) + (" ..." if len(ids) > keep + 16 else "")
                warnings.warn(f"prompt is {len(ids)} tokens, the text encoder reads {keep}: the last "
                              f"{len(ids) - keep} tokens are dropped ({shown!r})", stacklevel=2)
                ids = ids[:keep]
            out[row, :len(ids) + 2] = torch.tensor([SOT_TOKEN, *ids, EOT_TOKEN])
        return out
