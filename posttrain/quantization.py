"""Weight fake quantisation for quantisation-aware training, rounding exactly as the exported formats do.

Gemma 3 ships checkpoints trained with QAT in three weight representations (report, section 2.3
and Table 3): int4 per channel, int4 per block of 32, and fp8. The training loop sees weights
fake-quantised (quantise, then dequantise back to float) in the forward pass, and gradients pass
through the rounding unchanged (straight-through estimator, STE):

    forward:   w_hat = Q(w)            backward:  dL/dw = dL/dw_hat

QAT gains only survive export when Q is the quantiser the file format applies, bit for bit, so
each scheme here is defined by the format it exports to (docs/qat.md has the equations):

- `int4_per_block` (default, block_size 32): GGUF Q4_0 as llama.cpp's reference quantiser and the
  `gguf` package compute it: per block the signed value of largest magnitude `m`, `d = m / -8`,
  `q = min(15, trunc(w / d + 8.5))`, stored `fp16(d)`; dequantised `fp16(d) * (q - 8)`. The
  `gguf` package quantises numpy arrays only (no autograd, no torch), so the same arithmetic is
  written here in torch; the tests check it against `gguf.quants` byte for byte.
  `block_format: compressed_tensors` uses compressed-tensors' group quantiser instead (export:
  compressed-tensors int4_per_group).
- `int4_per_channel`: compressed-tensors' symmetric int4, one scale per output row
  (`scale = max|w| / 7.5`, `q = clamp(round(w / scale), -8, 7)`), computed by compressed-tensors'
  own `calculate_qparams` and `fake_quantize`.
- `fp8`: compressed-tensors' fp8 e4m3 weights, one scale per output row (`scale = max|w| / 448`),
  also computed by compressed-tensors.

What is quantised: every `nn.Linear` of the decoder. The token embedding (and the output layer,
tied to it in Gemma) too when `quantize_embeddings` is set, which is the default for
`int4_per_block` only: llama.cpp files store `token_embd` in the file's type, while
compressed-tensors checkpoints keep `embed_tokens`/`lm_head` in full precision (its usual
`ignore: [lm_head]`), and vLLM loads them that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn.utils import parametrize

Scheme = Literal["int4_per_channel", "int4_per_block", "fp8"]
BlockFormat = Literal["gguf_q4_0", "compressed_tensors"]
SCHEMES: tuple[str, ...] = ("int4_per_channel", "int4_per_block", "fp8")
Q4_0_BLOCK = 32  # GGUF's Q4_0 and Q8_0 blocks hold 32 weights; the format allows no other size


@dataclass(frozen=True)
class QuantSpec:
    """Which weights are fake-quantised, and how."""

    scheme: Scheme = "int4_per_block"
    block_size: int = Q4_0_BLOCK
    block_format: BlockFormat = "gguf_q4_0"
    quantize_embeddings: bool | None = None  # None: the scheme's format convention (see module docstring)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme: expected one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size: expected a positive number of weights, got {self.block_size}")
        if self.scheme == "int4_per_block" and self.block_format == "gguf_q4_0" and self.block_size != Q4_0_BLOCK:
            raise ValueError(f"block_size: GGUF Q4_0 blocks hold exactly {Q4_0_BLOCK} weights, got {self.block_size}; "
                             "set block_format: compressed_tensors for other group sizes")

    @property
    def embeddings_quantised(self) -> bool:
        if self.quantize_embeddings is not None:
            return self.quantize_embeddings
        return self.scheme == "int4_per_block" and self.block_format == "gguf_q4_0"


# --- GGUF block quantisers (llama.cpp's reference numerics, in torch) ---------------------------

def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    if w.shape[-1] % block:
        raise ValueError(f"a weight of shape {tuple(w.shape)} does not split into blocks of {block} along its last "
                         "dimension (GGUF quantises rows in whole blocks)")
    return w.detach().to(torch.float32).reshape(-1, block)


def q4_0_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q4_0 codes: (scales fp16 [n_blocks, 1], nibbles uint8 in 0..15 [n_blocks, 32]).

    The arithmetic of gguf.quants.Q4_0.quantize_blocks: the scale divides by the *signed*
    extreme value so it lands on -8 exactly, the reciprocal is taken in float32, and the codes
    are truncated after adding 8.5 (which rounds half up, unlike torch.round's half-to-even).
    """
    blocks = _blocks(w, Q4_0_BLOCK)
    extreme = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))
    d = extreme / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = torch.trunc(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)
    return d.to(torch.float16), codes


def q4_0_dequantize(scales: torch.Tensor, codes: torch.Tensor, shape) -> torch.Tensor:
    return (scales.to(torch.float32) * (codes.to(torch.float32) - 8)).reshape(shape)


