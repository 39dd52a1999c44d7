"""distill_cache with image rows: a composite teacher scores them with their images (the distill
stage's teacher forward, pixel values included), the cache keeps their image parts, and distill
hands those images to the student; a text-only teacher, or a text-only student of such a cache,
is refused, naming the row or the cache."""

from __future__ import annotations

import pytest
import torch

from posttrain.data import TokenSequence, load_distill_rows, write_jsonl
from posttrain.losses.distillation import DistillationObjective, teacher_targets
from posttrain.sequences import logit_mask, pad_batch, shifted_logits
from posttrain.stages.base import StageContext, StageError
from posttrain.stages.distill_cache import DistillCacheStageConfig, run_distill_cache
from posttrain.teacher_cache import TeacherCache
from posttrain.toy.models import TinyModelSpec, build_tiny_model
from posttrain.toy.vision import generate_vision

SPEC = dict(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, toy_tokenizer):
    d = tmp_path_factory.mktemp("cache_teacher")
    build_tiny_model(TinyModelSpec(**SPEC, vision={}), toy_tokenizer, d)
    return d


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Two image conversations around a text one: a batch mixes rows with and without images."""
    d = tmp_path_factory.mktemp("cache_rows")
    image_rows = generate_vision("colour", 2, d / "img", fmt="chat")
    text_row = {"messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}]}
    write_jsonl(d / "chat.jsonl", [image_rows[0], text_row, image_rows[1]])
    return d / "chat.jsonl"


def _ctx(tmp_path, name):
    (tmp_path / name).mkdir()
    return StageContext(name=name, kind=name, stage_dir=tmp_path / name, run_dir=tmp_path, seed=0, recipe_name="t")


def _dense(ids: torch.Tensor, probs: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.zeros(ids.shape[0], vocab).scatter_(1, ids.long(), probs.float())


def test_cached_targets_of_an_image_row_are_the_teachers_distribution_with_its_image(tmp_path, teacher_dir, rows):
    from posttrain.modeling import load_causal_lm, load_processor, output_rows

    teacher = load_causal_lm(str(teacher_dir)).eval()
    vocab = output_rows(teacher)
    # top_k over the whole vocabulary: the cache holds the teacher's full distribution (float16).
    result = run_distill_cache(DistillCacheStageConfig(teacher=str(teacher_dir), dataset=str(rows), target="top_k",
                                                       k=vocab, batch_size=3), _ctx(tmp_path, "distill_cache"))
    assert result.metrics["sequences"] == 3 and result.metrics["image_sequences"] == 2
    cache = TeacherCache(result.outputs["cache"], verify=True)

    processor = load_processor(str(teacher_dir))
    _, sequences = load_distill_rows(str(rows), processor.tokenizer, 512, processor)
    objective = DistillationObjective(target="top_k", k=vocab)
    for i, sequence in enumerate(sequences):
        cached = cache[i]
        assert cached.input_ids.tolist() == sequence.input_ids
        if sequence.images is None:
            assert cached.images is None
            continue
        assert cached.images == sequence.images.image_parts and cached.images[0]["path"].endswith(".png")
        stored = _dense(cached.target_ids, cached.target_probs, vocab)
        views = {}
        for name, seq in (("with", sequence), ("without", TokenSequence(sequence.input_ids, sequence.loss_mask))):
            batch = pad_batch([seq], processor.tokenizer.pad_token_id)
            assert ("pixel_values" in batch) == (name == "with")
            with torch.no_grad():  # the distill stage's on-line teacher forward of this row
                logits = shifted_logits(teacher, batch, chunk_size=None)
            ids, probs = teacher_targets(objective, logits)
            keep = logit_mask(batch["loss_mask"])[0] != 0
            views[name] = _dense(ids[0][keep], probs[0][keep], vocab)
        # A random tiny teacher's distribution is nearly flat (about 1 / vocab each): compared
        # relatively, at float16's precision (2^-11), not by an absolute margin every flat pair meets.
        torch.testing.assert_close(stored, views["with"], rtol=2e-3, atol=1e-7)
        moved = ((stored - views["without"]).abs() / views["without"]).max()
        assert moved > 0.05  # the image changed what the teacher predicts, far beyond the rounding


def test_a_text_only_teacher_refuses_image_rows_naming_the_first(tmp_path, tiny_gemma3_dir, rows):
    with pytest.raises(StageError, match=r"chat.jsonl:1: the row holds images, and the teacher .* is a text-only "
                                         r"model"):
        run_distill_cache(DistillCacheStageConfig(teacher=str(tiny_gemma3_dir), dataset=str(rows)),
                          _ctx(tmp_path, "distill_cache"))


def test_distill_from_the_cache_gives_the_student_the_rows_images(tmp_path, teacher_dir, rows):
    from posttrain.modeling import load_tokenizer
    from posttrain.stages.distill import DistillStageConfig, draw_batch, setup_distill

    cache = run_distill_cache(DistillCacheStageConfig(teacher=str(teacher_dir), dataset=str(rows), k=8),
                              _ctx(tmp_path, "distill_cache")).outputs["cache"]
    options = dict(teacher_cache=cache, lambda_on_policy=0.0, divergence="forward_kl", max_steps=1, batch_size=8)
    run = setup_distill(DistillStageConfig(model=str(teacher_dir), **options), _ctx(tmp_path, "distill"))
    try:
        batch = draw_batch(run, 1)
        stored = TeacherCache(cache)
        # The images each cached sequence was scored with (both image rows may ask and answer alike).
        by_ids: dict[tuple, list] = {}
        for i in range(len(stored)):
            by_ids.setdefault(tuple(stored[i].input_ids.tolist()), []).append(stored[i].images)
        assert any(s.images is not None for s in batch.sequences)
        for s in batch.sequences:
            assert (s.images.image_parts if s.images is not None else None) in by_ids[tuple(s.input_ids)]
        assert "pixel_values" in pad_batch(batch.sequences, run.pad_id)
    finally:
        run.session.close()

    # A text-only student (sharing the tokenizer) could not see the images the targets were made with.
    text_only = tmp_path / "text_only"
    build_tiny_model(TinyModelSpec(**SPEC), load_tokenizer(str(teacher_dir)), text_only)
    with pytest.raises(StageError, match=r"teacher_cache: 2 of its sequences were scored with images, and the "
                                         r"student .* is a text-only model"):
        setup_distill(DistillStageConfig(model=str(text_only), **options), _ctx(tmp_path, "distill_text"))
    # distill_cache told of that student says so before the teacher scores anything.
    with pytest.raises(StageError, match=r"student: .* is a text-only model, and 2 rows of .*chat.jsonl hold images"):
        run_distill_cache(DistillCacheStageConfig(teacher=str(teacher_dir), student=str(text_only), dataset=str(rows)),
                          _ctx(tmp_path, "distill_cache_text"))
