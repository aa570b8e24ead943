"""`VllmEngineTeacher`: top-k prompt logprobs from an in-process `vllm.LLM` (GPU machines).

No HTTP and no JSON, which matters at k = 128 over long sequences. vLLM is imported only when a
teacher is built: the package never needs it otherwise (it is CUDA-only and pins its own torch).
Scripts that build one must guard their entry point with `if __name__ == "__main__":` (vLLM starts
worker processes).
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
from pathlib import Path
from typing import Any

import numpy as np

from distill.teachers.base import TeacherError, check_k, check_sequences
from distill.teachers.vllm_parse import MAX_LOGPROB, select_flat
from distill.types import TopK

INSTALL_HINT = (
    "vLLM is not installed in this Python environment: `pip install '.[vllm]'` on a CUDA machine, "
    "or use kind=vllm-server (a vLLM server in its own process or container)"
)


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise TeacherError(f"{INSTALL_HINT} ({exc})") from exc
    return vllm


def _flat_arrays(plp: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(counts per position, token_ids, logprobs, ranks, rank_missing) of vLLM's prompt logprobs, read
    straight into arrays from `FlatLogprobs` (flat lists) or, one position at a time, from the
    list-of-dicts form. Ranks that are None are reported in `rank_missing` (their rank reads 0)."""
    if hasattr(plp, "start_indices") and hasattr(plp, "end_indices"):  # FlatLogprobs
        starts = np.asarray(plp.start_indices, dtype=np.int64)
        ends = np.asarray(plp.end_indices, dtype=np.int64)
        counts = ends - starts
        total = len(plp.token_ids)
        if starts.size and (starts[0] != 0 or ends[-1] != total or (starts[1:] != ends[:-1]).any()):
            index = np.concatenate([np.arange(lo, hi) for lo, hi in zip(starts.tolist(), ends.tolist())])
            pick = lambda values: [values[i] for i in index.tolist()]  # noqa: E731
        else:
            pick = lambda values: values  # noqa: E731
        tids, lps, ranks = pick(plp.token_ids), pick(plp.logprobs), pick(plp.ranks)
    else:
        counts_list, tids, lps, ranks = [], [], [], []
        for t in range(len(plp)):
            entry = plp[t]
            counts_list.append(len(entry) if entry else 0)
            if entry:
                for tid, lp in entry.items():
                    tids.append(tid)
                    lps.append(lp.logprob)
                    ranks.append(lp.rank)
        counts = np.asarray(counts_list, dtype=np.int64)
    tid = np.asarray(tids, dtype=np.int64)
    lp = np.asarray(lps, dtype=np.float64)
    try:
        rank = np.asarray(ranks, dtype=np.int64)
        missing = np.zeros(rank.size, dtype=bool)
    except TypeError:  # None among the ranks
        missing = np.array([r is None for r in ranks], dtype=bool)
        rank = np.asarray([0 if r is None else r for r in ranks], dtype=np.int64)
    return counts, tid, lp, rank, missing


def parse_engine_prompt_logprobs(plp: Any, prompt: list[int], k: int, where: str = "prompt") -> TopK:
    """`RequestOutput.prompt_logprobs` (FlatLogprobs or list of {id: Logprob}) -> validated `TopK`.

    No Python object per candidate on the flat form: its lists become arrays, checked and reduced to
    the top k with `select_flat` (the server's parser uses the same)."""
    if plp is None:
        raise TeacherError(f"{where}: vLLM returned no prompt logprobs (was prompt_logprobs set?)")
    n = len(prompt)
    if len(plp) != n:
        raise TeacherError(f"{where}: {len(plp)} prompt-logprob positions for a prompt of {n} tokens")
    counts, tid, lp, rank, missing = _flat_arrays(plp)
    if n and counts[0]:
        raise TeacherError(f"{where}: position 0 should have no prediction")
    pos = np.repeat(np.arange(n, dtype=np.int64), counts)
    # The first failing position decides, and within it the checks come in this order: no
    # candidates, the prompt token missing, then each candidate's logprob and rank in turn.
    empty = np.flatnonzero(counts[1:] == 0) + 1
    listed = np.bincount(pos[tid == np.asarray(prompt, dtype=np.int64)[pos]], minlength=n)
    unlisted = np.flatnonzero(listed[1:] == 0) + 1
    with np.errstate(invalid="ignore"):
        bad_lp = np.isnan(lp) | (lp > MAX_LOGPROB) | (lp == np.inf)
    bad = np.flatnonzero(bad_lp | missing)
    first = min(
        (int(empty[0]) if empty.size else n, 0),
        (int(unlisted[0]) if unlisted.size else n, 1),
        (int(pos[bad[0]]) if bad.size else n, 2),
    )
    if first[0] < n:
        t, check = first
        if check == 0:
            raise TeacherError(f"{where}: position {t} has no candidates")
        if check == 1:
            raise TeacherError(
                f"{where}: position {t} does not list the prompt token {prompt[t]}: misaligned"
            )
        i = int(bad[0])
        if bad_lp[i]:
            raise TeacherError(f"invalid logprob {float(lp[i])!r} for token {int(tid[i])}")
        raise TeacherError(f"missing rank for token {int(tid[i])}")
    if ((tid < 0) | (tid >= 2**31)).any():
        raise TeacherError(f"{where}: vLLM returned a token id out of range (0 <= id < 2**31)")
    rank = np.where(rank < 1, k + 1, rank)  # never selected (rank outside 1..k), but still a later listing
    return TopK(*select_flat(pos, tid, lp, rank, n, k))


