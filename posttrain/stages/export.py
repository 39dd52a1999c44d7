"""`export`: write the final IT checkpoint and prove it reloads and answers.

The checkpoint is what users ship: safetensors weights, the tokenizer with the Gemma chat
template, a generation config whose EOS ids include `<end_of_turn>` (IT models stop there,
not at `<eos>`) and whose only length bound is the context window, and a model card with the
recipe, the stage lineage, data statistics and metrics. The round trip afterwards reloads it
from disk with transformers, checks the logits equal the in-memory model's, and greedily
answers a chat prompt; any failure fails the stage.

With `quantize:` the stage also writes quantised copies beside the full-precision safetensors
(posttrain.quantized_export): a GGUF for llama.cpp (q4_0, q8_0 or f16, tokenizer inside) and/or
a compressed-tensors checkpoint (int4 per channel or per group, fp8) for vLLM and transformers.
Each is reloaded with transformers, its logits checked against the in-memory model with its
weights as the file holds them, and asked the probe prompt; any failure fails the stage.

With `image_probe:` a composite checkpoint (Gemma3ForConditionalGeneration) is also asked a question
about an image, through the processor saved with it: its logits on the image prompt are checked
against the in-memory model's (so the vision tower round-trips too) and its greedy answer is
recorded. The quantised copies (`quantize:`) are asked the text probe alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.chat import END_OF_TURN, chat_template_for, tokenize_prompt
from posttrain.stages.base import StageConfig, StageContext, StageError, StageResult, register_stage


class QuantizeSpec(BaseModel):
    """One quantised copy of the exported model."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["gguf", "compressed-tensors"] = Field(description="gguf (llama.cpp) or compressed-tensors (vLLM, transformers).")
    type: Literal["q4_0", "q8_0", "f16"] | None = Field(
        None, description="gguf: weight type. q4_0 rounds exactly as a qat stage with scheme int4_per_block trained.")
    scheme: Literal["int4_per_channel", "int4_per_group", "fp8"] | None = Field(
        None, description="compressed-tensors: int4 per output channel, int4 per group of group_size, or fp8 e4m3 "
        "per channel; each rounds exactly as the qat stage's int4_per_channel / int4_per_block (block_format: "
        "compressed_tensors) / fp8.")
    group_size: int = Field(32, ge=1, description="compressed-tensors int4_per_group: weights per group.")
    quantize_embeddings: bool = Field(True, description="gguf q4_0/q8_0: store the token embedding (and the output "
                                      "layer tied to it) in the file's type, as llama.cpp files do; else f16.")
    require_end_of_turn: bool = Field(False, description="Fail unless the reloaded quantised model's probe answer "
                                      "ends with <end_of_turn> (otherwise that is only reported).")

    @model_validator(mode="after")
    def _check(self):
        if self.format == "gguf" and self.type is None:
            raise ValueError("type: a gguf export needs a type (q4_0, q8_0 or f16)")
        if self.format == "compressed-tensors" and self.scheme is None:
            raise ValueError("scheme: a compressed-tensors export needs a scheme (int4_per_channel, int4_per_group, fp8)")
        return self

    @property
    def label(self) -> str:
        return f"gguf_{self.type}" if self.format == "gguf" else f"compressed_tensors_{self.scheme}"


class ImageProbe(BaseModel):
    """A question about an image that the reloaded composite checkpoint answers: a local image file
    with a question (`image` + `prompt`), or a prompt row of a dataset (`dataset` + `row`), its
    image parts and text asked as they are (a held-out image of the recipe's own data)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="A local image file (PNG, JPEG, ...; a relative path is relative "
                              "to the recipe), asked about with `prompt`.")
    prompt: str | None = Field(None, description="The question asked with `image` (default: describe it).")
    dataset: str | None = Field(None, description="Or: prompt rows (`prompt`: messages with image parts, as rl and "
                                "evaluate read them), e.g. ${datasets.NAME}; row `row` is the probe.")
    row: int = Field(0, ge=0, description="With `dataset`: which row (0-based) is asked.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.image is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'image' (a file, with 'prompt') or 'dataset' (with 'row')")
        if self.dataset is not None and self.prompt is not None:
            raise ValueError("prompt: a dataset row brings its own question; 'prompt' goes with 'image'")
        if self.image is not None and "row" in self.model_fields_set:
            raise ValueError("row: picks a row of 'dataset'; an 'image' probe has no rows")
        return self

    def messages(self, image: str) -> list[dict]:
        """The `image` form's user turn: the image (its path resolved), then the question."""
        return [{"role": "user", "content": [{"type": "image", "path": image},
                                             {"type": "text", "text": self.prompt or DEFAULT_IMAGE_QUESTION}]}]


