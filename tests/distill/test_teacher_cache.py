"""The offline teacher cache: round trip, equality with online scoring, clear errors when broken."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.losses.distillation import sample_teacher_targets, sampled_target_loss
from posttrain.data import TokenSequence
from posttrain.sequences import logit_mask, pad_batch
from posttrain.teacher_cache import (TeacherCache, TeacherCacheError, TeacherCacheWriter, bytes_per_token,
                                     scatter_targets)

V, K = 50, 8


def _scored_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [TokenSequence([2, 7, 9, 4, 11, 5], [0, 0, 0, 1, 1, 1]),
            TokenSequence([2, 8, 3, 12, 5], [0, 0, 1, 1, 1]),
            TokenSequence([2, 6, 13, 14, 15, 16, 5, 1], [0, 0, 0, 1, 1, 1, 0, 0])]
    batch = pad_batch(seqs, pad_id=5)  # pad shares the end-of-turn id: the mask, not the id, decides
    teacher_logits = torch.randn(3, batch["input_ids"].shape[1] - 1, V, generator=g) * 3
    ids, probs = sample_teacher_targets(teacher_logits, K, generator=g)
    return seqs, batch, teacher_logits, ids, probs


def _write(path, seqs, batch, ids, probs, shard_size=2, **meta):
    mask = logit_mask(batch["loss_mask"])
    with TeacherCacheWriter(path, K, V, {"tokenizer_fingerprint": "abc", **meta}, shard_size=shard_size) as w:
        for i, s in enumerate(seqs):
            w.add(s.input_ids, s.loss_mask, ids[i][mask[i] != 0], probs[i][mask[i] != 0])
    return w.index


def test_round_trip_gives_the_same_loss_as_online_scoring(tmp_path):
    seqs, batch, _, ids, probs = _scored_batch()
    index = _write(tmp_path / "cache", seqs, batch, ids, probs)
    assert len(index["shards"]) == 2 and index["num_sequences"] == 3

    cache = TeacherCache(tmp_path / "cache", verify=True, expect={"tokenizer_fingerprint": "abc", "k": K})
    cached = [cache[i] for i in range(len(cache))]
    for c, s in zip(cached, seqs):
        assert c.input_ids.tolist() == s.input_ids and c.loss_mask.tolist() == s.loss_mask
    cached_ids, cached_probs = scatter_targets(cached, batch["input_ids"].shape[1])

    mask = logit_mask(batch["loss_mask"])
    student = torch.randn(3, batch["input_ids"].shape[1] - 1, V, generator=torch.Generator().manual_seed(3))
    online = sampled_target_loss(student, ids, probs, mask=mask)
    offline = sampled_target_loss(student, cached_ids, cached_probs, mask=mask)
    assert offline.item() == online.item()


def test_index_reports_bytes_per_token_against_a_full_row(tmp_path):
    seqs, batch, _, ids, probs = _scored_batch()
    index = _write(tmp_path / "cache", seqs, batch, ids, probs)
    assert index["target_bytes_per_position"] == bytes_per_token(K) == K * 6
    assert index["full_row_bytes_fp32"] == V * 4
    assert bytes_per_token(256) * 682 < 262144 * 4 < bytes_per_token(256) * 683


def test_unfinished_cache_is_refused(tmp_path):
    seqs, batch, _, ids, probs = _scored_batch()
    _write(tmp_path / "cache", seqs, batch, ids, probs)
    (tmp_path / "cache" / "index.json").unlink()
    with pytest.raises(TeacherCacheError, match="not finished"):
        TeacherCache(tmp_path / "cache")


def test_corrupt_shard_is_refused(tmp_path):
    seqs, batch, _, ids, probs = _scored_batch()
    _write(tmp_path / "cache", seqs, batch, ids, probs)
    shard = tmp_path / "cache" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(TeacherCacheError, match="sha256"):
        TeacherCache(tmp_path / "cache", verify=True)
    cache = TeacherCache(tmp_path / "cache")
    with pytest.raises(TeacherCacheError, match="corrupt"):
        cache[2]


def test_cache_for_another_tokenizer_is_refused(tmp_path):
    seqs, batch, _, ids, probs = _scored_batch()
    _write(tmp_path / "cache", seqs, batch, ids, probs)
    with pytest.raises(TeacherCacheError, match="tokenizer_fingerprint is 'abc', expected 'xyz'"):
        TeacherCache(tmp_path / "cache", expect={"tokenizer_fingerprint": "xyz"})


def test_wrong_format_and_wrong_target_shapes_are_refused(tmp_path):
    seqs, batch, _, ids, probs = _scored_batch()
    _write(tmp_path / "cache", seqs, batch, ids, probs)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    index["version"] = 99
    (tmp_path / "cache" / "index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherCacheError, match="version 1"):
        TeacherCache(tmp_path / "cache")
    with pytest.raises(TeacherCacheError, match=r"expected shape \(3, 8\)"):
        TeacherCacheWriter(tmp_path / "other", K, V).add([2, 3, 4, 5], [0, 1, 1, 1], ids[0, :2], probs[0, :2])