class VllmEngineTeacher:
    """In-process vLLM engine with `max_logprobs` as the largest k it will serve.

    `engine_kwargs` go to `vllm.LLM` unchanged (e.g. tensor_parallel_size). `batch_size` caps the
    prompts per `generate` call (None: all at once; vLLM schedules them itself).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        max_logprobs: int = 128,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        revision: str | None = None,
        seed: int = 0,
        kv_cache_memory_bytes: int | None = None,
        batch_size: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        vllm = _import_vllm()
        from vllm.engine.arg_utils import EngineArgs

        engine_fields = {f.name for f in dataclasses.fields(EngineArgs)}
        kwargs: dict[str, Any] = dict(
            model=str(model),
            max_logprobs=max_logprobs,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            revision=revision,
            seed=seed,
            trust_remote_code=False,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if "logprobs_mode" in engine_fields:  # the model's own distribution, before any sampling transform
            kwargs["logprobs_mode"] = "raw_logprobs"
        kwargs.update(engine_kwargs or {})
        self.llm = vllm.LLM(**kwargs)
        self._SamplingParams = vllm.SamplingParams
        self._sp_fields = set(inspect.signature(vllm.SamplingParams).parameters)
        # "no top-k filter" is 0 in recent vLLM and -1 in older releases
        self._top_k_off = 0 if self._SamplingParams().top_k in (0, None) else -1
        cfg = self.llm.llm_engine.model_config
        self.vocab_size = int(cfg.get_vocab_size())
        self.max_model_len = int(cfg.max_model_len)
        self.max_logprobs = max_logprobs
        self.batch_size = batch_size
        dtype_name = str(getattr(cfg, "dtype", dtype)).removeprefix("torch.")
        self.name = name or f"vllm:{model}@{revision or 'default'}:{dtype_name}"
        self._params: dict[int, Any] = {}

    def _sampling_params(self, k: int) -> Any:
        if k not in self._params:
            kw: dict[str, Any] = dict(
                max_tokens=1,
                temperature=1.0,
                top_p=1.0,
                top_k=self._top_k_off,
                prompt_logprobs=k,
                detokenize=False,
            )
            if "flat_logprobs" in self._sp_fields:  # far fewer Python objects per position
                kw["flat_logprobs"] = True
            self._params[k] = self._SamplingParams(**kw)
        return self._params[k]

    def topk(self, sequences: list[list[int]], k: int) -> list[TopK]:
        if self.llm is None:
            raise TeacherError(f"{self.name} is closed")
        k = check_k(k)
        if self.max_logprobs != -1 and k > self.max_logprobs:
            raise TeacherError(
                f"k={k} is above this engine's max_logprobs={self.max_logprobs}; build the teacher with "
                f"max_logprobs >= {k}"
            )
        seqs = check_sequences(sequences)
        for i, s in enumerate(seqs):
            if len(s) > self.max_model_len - 1:
                raise TeacherError(
                    f"sequence {i} has {len(s)} tokens; the engine's max_model_len is {self.max_model_len} "
                    f"(prompts up to {self.max_model_len - 1} tokens): raise max_model_len or split it"
                )
            if s and max(s) >= self.vocab_size:
                raise TeacherError(
                    f"sequence {i} has token id {max(s)}, outside the vocabulary ({self.vocab_size})"
                )
        out: list[TopK | None] = [TopK.empty_rows(len(s), k) if len(s) <= 1 else None for s in seqs]
        todo = [i for i, s in enumerate(seqs) if len(s) > 1]
        step = self.batch_size or max(1, len(todo))
        params = self._sampling_params(k)
        for b in range(0, len(todo), step):
            idx = todo[b : b + step]
            outputs = self.llm.generate(
                [{"prompt_token_ids": seqs[i]} for i in idx], sampling_params=params, use_tqdm=False
            )
            if len(outputs) != len(idx):
                raise TeacherError(f"vLLM returned {len(outputs)} outputs for {len(idx)} prompts")
            for i, res in zip(idx, outputs):
                if res.prompt_token_ids is not None and list(res.prompt_token_ids) != seqs[i]:
                    raise TeacherError(f"sequence {i}: vLLM output belongs to a different prompt")
                out[i] = parse_engine_prompt_logprobs(res.prompt_logprobs, seqs[i], k, f"sequence {i}")
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Shut the engine down (its worker processes and GPU memory)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def __enter__(self) -> VllmEngineTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VllmEngineTeacher({self.name!r}, max_logprobs={self.max_logprobs})"
