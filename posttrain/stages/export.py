"""`export`: write the final IT checkpoint and prove it reloads and answers.

The checkpoint is what users ship: safetensors weights, the tokenizer with the Gemma chat
template, a generation config whose EOS ids include `<end_of_turn>` (IT models stop there,
not at `<eos>`) and whose only length bound is the context window, and a model card with the
recipe, the stage lineage, data statistics and metrics. The round trip afterwards reloads it
from disk with transformers, checks the logits equal the in-memory model's, and greedily
answers a chat prompt; any failure fails the stage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from pydantic import Field

from posttrain.chat import END_OF_TURN, chat_template_for, tokenize_prompt
from posttrain.stages.base import StageConfig, StageContext, StageError, StageResult, register_stage


class ExportStageConfig(StageConfig):
    """Export an instruction-tuned checkpoint with a model card, then verify it by reloading."""

    model: str = Field(description="Model to export (a checkpoint or a LoRA adapter directory, merged on export).")
    probe_prompt: str = Field("Who are you?", description="Chat prompt answered greedily after reloading.")
    max_new_tokens: int = Field(48, ge=1, description="Token budget of the probe answer only; the exported "
                                "generation_config.json sets no max_new_tokens (its bound is the context length).")
    require_end_of_turn: bool = Field(True, description="Fail unless the probe answer ends with <end_of_turn>.")
    dtype: str = Field("float32", description="Weight dtype of the exported checkpoint (float32, bfloat16, float16).")
    model_name: str | None = Field(None, description="Name shown in the model card; defaults to the recipe name.")


def _model_card(ctx: StageContext, cfg: ExportStageConfig, probe_answer: str) -> str:
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
    lines += ["", "## Probe", "", f"Prompt: `{cfg.probe_prompt}`", "", f"Greedy answer after reloading: `{probe_answer}`", "",
              "## Recipe", "", "```yaml"]
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
    tokenizer.chat_template = chat_template_for(is_composite(model.config))
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
        if is_composite(model.config):
            from transformers import AutoProcessor

            AutoProcessor.from_pretrained(str(tmp))
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
        # The probe's budget as a total length: it replaces the shipped context-length bound for
        # this call (max_new_tokens next to the shipped max_length draws a transformers warning).
        gen = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_length=len(prompt_ids) + cfg.max_new_tokens,
                                do_sample=False)
    new = gen[0, len(prompt_ids):].tolist()
    stopped = bool(new) and new[-1] in gen_eos
    answer = re_tok.decode([t for t in new if t not in gen_eos], skip_special_tokens=False)
    if cfg.require_end_of_turn and not (stopped and new[-1] == eot):
        raise StageError(f"the reloaded model did not end its answer with {END_OF_TURN} within {cfg.max_new_tokens} tokens "
                         f"(answer: {answer[:200]!r}); train longer or set require_end_of_turn: false")
    (tmp / "README.md").write_text(_model_card(ctx, cfg, answer))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (ctx.stage_dir / "probe.json").write_text(json.dumps({"prompt": cfg.probe_prompt, "answer": answer, "stopped_at_end_of_turn": stopped}, indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    return StageResult(outputs={"model": str(out)},
                       metrics={"parameters": n_params, "architecture": type(reloaded).__name__, "probe_answer": answer[:80], "stopped_at_end_of_turn": stopped,
                                "reload_max_logit_diff": diff})
