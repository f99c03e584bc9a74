"""
CLIP's tokenizer: byte-level byte-pair encoding (BPE), giving the same ids as OpenAI's
`simple_tokenizer.py`.

How a string becomes ids, step by step:
1. Clean: ftfy repairs broken unicode ("Ã©" -> "é"), HTML entities are unescaped twice (as CLIP
   does, so "&amp;lt;" also becomes "<"), runs of whitespace collapse to one space, and everything
   is lower-cased.
2. Split into pieces with CLIP's regex: the two special tokens, English contractions ('s 't 're 've
   'm 'll 'd), runs of letters, single digits, and runs of other non-space symbols. Whitespace is
   dropped; BPE never merges across pieces, so a piece is a "word".
3. Bytes to unicode: each piece is UTF-8 encoded, and each byte is written as one printable unicode
   character (printable ASCII and Latin-1 bytes stand for themselves, the other 68 are shifted to
   chr(256 + n)). Any text, emoji and CJK included, becomes a string over a 256-symbol alphabet with
   no whitespace or control characters, so the merges file can be plain text with one
   space-separated pair per line, and nothing is ever unknown.
4. Mark the word end: the last symbol gets "</w>" appended. "cat" at the end of a word ("cat</w>")
   and "cat" inside "catalog" become different tokens, and decoding knows where to put spaces back.
5. Merge by rank: the merges file lists symbol pairs in the order they were learned (most frequent
   first). Among the adjacent pairs of the word, take the one learned earliest, fuse every
   occurrence of it, and repeat until no adjacent pair is in the list. Each remaining symbol is a
   vocab entry.
6. Ids: the vocab is the 256 byte symbols, the same 256 with "</w>", the fused string of every merge
   in rank order, then <|startoftext|> and <|endoftext|>. With OpenAI's 48894 merges that is 49408
   tokens, SOT = 49406 and EOT = 49407. Words repeat a lot, so step 5 is cached per word.

`tokenize(texts)` wraps ids as [SOT] + ids + [EOT] in rows of 77 padded with 0, the input of CLIP's
text encoder. `Tokenizer(byte_level=True)` skips step 5 (no merges file, works offline): 512 byte
tokens, SOT = 512, EOT = 513, for models trained from scratch. Run `python tokenizer.py "some text"`
to see a string tokenized.
"""
import functools
import gzip
import html
import os
import sys

import ftfy
import regex
import torch

BPE_URL = "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP uses lines 1..48894 of the file (line 0 is a version header)
SOT, EOT = "<|startoftext|>", "<|endoftext|>"

PIECES = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class VocabError(RuntimeError):
    """The merges file cannot be found or read; the message says where to put it."""


