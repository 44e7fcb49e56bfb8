"""A base model from a local folder is keyed by its content: weights replaced in place are another base, so no
adapter, stored 4-bit base, prediction or figure made from the old weights is reused or unmarked.
(harness/models/folder_digest.py, harness/models/revision.py.)"""

from __future__ import annotations

import os
import time

import pytest

import harness.models.folder_digest as folder_digest
import harness.models.nf4_store as nf4_store
import harness.models.revision as revision
import harness.train.adapters as adapters
from fixtures.user_runs import write_profile
from harness.config.errors import ConfigError
from harness.config.preflight import check_profile_data, prepare_profile
from harness.config.profiles import config_hash, load_profile
from harness.measure import predictions


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A folder with a config and a weights file (content only: nothing here loads it), and the digest memo in
    ``tmp_path`` rather than the project's runs/."""
    monkeypatch.setattr(revision, "DIGEST_MEMO", tmp_path / "memo" / "file-digests.json")
    folder = tmp_path / "my-mistral"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "mistral"}')
    (folder / "model.safetensors").write_bytes(b"A" * 4096)
    return folder


def _rewrite_in_place(path, data: bytes) -> None:
    """New bytes of the same size, with the old modification time put back (as ``cp -p`` or ``rsync -t`` would)."""
    st = path.stat()
    time.sleep(0.05)  # past the file system clock's tick, so the write's ctime is another
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _keys(profile) -> dict:
    """Every key a base's content must reach."""
    return {"config": config_hash(profile), "base": revision.base_identity(profile.model),
            "adapter": adapters.artifact_key(profile, profile.variant("r8"), check_profile_data(profile)["train"]),
            "nf4": nf4_store.key_parts(profile.model, profile.quantization, "cpu"),
            "eval": predictions.eval_key(profile, "fp")}


def test_weights_replaced_in_place_change_every_key_of_the_base(tmp_path, checkpoint):
    profile = load_profile(write_profile(tmp_path / "p", {"model": {"source": str(checkpoint), "revision": None}}))
    pinned, _, _ = prepare_profile(profile)
    assert pinned.model.content and len(pinned.model.content) == 64
    before = _keys(pinned)
    assert prepare_profile(profile)[0].model.content == pinned.model.content  # the same bytes: the same base
    _rewrite_in_place(checkpoint / "model.safetensors", b"B" * 4096)
    after = _keys(prepare_profile(profile)[0])
    assert [k for k in before if before[k] == after[k]] == []


def test_files_from_pretrained_never_reads_do_not_change_the_digest(tmp_path, checkpoint):
    first = folder_digest.folder_digest(checkpoint, tmp_path / "memo.json")
    (checkpoint / ".cache" / "huggingface").mkdir(parents=True)
    (checkpoint / ".cache" / "huggingface" / "download.lock").write_text("x")
    (checkpoint / ".DS_Store").write_text("x")
    assert folder_digest.folder_digest(checkpoint, tmp_path / "memo.json") == first
    (checkpoint / "tokenizer.json").write_text("{}")
    assert folder_digest.folder_digest(checkpoint, tmp_path / "memo.json") != first


def test_the_memo_spares_rehashing_only_while_a_files_stat_is_unchanged(tmp_path, checkpoint, monkeypatch):
    """A file is hashed once; a rewrite with its size and modification time put back still moves its ctime, so it
    is hashed again. A file written within ``RACY_S`` of its hashing is not memoised (git's racy-index rule)."""
    hashed = []
    real = folder_digest._sha256
    monkeypatch.setattr(folder_digest, "_sha256", lambda p: hashed.append(p.name) or real(p))
    memo = tmp_path / "memo.json"
    folder_digest.folder_digest(checkpoint, memo)
    folder_digest.folder_digest(checkpoint, memo)
    assert hashed.count("model.safetensors") == 2  # just written: racy, not memoised
    monkeypatch.setattr(folder_digest, "RACY_S", 0.01)
    time.sleep(0.05)
    hashed.clear()
    first = folder_digest.folder_digest(checkpoint, memo)
    assert folder_digest.folder_digest(checkpoint, memo) == first
    assert hashed == ["config.json", "model.safetensors"]  # the second call read the memo
    _rewrite_in_place(checkpoint / "model.safetensors", b"B" * 4096)
    time.sleep(0.05)
    second = folder_digest.folder_digest(checkpoint, memo)
    assert second != first and hashed[2:] == ["model.safetensors"]
    memo.write_text("not json")
    assert folder_digest.folder_digest(checkpoint, memo) == second  # an unreadable memo: hashed again, same answer
    assert hashed[3:] == ["config.json", "model.safetensors"]


def test_an_empty_folder_is_refused_naming_the_profile_line(tmp_path, checkpoint):
    for f in checkpoint.iterdir():
        f.unlink()
    profile = load_profile(write_profile(tmp_path / "p", {"model": {"source": str(checkpoint), "revision": None}}))
    line = next(i for i, x in enumerate(open(profile.source_file, encoding="utf-8"), 1) if "source:" in x)
    with pytest.raises(ConfigError, match=rf"profile.yaml:{line}: model.source: cannot key the folder .* no files"):
        prepare_profile(profile)


def test_an_unpinned_folder_source_is_refused_by_the_keys(tmp_path, checkpoint):
    profile = load_profile(write_profile(tmp_path / "p", {"model": {"source": str(checkpoint), "revision": None}}))
    with pytest.raises(ValueError, match="local folder whose content is not pinned"):
        revision.base_identity(profile.model)


def test_content_is_not_a_yaml_key_and_other_sources_keep_their_config_hash(tmp_path):
    bad = write_profile(tmp_path / "p", {"model": {"content": "0" * 64}})
    with pytest.raises(ConfigError, match=r"model.content: unknown key 'content'"):
        load_profile(bad)
    tiny = load_profile("tiny")
    assert prepare_profile(tiny)[0].model.content is None
    assert "content" not in tiny.to_dict()["model"]  # hashes of synthetic, pypi and hub sources are unchanged


def test_a_launched_training_process_keys_the_folder_as_its_launcher(tmp_path, checkpoint, monkeypatch):
    """``accelerate launch`` starts processes that read the profile again: they must pin it as the launcher did, or
    the launcher's config hash refuses them."""
    import harness.models.base as base
    import harness.train.distributed as distributed

    path = write_profile(tmp_path / "p", {"model": {"source": str(checkpoint), "revision": None}})
    launcher = prepare_profile(load_profile(path))[0]

    class Reached(Exception):
        pass

    def stop(*_):
        raise Reached

    monkeypatch.setattr(base, "load_tokenizer", stop)  # the next step after the hash check
    with pytest.raises(Reached):
        distributed.main(["--profile", str(path), "--variant", "r8", "--runs-dir", str(tmp_path / "runs"),
                          "--out", str(tmp_path / "out"), "--config-hash", config_hash(launcher)])
