"""The one place that reads a composite config, and the pieces each stage relies on for composite
checkpoints: renaming checkpoint tensors, merge pass-through, tokenizers with image tokens, LoRA
targets, the toy model spec and the multimodal chat template."""

from __future__ import annotations

import pytest
import torch

from posttrain.toy.models import TinyModelSpec, build_tiny_model

TINY = dict(arch="gemma3", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128)


@pytest.fixture(scope="module")
def composite_dir(tmp_path_factory, toy_tokenizer):
    d = tmp_path_factory.mktemp("composite")
    build_tiny_model(TinyModelSpec(**TINY, vision={}, max_position_embeddings=256), toy_tokenizer, d)
    return d


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory, toy_tokenizer):
    d = tmp_path_factory.mktemp("text")
    build_tiny_model(TinyModelSpec(**TINY, max_position_embeddings=256), toy_tokenizer, d)
    return d


def test_config_readers_answer_for_composite_and_text_models_alike(composite_dir, text_dir):
    from posttrain.modeling import (checkpoint_is_composite, context_length, is_composite, load_causal_lm,
                                    output_rows, set_pad_token_id, text_config, vision_parameter_names)

    composite, text = load_causal_lm(composite_dir), load_causal_lm(text_dir)
    assert type(composite).__name__ == "Gemma3ForConditionalGeneration"
    assert not hasattr(composite.config, "max_position_embeddings")  # why callers must not read it there
    assert context_length(composite.config) == context_length(text.config) == 256
    assert is_composite(composite.config) and not is_composite(text.config)
    assert checkpoint_is_composite(composite_dir) and not checkpoint_is_composite(text_dir)
    assert output_rows(composite) == output_rows(text) + 3  # the three image tokens
    assert text_config(composite.config).hidden_size == 64
    set_pad_token_id(composite.config, 5)
    assert composite.config.pad_token_id == text_config(composite.config).pad_token_id == 5
    assert vision_parameter_names(text) == []
    names = vision_parameter_names(composite)
    assert names and all(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in names)
    frozen = {n for n, p in composite.named_parameters() if not p.requires_grad}
    assert frozen == set(names)  # load_causal_lm froze the tower and nothing else
    trainable = load_causal_lm(composite_dir, train_vision_tower=True)
    assert all(p.requires_grad for p in trainable.parameters())


def test_checkpoint_tensors_are_renamed_to_the_models_names(composite_dir, text_dir):
    from posttrain.modeling import checkpoint_tensors_for_model, load_causal_lm
    from posttrain.weights import CheckpointReader

    for d in (composite_dir, text_dir):
        model = load_causal_lm(d)
        reader = CheckpointReader(d)
        on_disk = {n: reader.get(n) for n in reader.names()}
        renamed = checkpoint_tensors_for_model(model, on_disk)
        result = model.load_state_dict(renamed, strict=False)
        assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}
    assert any(n.startswith("language_model.") for n in CheckpointReader(composite_dir).names())


def test_a_tensor_no_model_changed_passes_a_merge_byte_identical():
    from posttrain.weights import merge_tensor

    init = torch.randn(7, 5)
    for method, eta in (("slerp", 1.0), ("linear", 0.3), ("slerp", 0.7)):
        out = merge_tensor("t", init, [init.clone(), init.clone(), init.clone()], method, eta=eta)
        assert torch.equal(out, init), method
    moved = merge_tensor("t", init, [init + 1e-3, init.clone()], "linear")
    assert not torch.equal(moved, init)


def test_tokenizers_differing_by_appended_image_tokens_are_one_tokenizer(composite_dir, toy_tokenizer):
    from posttrain.modeling import load_tokenizer
    from posttrain.sequences import TokenizerMismatchError, check_same_tokenizer

    composite_tok = load_tokenizer(composite_dir)
    check_same_tokenizer(toy_tokenizer, composite_tok, "student", "teacher")
    check_same_tokenizer(composite_tok, toy_tokenizer, "student", "teacher")
    other = load_tokenizer(composite_dir)
    other.add_tokens(["plainword"])  # not a special token: text can tokenise to it
    with pytest.raises(TokenizerMismatchError, match="vocabularies differ"):
        check_same_tokenizer(toy_tokenizer, other, "student", "teacher")


def test_lora_adapts_the_language_model_only(composite_dir):
    from peft import get_peft_model

    from posttrain.modeling import load_causal_lm, vision_parameter_names
    from posttrain.training import LoraSpec

    base = load_causal_lm(composite_dir)
    model = get_peft_model(base, LoraSpec(target_modules=["q_proj", "fc1"]).to_peft_config(base))
    adapted = [n for n, p in model.named_parameters() if p.requires_grad]
    assert adapted and all("vision_tower" not in n and "multi_modal_projector" not in n for n in adapted)
    assert all("lora_" not in n for n in vision_parameter_names(model))


def test_tiny_spec_refuses_vision_where_no_composite_form_exists():
    with pytest.raises(ValueError, match="only a gemma3 causal_lm"):
        TinyModelSpec(arch="llama", vision={})
    with pytest.raises(ValueError, match="only a gemma3 causal_lm"):
        TinyModelSpec(arch="gemma3", head="sequence_classification", vision={})
    with pytest.raises(ValueError, match="mm_tokens_per_image"):
        TinyModelSpec(vision={"image_size": 32, "patch_size": 8, "mm_tokens_per_image": 3})


def test_the_multimodal_template_renders_text_as_the_text_template_and_images_as_start_of_image(composite_dir):
    from posttrain.chat import GEMMA_CHAT_TEMPLATE, GEMMA_MULTIMODAL_CHAT_TEMPLATE
    from posttrain.modeling import load_tokenizer

    tok = load_tokenizer(composite_dir)
    assert tok.chat_template == GEMMA_MULTIMODAL_CHAT_TEMPLATE
    text = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    assert (tok.apply_chat_template(text, tokenize=False, add_generation_prompt=True)
            == tok.apply_chat_template(text, chat_template=GEMMA_CHAT_TEMPLATE, tokenize=False,
                                       add_generation_prompt=True))
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == "<bos><start_of_turn>user\n<start_of_image>Colour?<end_of_turn>\n"