def bytes_to_unicode():
    """Byte value -> printable character. The dict's order fixes the ids of the first 256 tokens (as
    in CLIP)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]  # space, control characters, soft hyphen, ...
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(moved)}


def clean(text):
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return regex.sub(r"\s+", " ", text).strip().lower()


def cache_dir():
    """Where downloads are kept: $VIFI_CACHE, else ~/.cache/vifi."""
    return os.environ.get("VIFI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vifi")


def find_vocab(bpe_path=None):
    """The merges file: `bpe_path`, else $VIFI_BPE, else the one in cache_dir(). Nothing is
    downloaded here: vifi.py fetches the file into the cache for the models that need it."""
    path = bpe_path or os.environ.get("VIFI_BPE")
    if path:
        if not os.path.isfile(path):
            raise VocabError(f"BPE vocab {path} does not exist; expected OpenAI's {BPE_FILE} ({BPE_URL}).")
        return path
    path = os.path.join(cache_dir(), BPE_FILE)
    if not os.path.isfile(path):
        raise VocabError(f"No BPE vocab: $VIFI_BPE is not set and {path} does not exist. Download {BPE_URL} "
                         "there (vifi.ViFiCLIP does so for a CLIP of OpenAI's vocabulary), or set $VIFI_BPE "
                         "to a copy of it.")
    return path


def load_merges(path):
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:  # not gzip, truncated, or not text
        raise VocabError(f"BPE vocab {path} is not a readable gzip file ({e}); expected "
                         f"OpenAI's {BPE_FILE}.") from e
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if "#version" not in lines[0] or any(len(m) != 2 for m in merges):
        raise VocabError(f"BPE vocab {path} is not a merges file (a version line, then one pair per line).")
    return merges


class Tokenizer:
    """CLIP's BPE. `.encode(text) -> list[int]`, `.decode(ids) -> str`; `.sot`/`.eot` are the
    start/end token ids and `.vocab_size` the number of ids (the token embedding's rows).
    `byte_level=True` uses no merges file."""

    def __init__(self, bpe_path=None, byte_level=False):
        if byte_level and bpe_path:
            raise ValueError("Tokenizer: pass either bpe_path or byte_level=True, not both.")
        merges = [] if byte_level else load_merges(find_vocab(bpe_path))
        self.byte_encoder = bytes_to_unicode()
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        # EOT comes last, so it is the largest id: CLIP's text encoder finds it with argmax(ids).
        self.vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(self.vocab)}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.sot, self.eot, self.vocab_size = self.encoder[SOT], self.encoder[EOT], len(self.vocab)
        # Decoding: each id back to its bytes, a word end back to a space.
        self.id_bytes = [bytes(byte_decoder[c] for c in t.removesuffix("</w>"))
                         + (b" " if t.endswith("</w>") else b"")
                         for t in self.vocab]
        # word -> ids; the special tokens are seeded so that "<|endoftext|>" in a text maps to EOT,
        # as in CLIP.
        self.cache = {SOT: [self.sot], EOT: [self.eot]}

    def bpe(self, word):
        """Ids of one word (a string over the byte alphabet)."""
        if word in self.cache:
            return self.cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break  # no adjacent pair was ever merged in training
            fused, i = [], 0
            while i < len(parts):  # fuse every occurrence, left to right, non-overlapping
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    fused.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    fused.append(parts[i])
                    i += 1
            parts = fused
        self.cache[word] = ids = [self.encoder[p] for p in parts]
        return ids

    def encode(self, text):
        ids = []
        for piece in PIECES.findall(clean(text)):
            ids.extend(self.bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return ids

    def decode(self, ids):
        """Text of `ids`, with one space after each word (the last one stripped). Bad UTF-8 becomes
        U+FFFD."""
        data = b"".join(self.id_bytes[int(i)] for i in ids)
        return data.decode("utf-8", errors="replace").removesuffix(" ")


@functools.lru_cache(maxsize=None)
def default_tokenizer():
    """One Tokenizer per process, so tokenize() parses the 49k merges only once."""
    return Tokenizer()


def tokenize(texts, context_length=77, truncate=True, tokenizer=None):
    """A str or list of str -> LongTensor (N, context_length) of rows [SOT] + ids + [EOT], padded
    with 0."""
    tok = tokenizer or default_tokenizer()
    texts = [texts] if isinstance(texts, str) else texts
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in zip(out, texts):
        ids = [tok.sot, *tok.encode(text), tok.eot]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"Text {text!r} is {len(ids)} tokens long (with SOT and EOT), more than "
                                 f"context_length={context_length}; shorten it or pass truncate=True.")
            # keep EOT: the text features are read at its position
            ids = ids[: context_length - 1] + [tok.eot]
        row[: len(ids)] = torch.tensor(ids)
    return out


if __name__ == "__main__":
    try:
        tok = Tokenizer()
    except VocabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    ids = tok.encode(" ".join(sys.argv[1:]) or "a photo of a cat.")
    print("ids:    ", ids)
    print("tokens: ", [tok.vocab[i] for i in ids])
    print("decoded:", repr(tok.decode(ids)))