DEFAULT_IMAGE_QUESTION = "Describe this image."


class ExportStageConfig(StageConfig):
    """Export an instruction-tuned checkpoint with a model card, then verify it by reloading."""

    # Added after run directories were made with this stage (StageConfig.hash_form).
    _HASHED_ONLY_WHEN_SET: ClassVar[dict[str, Any]] = {"quantize": [], "image_probe": None}


    model: str = Field(description="Model to export (a checkpoint or a LoRA adapter directory, merged on export).")
    probe_prompt: str = Field("Who are you?", description="Chat prompt answered greedily after reloading.")
    max_new_tokens: int = Field(48, ge=1, description="Token budget of the probe answer only; the exported "
                                "generation_config.json sets no max_new_tokens (its bound is the context length).")
    require_end_of_turn: bool = Field(True, description="Fail unless the probe answer (and the image probe's) ends "
                                      "with <end_of_turn>.")
    image_probe: ImageProbe | None = Field(
        None, description="Composite models: a question about an image answered greedily after reloading, "
        "through the saved processor, e.g. {image: photo.png, prompt: What is shown?} or "
        "{dataset: ${datasets.NAME}, row: 0}. Answer in probe.json and the image_probe_answer metric.")
    dtype: str = Field("float32", description="Weight dtype of the exported checkpoint (float32, bfloat16, float16).")
    model_name: str | None = Field(None, description="Name shown in the model card; defaults to the recipe name.")
    quantize: QuantizeSpec | list[QuantizeSpec] = Field(
        default_factory=list, description="Quantised copies written beside the full-precision weights, e.g. "
        "{format: gguf, type: q4_0} (model/model-q4_0.gguf) or {format: compressed-tensors, scheme: fp8} "
        "(model/compressed-tensors-fp8/); each is reloaded and answers the probe.")

    def quantized_copies(self) -> list[QuantizeSpec]:
        return self.quantize if isinstance(self.quantize, list) else [self.quantize]


def _model_card(ctx: StageContext, cfg: ExportStageConfig, probe_answer: str, image_probe: dict | None) -> str:
    name = cfg.model_name or f"{ctx.recipe_name}-it"
    lines = [f"# {name}", "",
             f"Instruction-tuned checkpoint produced by the posttrain recipe `{ctx.recipe_name}`.", "",
             "## Chat format", "",
             "Gemma IT format: `<bos>` then turns `<start_of_turn>user|model\\n...<end_of_turn>\\n`; a system message "
             "is folded into the first user turn; generation stops at `<end_of_turn>` (included in "
             "`generation_config.json` EOS ids). The tokenizer ships the chat template.", "",
             "## Stage lineage", "", "| stage | kind | seconds | key metrics |", "|---|---|---|---|"]
    for m in ctx.lineage:
        metrics = ", ".join(f"{k}={_short(v)}" for k, v in list((m.get("metrics") or {}).items())[:8])
        lines.append(f"| {m.get('name')} | {m.get('kind')} | {m.get('seconds', '')} | {metrics} |")
    data_rows = [(m.get("name"), k, v) for m in ctx.lineage for k, v in (m.get("metrics") or {}).items()
                 if k.startswith(("rows", "kept", "rejected", "input", "train_tokens", "trained_tokens"))]
    if data_rows:
        lines += ["", "## Data statistics", "", "| stage | statistic | value |", "|---|---|---|"]
        lines += [f"| {s} | {k} | {_short(v)} |" for s, k, v in data_rows]
    lines += ["", "## Probe", "", f"Prompt: `{cfg.probe_prompt}`", "",
              f"Greedy answer after reloading: `{probe_answer}`", ""]
    if image_probe is not None:
        lines += [f"Image probe ({image_probe['source']}): `{image_probe['question']}` with "
                  f"{', '.join(f'`{i}`' for i in image_probe['images'])}", "",
                  f"Greedy answer after reloading, through the saved processor: `{image_probe['answer']}`", ""]
    lines += ["## Recipe", "", "```yaml"]
    lines.append(yaml.safe_dump([{"name": m.get("name"), "kind": m.get("kind"), **(m.get("config") or {})}
                                 for m in ctx.lineage], sort_keys=False).rstrip())
    lines += ["```", ""]
    return "\n".join(lines)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = str(v)
    return text if len(text) < 40 else text[:37] + "..."


