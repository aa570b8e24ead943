"""Tiny local teachers, tokenizers and text for offline runs, tests and benchmarks (nothing is downloaded).

- `local_corpus()`: English prose every Python installation carries, the docstrings of a fixed list
  of standard-library modules (PSF licence), split into paragraph documents.
- `train_tokenizer()`: a byte-level BPE tokenizer trained on given text, as a transformers
  `PreTrainedTokenizerFast`. Different vocabulary sizes or texts give different merges, which is how
  tests get two genuinely different tokenizers (a GLM-like teacher and a Qwen-like student).
- `build_qwen3_teacher()`: a small Qwen3 causal LM (the architecture of the Qwen teachers, and one
  vLLM serves) for a tokenizer, optionally trained for a few hundred steps so its predictions carry
  real structure.
- `OracleTeacher`: a `Teacher` over any byte-level vocabulary that knows the text it is asked
  about (probability p on the true next token), for measuring and testing cross-tokenizer
  alignment with real vocabularies without a real model.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from distill.types import TopK

EOS_TOKEN = "<|endoftext|>"

# Fixed, so the corpus is the same on every machine with the same Python minor version.
CORPUS_MODULES = (
    "argparse", "asyncio.events", "asyncio.tasks", "base64", "bisect", "calendar", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "enum", "fractions", "functools", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math", "mimetypes",
    "multiprocessing.pool", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib",
    "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "turtle", "typing",
    "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "zipfile",
)  # fmt: skip


def local_corpus(min_chars: int = 200) -> list[str]:
    """Paragraph documents (at least `min_chars` characters) from standard-library docstrings."""
    docs: list[str] = []
    seen: set[str] = set()
    for name in CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # a module missing from a stripped-down Python: skip it, stay deterministic
            continue
        members = [module] + [
            obj
            for _, obj in sorted(vars(module).items())
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name
        ]
        for obj in members:
            with warnings.catch_warnings():  # some stdlib members warn when their docs are read
                warnings.simplefilter("ignore")
                doc = inspect.getdoc(obj) or ""
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                if len(text) >= min_chars and text not in seen:
                    seen.add(text)
                    docs.append(text)
    return docs


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path | None = None):
    """A byte-level BPE tokenizer (GPT-2/Qwen style) trained on `texts`; saved to `out_dir` if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_qwen3_teacher(
    tokenizer,
    out_dir: str | Path | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    train_texts: list[str] | None = None,
    train_steps: int = 0,
    seq_len: int = 128,
    batch_size: int = 8,
    lr: float = 3e-3,
):
    """A Qwen3ForCausalLM for `tokenizer` (head_dim 32: the smallest vLLM's CPU attention accepts),
    randomly initialised from `seed`, then trained for `train_steps` next-token steps on `train_texts`.
    Saved in float32 with the tokenizer to `out_dir` if given (a directory vLLM and `hf` can load)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = Qwen3ForCausalLM(config)
    if train_steps:
        if not train_texts:
            raise ValueError("train_steps > 0 needs train_texts")
        _train_next_token(model, tokenizer, train_texts, train_steps, seq_len, batch_size, lr, seed)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    return model


def _train_next_token(model, tokenizer, texts, steps, seq_len, batch_size, lr, seed) -> None:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    stream = torch.tensor(ids, dtype=torch.long)
    n_windows = (len(stream) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"training text has {len(stream)} tokens, fewer than seq_len={seq_len}")
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay to 10%
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        batch = windows[torch.randint(0, n_windows, (batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


class OracleTeacher:
    """A deterministic `Teacher` for a tokenizer's vocabulary that knows the text it is asked about.

    Row t puts probability `p` on the token that really comes next, x_t, and `spread` evenly on up
    to k - 1 other tokens whose bytes are a prefix of the text from x_t on, longest first (the
    guesses of a model unsure where the next token ends: shorter than x_t, or running into the
    token after it); the rest of the mass is the tail. No model is involved: what alignment makes of
    such rows depends only on the two vocabularies and the text.
    """

    MAX_CANDIDATE_BYTES = 64  # longer vocabulary entries (runs of spaces, rules) are never guesses

    def __init__(self, tokenizer, *, p: float = 0.9, spread: float = 0.08, name: str = "oracle") -> None:
        from distill.teachers.align import token_bytes

        if not (0 < p <= 1 and 0 <= spread <= 1 - p and spread < p):
            raise ValueError(
                f"need 0 < p <= 1, 0 <= spread <= 1 - p and spread < p; got p={p}, spread={spread}"
            )
        self.p, self.spread = p, spread
        self._bytes = token_bytes(tokenizer)
        self._ids: dict[bytes, int] = {}
        for i, b in enumerate(self._bytes):
            if b:
                self._ids.setdefault(b, i)
        self.vocab_size = len(self._bytes)
        self.name = f"{name}-p{p:g}-s{spread:g}"

    def topk(self, sequences: list[list[int]], k: int) -> list[TopK]:
        return [self._rows(list(seq), k) for seq in sequences]

    def _rows(self, seq: list[int], k: int) -> TopK:
        rows = TopK.empty_rows(len(seq), k)
        pieces = [self._bytes[i] or b"" for i in seq]
        text = b"".join(pieces)
        starts = np.concatenate([[0], np.cumsum([len(b) for b in pieces])]).tolist()
        for t in range(1, len(seq)):
            window = text[starts[t] : starts[t] + self.MAX_CANDIDATE_BYTES]
            guesses: list[int] = []
            for n in range(len(window), 0, -1):
                j = self._ids.get(window[:n])
                if j is not None and j != seq[t]:
                    guesses.append(j)
                    if len(guesses) == k - 1:
                        break
            each = self.spread / len(guesses) if guesses else 0.0
            probs = [self.p] + [each] * len(guesses)
            rows.token_ids[t, : len(probs)] = [seq[t], *guesses]
            with np.errstate(divide="ignore"):
                rows.logprobs[t, : len(probs)] = np.log(probs)
                rows.tail_logprob[t] = np.log1p(-min(sum(probs), 1.0))
        return rows

    def close(self) -> None:
        pass