def q8_0_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0 codes: (scales fp16 [n_blocks, 1], int8 codes [n_blocks, 32]); gguf.quants.Q8_0's arithmetic
    (scale = max|w| / 127 in float32, codes rounded half away from zero)."""
    blocks = _blocks(w, Q4_0_BLOCK)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    scaled = blocks * inv
    # ggml's roundf, half away from zero, as floor(a) + floor(2 * (a - floor(a))): both steps are
    # exact in float32, whereas floor(a + 0.5) rounds the sum first (0.49999997 + 0.5 becomes 1.0).
    a = scaled.abs()
    whole = torch.floor(a)
    codes = torch.sign(scaled) * (whole + torch.floor(2 * (a - whole)))
    return d.to(torch.float16), codes.to(torch.int8)


def q8_0_dequantize(scales: torch.Tensor, codes: torch.Tensor, shape) -> torch.Tensor:
    return (scales.to(torch.float32) * codes.to(torch.float32)).reshape(shape)


def fake_quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    return q4_0_dequantize(*q4_0_quantize(w), w.shape).to(w.dtype)


def fake_quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    return q8_0_dequantize(*q8_0_quantize(w), w.shape).to(w.dtype)


# --- compressed-tensors quantisers (its own definitions) ----------------------------------------

def compressed_tensors_args(scheme: str, group_size: int = 128):
    """compressed-tensors QuantizationArgs for a weight scheme: int4_per_channel, int4_per_group, fp8."""
    from compressed_tensors.quantization import QuantizationArgs

    if scheme == "int4_per_channel":
        return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel")
    if scheme in ("int4_per_group", "int4_per_block"):
        return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    if scheme == "fp8":
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    raise ValueError(f"scheme: expected int4_per_channel, int4_per_group or fp8, got {scheme!r}")


def compressed_tensors_qparams(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) exactly as compressed-tensors' memoryless min-max observer computes them."""
    from compressed_tensors.quantization.utils import calculate_qparams

    w = w.detach()
    if args.strategy == "channel":
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    else:  # group: one scale per `group_size` consecutive weights of a row
        if w.shape[-1] % args.group_size:
            raise ValueError(f"a weight of shape {tuple(w.shape)} does not split into groups of {args.group_size}")
        grouped = w.reshape(w.shape[0], -1, args.group_size)
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    return calculate_qparams(lo, hi, args)


def fake_quantize_compressed_tensors(w: torch.Tensor, args) -> torch.Tensor:
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    scale, zero_point = compressed_tensors_qparams(w, args)
    return fake_quantize(w.detach(), scale, zero_point, args)


# --- the scheme's quantiser, and the STE --------------------------------------------------------

def fake_quantize_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Q(w): the weight as the exported file will hold it, dequantised to w's dtype (no gradient)."""
    with torch.no_grad():
        if spec.scheme == "int4_per_block" and spec.block_format == "gguf_q4_0":
            return fake_quantize_q4_0(w)
        return fake_quantize_compressed_tensors(w, compressed_tensors_args(spec.scheme, spec.block_size)).to(w.dtype)


class StraightThroughFakeQuant(torch.nn.Module):
    """A parametrization: the forward sees Q(w); the gradient reaches w unchanged (STE)."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (fake_quantize_weight(w, self.spec) - w).detach()


def quantised_modules(model, spec: QuantSpec) -> dict[str, torch.nn.Module]:
    """{name: module} of the modules whose `weight` the scheme quantises (decoder Linears; embeddings per spec)."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    chosen: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if module is head or module is embed:
            if spec.embeddings_quantised:
                chosen[name] = module
        elif isinstance(module, torch.nn.Linear):
            chosen[name] = module
    return chosen


def attach_fake_quantization(model, spec: QuantSpec) -> list[str]:
    """Make every quantised module's `weight` its fake-quantised value (STE) in forward; returns their names.

    A tied output layer shares its Parameter with the embedding: both get the parametrization,
    so both compute the same Q(w), and the one Parameter receives both gradients.
    """
    names = []
    for name, module in quantised_modules(model, spec).items():
        if not parametrize.is_parametrized(module, "weight"):
            parametrize.register_parametrization(module, "weight", StraightThroughFakeQuant(spec), unsafe=True)
        names.append(name)
    return names


def detach_fake_quantization(model, bake: bool = False) -> None:
    """Remove the parametrizations: the latent float weights come back, or with `bake` their quantised values."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=bake)


@torch.no_grad()
def quantize_weights_in_place(model, spec: QuantSpec) -> list[str]:
    """Post-training quantisation by rounding to nearest (PTQ): every quantised weight becomes Q(w)."""
    names = []
    seen: set[int] = set()
    for name, module in quantised_modules(model, spec).items():
        if id(module.weight) not in seen:  # a tied weight is rounded once
            module.weight.copy_(fake_quantize_weight(module.weight, spec))
            seen.add(id(module.weight))
        names.append(name)
    return names