@register_stage("export", ExportStageConfig, outputs=("model",))
def run_export(cfg: ExportStageConfig, ctx: StageContext) -> StageResult:
    """Write the IT checkpoint (weights, tokenizer, generation config, model card) and verify it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from posttrain.modeling import context_length, copy_processor_files, is_composite, load_policy, stop_token_ids

    model, tokenizer = load_policy(cfg.model)
    model = model.to(getattr(torch, cfg.dtype)).eval()
    composite = is_composite(model.config)
    # Refused before anything is written: a probe the checkpoint cannot answer, an image not there.
    probe_messages = (_image_probe_messages(cfg.image_probe, composite, cfg.model, ctx.recipe_dir)
                      if cfg.image_probe else None)
    tokenizer.chat_template = chat_template_for(composite)
    out = ctx.stage_dir / "model"
    tmp = ctx.stage_dir / "model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    eos_ids = stop_token_ids(tokenizer)  # <end_of_turn> first, then <eos>
    # No max_new_tokens: vLLM and transformers take it as every user's default answer budget (the
    # probe's small one would truncate real answers). The length bound is the context window,
    # so answers end at <end_of_turn> / <eos> or when the context is full.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
        do_sample=False, max_length=context_length(model.config))
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    # A composite base (Gemma 3 4B and up) ships a processor: the export keeps it, so that it
    # serves images as the base did.
    copy_processor_files(cfg.model, tmp)

    # Round trip: reload from disk exactly as a user would.
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=getattr(torch, cfg.dtype)).eval()
        re_tok = AutoTokenizer.from_pretrained(str(tmp))
        processor = None
        if composite:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(str(tmp))
    except Exception as e:  # noqa: BLE001
        raise StageError(f"the exported checkpoint in {tmp} does not reload with transformers: {e}") from e
    gen_eos = reloaded.generation_config.eos_token_id
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    eot = re_tok.convert_tokens_to_ids(END_OF_TURN)
    if eot not in gen_eos:
        raise StageError(f"generation_config.json EOS ids {gen_eos} do not include {END_OF_TURN} ({eot})")
    prompt_ids = tokenize_prompt(re_tok, cfg.probe_prompt)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        diff = (reloaded(ids).logits - model(ids).logits).abs().max().item()
        if diff > 1e-3:
            raise StageError(f"reloaded checkpoint's logits differ from the trained model's by {diff:.3g}")
    answer, stopped = _greedy_answer(reloaded, re_tok, {"input_ids": ids}, cfg, gen_eos, "probe")
    image_probe = None
    if probe_messages is not None:
        image_probe = _ask_image_probe(*probe_messages, reloaded, model, processor, cfg, gen_eos)
    quantized = {}
    for spec in cfg.quantized_copies():
        quantized.update(_export_quantized(spec, model, tokenizer, tmp, cfg))
    (tmp / "README.md").write_text(_model_card(ctx, cfg, answer, image_probe))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    probe = {"prompt": cfg.probe_prompt, "answer": answer, "stopped_at_end_of_turn": stopped}
    if image_probe is not None:
        probe["image_probe"] = image_probe
    (ctx.stage_dir / "probe.json").write_text(json.dumps(probe, indent=2))
    image_metrics = {} if image_probe is None else {
        "image_probe_answer": image_probe["answer"][:80],
        "image_probe_stopped_at_end_of_turn": image_probe["stopped_at_end_of_turn"],
        "image_probe_reload_max_logit_diff": image_probe["reload_max_logit_diff"]}
    n_params = sum(p.numel() for p in model.parameters())
    return StageResult(outputs={"model": str(out)},
                       metrics={"parameters": n_params, "architecture": type(reloaded).__name__, "probe_answer": answer[:80],
                                "stopped_at_end_of_turn": stopped,
                                "reload_max_logit_diff": diff, **image_metrics, **quantized})


def _greedy_answer(reloaded, tokenizer, inputs: dict, cfg: ExportStageConfig, gen_eos: list[int],
                   what: str) -> tuple[str, bool]:
    """The reloaded model's greedy answer to `inputs` (a batch of one: input_ids, and pixel values
    for an image prompt) and whether it stopped at a stop id; refused as `what` unless it ends
    with <end_of_turn> when require_end_of_turn is set."""
    import torch

    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        # The probe's budget as a total length: it replaces the shipped context-length bound for
        # this call (max_new_tokens next to the shipped max_length draws a transformers warning).
        gen = reloaded.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]),
                                max_length=n + cfg.max_new_tokens, do_sample=False)
    new = gen[0, n:].tolist()
    stopped = bool(new) and new[-1] in gen_eos
    answer = tokenizer.decode([t for t in new if t not in gen_eos], skip_special_tokens=False)
    if cfg.require_end_of_turn and not (stopped and new[-1] == tokenizer.convert_tokens_to_ids(END_OF_TURN)):
        raise StageError(f"the reloaded model did not end its {what} answer with {END_OF_TURN} within "
                         f"{cfg.max_new_tokens} tokens (answer: {answer[:200]!r}); train longer or set "
                         "require_end_of_turn: false")
    return answer, stopped


def _image_probe_messages(probe: ImageProbe, composite: bool, model_path: str,
                          recipe_dir: Path | None) -> tuple[list[dict], str]:
    """The image probe's user turn and where it came from, its images checked to be readable."""
    from itertools import islice

    from posttrain.chat import ChatFormatError, has_image_parts, image_parts, load_image
    from posttrain.data import DataError, iter_rows

    if not composite:
        raise StageError(f"image_probe: {model_path} is a text-only model; an image probe needs a composite "
                         "checkpoint (Gemma3ForConditionalGeneration: vision tower, projector and processor)")
    if probe.image is not None:
        image = Path(probe.image)
        if not image.is_absolute() and recipe_dir is not None:  # as reward files: relative to the recipe
            image = Path(recipe_dir) / image
        if not image.is_file():
            raise StageError(f"image_probe.image: {image}: no such image file")
        return probe.messages(str(image)), "image_probe"
    try:
        found = next(islice(iter_rows(probe.dataset), probe.row, None), None)
    except DataError as e:
        raise StageError(f"image_probe.dataset: {e}") from None
    if found is None:
        raise StageError(f"image_probe.row: {probe.row} is past the last row of {probe.dataset}")
    where, row = found
    messages = row.get("prompt")
    if not has_image_parts(messages):
        raise StageError(f"image_probe: {where}: expected a 'prompt' of messages with an image part (a prompt row "
                         f"of image data), got {'no prompt' if messages is None else 'a prompt without images'}")
    try:  # each image readable now, not after the export is written
        for part in image_parts(messages):
            load_image(part, f"image_probe: {where}")
    except ChatFormatError as e:
        raise StageError(str(e)) from None
    return messages, f"image_probe ({where})"


