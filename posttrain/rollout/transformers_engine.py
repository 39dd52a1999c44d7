"""The fallback engine: transformers `generate`, batched with left padding.

It runs the trainer's own model class, so it is the reference the vLLM engine is checked
against, and the engine of choice where vLLM is not installed (and on CPUs under a
multi-process launch, see `create_engine`).

Placement: the model lives on the `device` given at creation (a rank's `cuda:N` from accelerate,
or the CPU when None). `update_weights` copies the pushed tensors onto that device, whatever
device they come from. On CUDA with `rollout.enable_sleep_mode`, `sleep()` moves the weights to
CPU memory and `wake_up()` brings them back (transformers `generate` keeps no cache between calls,
so the weights are all there is to free).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from posttrain.losses.token_logprobs import resolve_chunk_size
from posttrain.images import ImagePrompt, image_forward_inputs, prompt_has_images, tokenize_image_prompt, vision_dtype
from posttrain.modeling import context_length, is_composite, load_causal_lm, load_tokenizer, output_rows, stop_token_ids
from posttrain.scoring import sequence_logprobs
from posttrain.rollout.prompts import fit_prompts, render_prompts
from posttrain.rollout.parallel import current_launch, request_seed_offset
from posttrain.rollout.types import (Completion, OverlongPromptError, Prompt, RolloutConfig, RolloutEngine, RolloutError,
                                     SamplingParams)


def decode_completion(tokenizer, token_ids: list[int], stopped: bool) -> str:
    """Completion text without its stop token; both engines decode through here so texts agree."""
    body = token_ids[:-1] if stopped else token_ids
    return tokenizer.decode(body, skip_special_tokens=False)


def cut_at_stop(ids: list[int], stops: set[int], max_new_tokens: int) -> tuple[list[int], str]:
    for j, t in enumerate(ids):
        if t in stops:
            return ids[:j + 1], "stop"
    return ids[:max_new_tokens], "length"


class TransformersEngine(RolloutEngine):
    backend = "transformers"

    def __init__(self, model_path: str, config: RolloutConfig, model=None, tokenizer=None,
                 device: torch.device | str | None = None):
        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if config.enable_sleep_mode and self.device.type != "cuda":
            raise RolloutError(f"rollout.enable_sleep_mode=true: needs the engine on a CUDA GPU, and it is on "
                               f"{self.device}; remove the option to generate on the CPU")
        self.tokenizer = tokenizer or load_tokenizer(model_path)
        # Its own copy of the weights: generation must use exactly what update_weights pushed,
        # never a model the trainer is mutating mid-step.
        self.model = model if model is not None else load_causal_lm(model_path, dtype=config.dtype)
        self.model.to(self.device)
        self.model.eval()
        self.max_model_len = config.max_model_len or context_length(self.model.config)
        self.model_path, self._processor = model_path, None  # the processor: loaded for the first image prompt
        self.weight_version = 0
        self.truncated_prompts = 0
        self._param_names = set(self.model.state_dict().keys())
        self._sleeping = False
        # Data-parallel ranks asked with the same seed for different prompts draw different streams.
        self._seed_offset = request_seed_offset(current_launch(), 1)

    @property
    def can_sleep(self) -> bool:
        return self.config.enable_sleep_mode and self.device.type == "cuda"

    def sleep(self, level: int = 1) -> None:
        """CUDA with enable_sleep_mode: move the weights to CPU memory (both levels; the pushed
        weights overwrite them after wake_up anyway); otherwise nothing."""
        super().sleep(level)
        if not self.can_sleep or self._sleeping:
            return
        self.model.to("cpu")
        torch.cuda.empty_cache()
        self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            self.model.to(self.device)
            self._sleeping = False

    def generate(self, prompts: Sequence[Prompt], n: int = 1,
                 sampling: SamplingParams | None = None) -> list[list[Completion]]:
        sampling = self._generation_request(n, sampling)
        if any(prompt_has_images(p) for p in prompts):
            prompt_ids = self._image_prompts(prompts, sampling)
        else:
            prompt_ids = render_prompts(self.tokenizer, prompts)
            prompt_ids, truncated = fit_prompts(prompt_ids, self.max_model_len, sampling.max_new_tokens,
                                                self.config.on_overlong_prompt, self.tokenizer.bos_token_id)
            self.truncated_prompts += truncated
        stops = stop_token_ids(self.tokenizer) if sampling.stop_at_end_of_turn else [self.tokenizer.eos_token_id]
        # One row per (prompt, sample); rows are generated in chunks of max_batch_size.
        rows = [ids for ids in prompt_ids for _ in range(n)]
        generator_seed = None if sampling.seed is None else sampling.seed + self._seed_offset
        results: list[Completion] = []
        for start in range(0, len(rows), self.config.max_batch_size):
            if generator_seed is not None:
                # transformers samples from the global RNG; seeding it per chunk makes a seeded call
                # reproduce itself exactly (vLLM seeds per request instead).
                torch.manual_seed(generator_seed + start)
            results.extend(self._generate_chunk(rows[start:start + self.config.max_batch_size], sampling, stops))
        return [results[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def _image_prompts(self, prompts: Sequence[Prompt], sampling: SamplingParams) -> list[list[int]]:
        """The prompts of a batch holding images, as ids: an ImagePrompt as it is, text or messages
        tokenised with the model's processor (into ImagePrompts), token ids as they are. Image
        prompts are never cut to fit (a cut could split an image's soft tokens): too long is an error."""
        if not is_composite(self.model.config):
            raise RolloutError(f"generate: a prompt holds image parts, and {type(self.model).__name__} is a "
                               "text-only model; images need a composite checkpoint with its processor")
        out = []
        for i, prompt in enumerate(prompts):
            if not (isinstance(prompt, ImagePrompt) or (isinstance(prompt, (list, tuple)) and prompt
                                                        and all(isinstance(t, int) for t in prompt))):
                if self._processor is None:
                    from transformers import AutoProcessor

                    self._processor = AutoProcessor.from_pretrained(self.model_path)
                prompt = tokenize_image_prompt(self._processor, prompt, f"prompts[{i}]")
            out.append(prompt)
        budget = self.max_model_len - sampling.max_new_tokens
        for i, ids in enumerate(out):
            if len(ids) > budget:
                raise OverlongPromptError(f"prompts[{i}]: {len(ids)} tokens with its images, but max_model_len="
                                          f"{self.max_model_len} - max_new_tokens={sampling.max_new_tokens} leaves "
                                          f"{budget}; raise max_model_len or shorten it (an image prompt is not cut)")
        return out

    @torch.no_grad()
    def _generate_chunk(self, rows: list[list[int]], sampling: SamplingParams, stops: list[int]) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last prompt token is at the same column
            input_ids[i, width - len(r):] = torch.tensor(r)
            attention[i, width - len(r):] = 1
        device = self.device
        # Rows of image prompts (ImagePrompt) bring their pixel values and token type ids; none for text.
        images = image_forward_inputs(rows, input_ids, vision_dtype(self.model)) if any(
            isinstance(r, ImagePrompt) and r.image_parts for r in rows) else {}
        # disable_compile: checkpoints whose generation_config asks for a static or hybrid cache (Gemma 3's
        # do) would make transformers torch.compile the decoder on CUDA, and recompile it for every new
        # batch or prompt shape; RL batches change shape every step. (TRL's GRPOTrainer does the same.)
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                      return_dict_in_generate=True, disable_compile=True)
        if sampling.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k)  # 0 disables top-k (the model's generation_config may default to 50)
        out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                  **{k: v.to(device) for k, v in images.items()}, **kwargs)
        new_tokens = out.sequences[:, width:].cpu()
        stop_set = set(stops)
        cut = [cut_at_stop(new_tokens[i].tolist(), stop_set, sampling.max_new_tokens) for i in range(len(rows))]
        token_logprobs: list[list[float]] = [[] for _ in rows]
        if sampling.logprobs:
            # One scoring forward over the finished sequences, projected to the vocabulary a chunk
            # at a time, instead of generate's output_logits: those keep [rows, new tokens, vocab]
            # float logits (64 x 1024 x 262,144 is 68 GB) and would be the one log-prob path whose
            # memory grows with the vocabulary. Raw logits / T: the project-wide convention.
            chunk = resolve_chunk_size("auto", output_rows(self.model))
            scored = sequence_logprobs(self.model, rows, [ids for ids, _ in cut], sampling.logprob_temperature,
                                       pad_token_id=pad, chunk_size=chunk)
            token_logprobs = [lp.tolist() for lp in scored]
        return [Completion(token_ids=ids, text=decode_completion(self.tokenizer, ids, reason == "stop"),
                           logprobs=token_logprobs[i], finish_reason=reason)
                for i, (ids, reason) in enumerate(cut)]

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple]) -> None:
        """Copy the pushed tensors into the engine's model, on the engine's device (wakes it first)."""
        self.wake_up()
        params = self.model.state_dict()
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"update_weights: {name!r} is not a weight of the engine's model "
                               f"({type(self.model).__name__}); expected names as in the HF checkpoint")
            target = params[name]
            # copy_ would also cross devices, but converting first keeps one transfer in the target dtype.
            target.copy_(tensor.to(device=target.device, dtype=target.dtype, non_blocking=True))
            del tensor  # a streamed sync's tensor is freed before the stream gathers the next bucket
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # non-blocking host-to-device copies done before generate
        self.weight_version += 1

    def close(self) -> None:
        self.model = None
