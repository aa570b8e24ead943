"""The competition's base checkpoint (`--competition.base`): what every student starts from, and
whose architecture defines what a submission must be.

A base is one of:
- a directory of ours (a Quasar checkpoint of this project);
- a directory in the published silx-ai format (`silx-ai/Quasar-3B-A1B-Preview` downloaded);
- a Hub id `owner/name` with `--competition.base_revision SHA` (the published model on the Hub).

Validators need only the architecture: `base_config` reads one config.json (downloaded alone for a
Hub id). Miners need the weights: `base_checkpoint` imports a published-format base once into
ROOT/base/ (`quasar.importer`, streaming) and reuses it afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from distill.cliconfig import ConfigError
from neurons.config import NodeSettings

log = logging.getLogger(__name__)


class BaseError(ConfigError):
    """The configured base cannot be used; the message says why and what to do."""


def _is_published(directory: Path) -> bool:
    from quasar.configuration import PUBLISHED_FORMAT_KEYS

    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BaseError(f"--competition.base {directory}: cannot read config.json ({e})") from None
    return isinstance(raw, dict) and bool(PUBLISHED_FORMAT_KEYS & set(raw))


def _source(settings: NodeSettings) -> tuple[str, Path | None]:
    """(the base as given, its local directory or None for a Hub id)."""
    base = settings.competition.base
    assert base is not None
    local = Path(base).expanduser()
    if local.is_dir():
        if settings.competition.base_revision is not None:
            raise BaseError(
                f"--competition.base {base} is a local directory: --competition.base_revision is for Hub ids"
            )
        return base, local
    return base, None


def base_config(settings: NodeSettings):
    """The QuasarConfig of the base: the competition's architecture (reads config.json only)."""
    from quasar.checkpoint import CheckpointError, read_checkpoint_config
    from quasar.importer import ImportRefused, published_config, read_published_config

    base, local = _source(settings)
    try:
        if local is not None:
            if _is_published(local):
                return published_config(read_published_config(local))
            return read_checkpoint_config(local)
        return published_config(read_published_config(_hub_config_dir(settings)))
    except (CheckpointError, ImportRefused) as e:
        raise BaseError(f"--competition.base {base}: {e}") from None


def _hub_config_dir(settings: NodeSettings) -> Path:
    from quasar.importer import COMMIT_SHA, HUB_ID

    base, revision = settings.competition.base, settings.competition.base_revision
    if not HUB_ID.match(base or ""):
        raise BaseError(f"--competition.base {base}: no such directory, and not a Hub id owner/name")
    if revision is None or not COMMIT_SHA.match(revision):
        raise BaseError(
            f"--competition.base {base} is a Hub id: give --competition.base_revision with the full 40-character "
            "commit sha, so that every node of the subnet starts from the same weights"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(base, "config.json", revision=revision)).parent
    except Exception as e:  # network, missing repo or revision: all say the same thing to an operator
        raise BaseError(f"--competition.base {base}@{revision}: cannot download config.json ({e})") from None


def imported_dir(settings: NodeSettings) -> Path:
    """Where the import of a published-format base lives: ROOT/base/<name>-<digest of the source>."""
    base, local = _source(settings)
    if local is not None:
        cfg = local / "config.json"
        weights = sorted((p.name, p.stat().st_size) for p in local.glob("*.safetensors"))
        key = json.dumps([str(local.resolve()), cfg.read_text(), weights])
        name = local.name
    else:
        key = f"{base}@{settings.competition.base_revision}"
        name = base.replace("/", "--")
    return settings.root_path / "base" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def base_checkpoint(settings: NodeSettings) -> Path:
    """A directory of ours holding the base's weights, importing a published-format base once."""
    from quasar.importer import ImportRefused, import_published

    base, local = _source(settings)
    if local is not None and not _is_published(local):
        return local
    out = imported_dir(settings)
    if (out / "config.json").is_file():  # imports are renamed into place only when complete
        return out
    log.info("importing the competition base %s into %s (once)", base, out)
    try:
        import_published(
            base,
            out,
            revision=settings.competition.base_revision,
            dtype="bf16",
            progress=False,
        )
    except ImportRefused as e:
        raise BaseError(f"--competition.base {base}: {e}") from None
    return out