def _ask_image_probe(messages: list[dict], where: str, reloaded, model, processor, cfg: ExportStageConfig,
                     gen_eos: list[int]) -> dict:
    """The reloaded composite model's greedy answer to the image probe, its images made by the
    processor saved with it (posttrain.images, as the loops and evaluate make them); its logits on
    the prompt must equal the in-memory model's, so the vision tower and projector round-trip too."""
    import torch

    from posttrain.chat import ChatFormatError, text_view
    from posttrain.images import image_forward_inputs, tokenize_image_prompt, vision_dtype

    try:
        prompt = tokenize_image_prompt(processor, messages, where)
        ids = torch.tensor([list(prompt)])
        inputs = {"input_ids": ids, **image_forward_inputs([prompt], ids, vision_dtype(reloaded))}
    except ChatFormatError as e:
        raise StageError(str(e)) from None
    with torch.no_grad():
        diff = (reloaded(**inputs).logits - model(**inputs).logits).abs().max().item()
    if diff > 1e-3:
        raise StageError(f"{where}: the reloaded checkpoint's logits on the image prompt differ from the trained "
                         f"model's by {diff:.3g}")
    answer, stopped = _greedy_answer(reloaded, processor.tokenizer, inputs, cfg, gen_eos, "image probe")
    question = " ".join(p["text"] for m in text_view(messages, where) for p in m["content"] if p["text"])
    return {"source": where, "images": [str(p.get("path", p.get("image"))) for p in prompt.image_parts],
            "question": question, "answer": answer, "stopped_at_end_of_turn": stopped,
            "reload_max_logit_diff": diff}


