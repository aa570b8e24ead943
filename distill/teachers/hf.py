"""`HFTeacher`: exact top-k from any Hugging Face causal LM, on CPU or GPU.

The decoder runs once per batch; the LM head and an fp32 log_softmax then run over chunks of
positions, so a long sequence never holds a full [T, V] fp32 tensor (V is 151,936 for Qwen3 and
248,320 for Qwen3.5/GLM-class vocabularies). The tail mass is an exact logsumexp over the ids
outside the top-k, not 1 - sum(top-k), which loses all precision when the top-k holds nearly all mass.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.teachers.base import TeacherError, check_k, check_sequences
from distill.types import MISSING_ID, TopK

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TeacherError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        # bf16 where it is fast; fp32 on CPU, where bf16 matmuls are slow and lossy for no gain.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise TeacherError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))} or 'auto'") from None


def _local_fingerprint(path: Path) -> str:
    """Short hash of a local model directory's config and weight files (name, size, mtime): a cache
    keyed on the teacher name must not reuse logits after the weights at the same path change."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt") or f.name == "config.json":
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:10]


class HFTeacher:
    """Exact top-k next-token predictions from a transformers causal LM.

    `model` is a local directory or hub name (loaded with `trust_remote_code=False`, never anything
    else), or an already-built `PreTrainedModel` (moved to `device`/`dtype` in place when those are
    given). Sequences are sorted by length and right-padded into batches of at most `batch_size`
    sequences and `max_batch_tokens` padded tokens. `chunk_bytes` bounds the fp32 logits buffer
    per chunk of positions.
    """

    def __init__(
        self,
        model: str | Path | Any,
        tokenizer: Any = None,
        *,
        revision: str | None = None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        batch_size: int = 8,
        max_batch_tokens: int = 16384,
        max_model_len: int | None = None,
        chunk_bytes: int = 256 * 2**20,
        name: str | None = None,
    ) -> None:
        self.device = resolve_device(device)
        if isinstance(model, (str, Path)):
            self.model, self.tokenizer = self._load(str(model), tokenizer, revision, self.device, dtype)
            source = str(model)
        else:
            self.model, self.tokenizer = model, tokenizer
            if dtype not in (None, "auto"):
                self.model.to(resolve_dtype(dtype, self.device))
            self.model.to(self.device)
            source = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        self.model.eval()
        self.dtype = next(self.model.parameters()).dtype
        head = self.model.get_output_embeddings()
        if head is None:
            raise TeacherError(
                f"{type(self.model).__name__} has no output embeddings (LM head): not a causal LM"
            )
        self.vocab_size = int(head.weight.shape[0])
        if batch_size < 1 or max_batch_tokens < 1 or chunk_bytes < 1:
            raise TeacherError("batch_size, max_batch_tokens and chunk_bytes must be positive")
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len or getattr(self.model.config, "max_position_embeddings", None)
        self.chunk_rows = max(1, chunk_bytes // (4 * self.vocab_size))
        self._split_head: bool | None = None  # decided on first use (see _check_split_head)
        self.name = name or self._default_name(source, revision)

    # -- loading and naming ----------------------------------------------------------------------

    @staticmethod
    def _load(path: str, tokenizer: Any, revision: str | None, device: torch.device, dtype: Any):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_dtype = resolve_dtype(dtype, device)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, revision=revision, dtype=torch_dtype, trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise TeacherError(
                f"cannot load a causal LM from {path!r} (revision {revision or 'default'}): {exc}. "
                "Pass a local model directory or a hub name that is cached (HF_HUB_OFFLINE=1 forbids "
                "downloads); models that need trust_remote_code are not supported."
            ) from exc
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=False)
            except (OSError, ValueError):
                tokenizer = None  # ids in, ids out: the tokenizer is a convenience only
        return model.to(device), tokenizer

    def _default_name(self, source: str, revision: str | None) -> str:
        rev = revision or getattr(self.model.config, "_commit_hash", None)
        if not rev and Path(source).is_dir():
            rev = "local-" + _local_fingerprint(Path(source))
        dtype = str(self.dtype).removeprefix("torch.")
        return f"hf:{source}@{rev or 'unsaved'}:{dtype}"

    # -- top-k -----------------------------------------------------------------------------------

    def topk(self, sequences: list[list[int]], k: int) -> list[TopK]:
        if self.model is None:
            raise TeacherError(f"{self.name} is closed")
        k = check_k(k)
        seqs = check_sequences(sequences)
        for i, s in enumerate(seqs):
            if self.max_model_len and len(s) > self.max_model_len:
                raise TeacherError(
                    f"sequence {i} has {len(s)} tokens, more than the teacher's max_model_len "
                    f"{self.max_model_len}; split it or raise max_model_len"
                )
            if s and max(s) >= self.vocab_size:
                raise TeacherError(
                    f"sequence {i} has token id {max(s)}, outside the teacher vocabulary ({self.vocab_size})"
                )
        out: list[TopK | None] = [None] * len(seqs)
        # The last token predicts nothing we return, so the model sees ids[:-1].
        order = sorted((i for i, s in enumerate(seqs) if len(s) > 1), key=lambda i: -len(seqs[i]))
        for i, s in enumerate(seqs):
            if len(s) <= 1:
                out[i] = TopK.empty_rows(len(s), k)
        for batch in self._batches(order, seqs):
            for i, topk in zip(batch, self._run_batch([seqs[i][:-1] for i in batch], k)):
                out[i] = topk
        return out  # type: ignore[return-value]

    def _batches(self, order: list[int], seqs: list[list[int]]) -> list[list[int]]:
        batches: list[list[int]] = []
        cur: list[int] = []
        for i in order:  # longest first, so the first sequence of a batch sets its padded width
            width = len(seqs[cur[0]]) - 1 if cur else len(seqs[i]) - 1
            if cur and (len(cur) >= self.batch_size or (len(cur) + 1) * width > self.max_batch_tokens):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    @torch.inference_mode()
    def _run_batch(self, inputs: list[list[int]], k: int) -> list[TopK]:
        lengths = [len(s) for s in inputs]
        width = max(lengths)
        ids = torch.zeros(len(inputs), width, dtype=torch.long)
        mask = torch.zeros(len(inputs), width, dtype=torch.long)
        for b, s in enumerate(inputs):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self._split_head is None:
            self._split_head = self._check_split_head(ids[:1, : min(lengths[0], 16)])
        if self._split_head:
            states = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            rows = states[mask.bool()]  # [N, H]: real positions of all sequences, in order
            logits_of = self._head
        else:  # fallback for models whose head is not a plain projection: full logits, then chunks
            rows = self.model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
            logits_of = None
        top_ids, top_lps, tails = self._topk_rows(rows, k, logits_of)
        out: list[TopK] = []
        start = 0
        for n in lengths:
            tk = TopK.empty_rows(n + 1, k)
            tk.token_ids[1:] = top_ids[start : start + n]
            tk.logprobs[1:] = top_lps[start : start + n]
            tk.tail_logprob[1:] = tails[start : start + n]
            out.append(tk)
            start += n
        return out

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states, with the output scalings some families apply after the head."""
        logits = self.model.get_output_embeddings()(hidden).float()
        cfg = self.model.config
        if getattr(cfg, "logits_scaling", None):  # Granite
            logits = logits / cfg.logits_scaling
        if getattr(cfg, "logit_scale", None):  # Cohere
            logits = logits * cfg.logit_scale
        cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _check_split_head(self, probe: torch.Tensor) -> bool:
        """Whether base model + head reproduces the model's own logits (it does for Llama/Qwen/GLM-style
        models); if not, use the model's full forward, which costs a [T, V] logits tensor."""
        try:
            states = self.model.base_model(input_ids=probe).last_hidden_state
            split = self._head(states)
        except Exception as exc:  # an unusual architecture: the full forward is always correct
            log.warning("HFTeacher: base model + LM head failed (%s); using full-logits forward", exc)
            return False
        full = self.model(input_ids=probe).logits.float()
        tol = 1e-4 if self.dtype == torch.float32 else 3e-2
        err = (split - full).abs().max().item()
        ok = split.shape == full.shape and err <= tol * max(1.0, full.abs().max().item())
        if not ok:
            log.warning("HFTeacher: base model + LM head differs from the model's logits (%.3g); "
                        "using full-logits forward (more memory)", err)  # fmt: skip
        return ok

    def _topk_rows(self, rows: torch.Tensor, k: int, logits_of) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, kk = rows.shape[0], min(k, self.vocab_size)
        ids = np.full((n, k), MISSING_ID, dtype=np.int32)
        lps = np.full((n, k), -np.inf, dtype=np.float32)
        tails = np.full(n, -np.inf, dtype=np.float32)
        for s in range(0, n, self.chunk_rows):
            chunk = rows[s : s + self.chunk_rows]
            logits = logits_of(chunk) if logits_of is not None else chunk.float()
            lp = torch.log_softmax(logits, dim=-1)
            del logits
            val, idx = torch.topk(lp, kk, dim=-1)
            if kk < self.vocab_size:
                lp.scatter_(-1, idx, -torch.inf)  # in place: the rest of the row is the tail
                tails[s : s + len(chunk)] = torch.logsumexp(lp, dim=-1).cpu().numpy()
            del lp
            ids[s : s + len(chunk), :kk] = idx.cpu().numpy()
            lps[s : s + len(chunk), :kk] = val.cpu().numpy()
        return ids, lps, tails

    def close(self) -> None:
        """Drop the model (frees GPU memory once no one else holds it)."""
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> HFTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HFTeacher({self.name!r}, device={self.device}, vocab={self.vocab_size})"