def _export_quantized(spec: QuantizeSpec, model, tokenizer, out_dir: Path, cfg: ExportStageConfig) -> dict:
    """Write one quantised copy into `out_dir`, reload it with transformers, check it and ask the probe."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from posttrain.quantized_export import (GGUFLayout, QuantizedExportError, as_stored, file_bytes,
                                            write_compressed_tensors, write_gguf)

    try:
        if spec.format == "gguf":
            path = out_dir / f"model-{spec.type}.gguf"
            write_gguf(model, tokenizer, path, GGUFLayout(spec.type, spec.quantize_embeddings))
            # transformers' GGUF loader takes query_pre_attn_scalar as 256 (true of Gemma 3 1B-12B, not of tiny
            # models); the config.json written beside it carries the model's own value.
            reload = lambda: (AutoModelForCausalLM.from_pretrained(  # noqa: E731
                str(out_dir), gguf_file=path.name, config=AutoConfig.from_pretrained(str(out_dir)),
                dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(out_dir), gguf_file=path.name))
        else:
            path = out_dir / f"compressed-tensors-{spec.scheme}"
            write_compressed_tensors(model, tokenizer, path, spec.scheme, spec.group_size)
            reload = lambda: (AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(),  # noqa: E731
                              AutoTokenizer.from_pretrained(str(path)))
    except QuantizedExportError as e:
        raise StageError(f"quantize {spec.label}: {e}") from None
    try:
        reloaded, re_tok = reload()
    except Exception as e:  # noqa: BLE001
        raise StageError(f"quantize {spec.label}: {path} does not reload with transformers: {e}") from e
    prompt_ids = tokenize_prompt(tokenizer, cfg.probe_prompt)
    if tokenize_prompt(re_tok, cfg.probe_prompt) != prompt_ids:
        raise StageError(f"quantize {spec.label}: the tokenizer stored in {path.name} encodes the probe prompt "
                         "differently from the checkpoint's tokenizer")
    expected = as_stored(model, spec.format, spec.type or spec.scheme, spec.group_size, spec.quantize_embeddings)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        diff = (reloaded(ids).logits - expected(ids).logits).abs().max().item()
        if diff > 1e-3:
            raise StageError(f"quantize {spec.label}: the reloaded {path.name}'s logits differ by {diff:.3g} from the "
                             "model with its weights rounded as the format rounds them")
        gen = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                                do_sample=False, eos_token_id=model.generation_config.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    new = gen[0, len(prompt_ids):].tolist()
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    stopped = bool(new) and new[-1] == eot
    answer = tokenizer.decode([t for t in new if t != eot], skip_special_tokens=False)
    if not new or (spec.require_end_of_turn and not stopped):
        raise StageError(f"quantize {spec.label}: the reloaded model's probe answer {answer[:200]!r} "
                         f"{'is empty' if not new else f'does not end with {END_OF_TURN}'}")
    figures = {}
    trained = Path(cfg.model) / "quantization.json"  # written by the qat stage beside its weights
    if trained.is_file():
        from posttrain.quantized_export import rounds_as_trained

        figures[f"{spec.label}_rounds_as_trained"] = rounds_as_trained(
            json.loads(trained.read_text()), spec.format, spec.type or spec.scheme, spec.group_size,
            spec.quantize_embeddings)
    return {**figures, f"{spec.label}_path": path.name, f"{spec.label}_bytes": file_bytes(path),
            f"{spec.label}_reload_max_logit_diff": diff, f"{spec.label}_probe_answer": answer[:80],
            f"{spec.label}_stopped_at_end_of_turn": stopped}
