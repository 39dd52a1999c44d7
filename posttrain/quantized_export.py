"""Quantised checkpoints: GGUF for llama.cpp and compressed-tensors safetensors for vLLM/transformers.

Both writers quantise with the numerics of posttrain.quantization, so a model trained by the
`qat` stage is written exactly as it was trained (docs/qat.md):

- GGUF: written with the `gguf` package (its GGUFWriter, its tensor-name map for Gemma 3 and its
  reference Q4_0/Q8_0 quantisers), llama.cpp's Gemma 3 metadata, and the tokenizer inside the
  file (vocabulary, merges, token types, special ids, chat template), so llama.cpp needs no
  other file. As llama.cpp's own converter does, RMSNorm weights are stored as 1 + w (Gemma's
  norms scale by 1 + w; llama.cpp multiplies by the stored value). The tied output layer is
  not stored: llama.cpp reads `token_embd` for it.
- compressed-tensors: each quantised Linear's weight compressed by compressed-tensors' own
  compressors (int4 packed into int32 with a float scale per channel or group; fp8 e4m3 with a
  float scale per channel), `quantization_config` in config.json; embeddings and the output
  layer stay in full precision (`ignore: [lm_head]`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from posttrain.quantization import QuantSpec, compressed_tensors_args, compressed_tensors_qparams, quantised_modules


class QuantizedExportError(ValueError):
    """The model or tokenizer cannot be written in the asked format."""


GGUF_TYPES = ("q4_0", "q8_0", "f16")
COMPRESSED_TENSORS_SCHEMES = ("int4_per_channel", "int4_per_group", "fp8")


@dataclass(frozen=True)
class GGUFLayout:
    """What a GGUF type quantises, and the QAT spec whose weights it reproduces exactly."""

    qtype: str
    quantize_embeddings: bool = True

    def spec(self) -> QuantSpec | None:
        """The training-time quantiser matching the file bit for bit (None: f16 / q8_0 have no QAT scheme)."""
        return QuantSpec("int4_per_block", 32, "gguf_q4_0", self.quantize_embeddings) if self.qtype == "q4_0" else None


# --- GGUF ----------------------------------------------------------------------------------------

def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _rope_bases(config) -> tuple[float, float]:
    """(global, local) RoPE bases; transformers 5 keeps them per attention type in rope_parameters."""
    params = getattr(config, "rope_parameters", None) or {}
    full = params.get("full_attention", params) if isinstance(params, dict) else {}
    local = params.get("sliding_attention", {}) if isinstance(params, dict) else {}
    return (float(full.get("rope_theta", getattr(config, "rope_theta", 1_000_000.0))),
            float(local.get("rope_theta", getattr(config, "rope_local_base_freq", 10_000.0))))


def _write_gemma3_metadata(writer, config) -> None:
    import gguf

    if getattr(config, "query_pre_attn_scalar", config.head_dim) != config.head_dim:
        raise QuantizedExportError(f"query_pre_attn_scalar {config.query_pre_attn_scalar} differs from head_dim "
                                   f"{config.head_dim}; llama.cpp's gemma3 scales queries by head_dim")
    global_base, local_base = _rope_bases(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(global_base)
    writer.add_rope_freq_base_swa(local_base)
    if config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_type(gguf.GGUFType.MODEL)


def _write_tokenizer(writer, tokenizer) -> None:
    """The tokenizer as llama.cpp stores it: byte-level BPE as `gpt2`, SentencePiece-style BPE (Gemma) as `llama`."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise QuantizedExportError(f"tokenizer model {model.get('type')!r}: GGUF export handles BPE tokenizers "
                                   "(byte-level as gpt2, SentencePiece-style as llama)")
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    added = {t["id"] for t in spec.get("added_tokens", [])}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer") or {})
    # llama.cpp token types: 1 normal, 3 control, 4 user-defined, 6 byte
    types = [3 if i in special else 4 if i in added else
             6 if (not byte_level and tok.startswith("<0x") and len(tok) == 6) else 1 for i, tok in enumerate(tokens)]
    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    writer.add_tokenizer_pre("gpt-2" if byte_level else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not byte_level:
        writer.add_token_scores([-float(i) for i in range(n)])  # merge priority: earlier ids merge first
    merges = model.get("merges") or []
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def gguf_tensor_name(name_map, hf_name: str) -> str:
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise QuantizedExportError(f"no GGUF tensor name for {hf_name} in the gguf package's Gemma 3 map")
    return gguf_name


def write_gguf(model, tokenizer, path: Path, layout: GGUFLayout) -> dict[str, str]:
    """Write a Gemma 3 GGUF with weights of type `layout.qtype`; returns {hf tensor name: gguf type}."""
    import gguf
    from gguf import GGMLQuantizationType as T

    config = _text_config(model)
    if config.model_type != "gemma3_text":
        raise QuantizedExportError(f"GGUF export writes Gemma 3 text models (Gemma3ForCausalLM); this one is "
                                   f"{config.model_type!r}")
    if model.config is not config:
        raise QuantizedExportError("GGUF export of a composite Gemma 3 checkpoint (vision tower + language model) is "
                                   "not supported: llama.cpp keeps the vision tower in a separate mmproj file, which "
                                   "is not written here; export the text model, or use compressed-tensors")
    quantised = {n + ".weight" for n in quantised_modules(model, QuantSpec("int4_per_block", 32, "gguf_q4_0",
                                                                           layout.quantize_embeddings))}
    qtype = {"q4_0": T.Q4_0, "q8_0": T.Q8_0, "f16": T.F16}[layout.qtype]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    _write_gemma3_metadata(writer, config)
    writer.add_file_type({"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "f16": gguf.LlamaFileType.MOSTLY_F16}[layout.qtype])
    _write_tokenizer(writer, tokenizer)
    written: dict[str, str] = {}
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp uses token_embd for the output layer when output.weight is absent
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith("norm.weight"):
            data = data + np.float32(1.0)
        if name in quantised and layout.qtype != "f16" and data.ndim == 2 and data.shape[-1] % 32 == 0:
            raw, kind = gguf.quants.quantize(data, qtype), qtype
        elif data.ndim >= 2:
            raw, kind = data.astype(np.float16), T.F16  # matrices left unquantised are stored f16
        else:
            raw, kind = data, T.F32  # norms and other vectors stay f32, as llama.cpp's converter keeps them
        writer.add_tensor(gguf_tensor_name(name_map, name), raw, raw_dtype=kind if kind == qtype != T.F16 else None)
        written[name] = kind.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def read_gguf_weights(path: Path) -> dict[str, np.ndarray]:
    """{gguf tensor name: float32 array in HF layout [rows, columns]}, dequantised with the gguf package."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    return out


# --- compressed-tensors --------------------------------------------------------------------------

def compressed_tensors_spec(scheme: str, group_size: int) -> QuantSpec:
    """The QAT spec whose fake-quantised weights this compressed-tensors scheme stores exactly."""
    if scheme == "int4_per_group":
        return QuantSpec("int4_per_block", group_size, "compressed_tensors", False)
    return QuantSpec(scheme, group_size, "compressed_tensors", False)


def write_compressed_tensors(model, tokenizer, out_dir: Path, scheme: str, group_size: int = 128) -> list[str]:
    """A compressed-tensors checkpoint in `out_dir`; returns the names of the compressed Linears."""
    from compressed_tensors.compressors import FloatQuantizationCompressor, PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus
    from safetensors.torch import save_file

    args = compressed_tensors_args(scheme, group_size)
    fmt = "float-quantized" if scheme == "fp8" else "pack-quantized"
    compressor = FloatQuantizationCompressor if scheme == "fp8" else PackedQuantizationCompressor
    qscheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    modules = quantised_modules(model, compressed_tensors_spec(scheme, group_size))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name in modules:
        weight = state.pop(f"{name}.weight")
        scale, zero_point = compressed_tensors_qparams(weight, args)
        compressed = compressor.compress({"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point},
                                         qscheme)
        state.update({f"{name}.{k}": v.contiguous() for k, v in compressed.items()})
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        state.pop("lm_head.weight", None)  # tied: transformers re-ties it from embed_tokens
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(out_dir))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out_dir))
    config = QuantizationConfig(config_groups={"group_0": qscheme}, format=fmt, ignore=["lm_head"],
                                quantization_status=QuantizationStatus.COMPRESSED)
    config_path = out_dir / "config.json"
    text = json.loads(config_path.read_text())
    text["quantization_config"] = config.model_dump(mode="json")
    config_path.write_text(json.dumps(text, indent=2))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out_dir))
    return list(modules)


def read_compressed_tensors_weights(out_dir: Path, scheme: str, group_size: int = 128) -> dict[str, torch.Tensor]:
    """{linear name: weight} decompressed by compressed-tensors from the written safetensors."""
    from compressed_tensors.compressors import FloatQuantizationCompressor, PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    args = compressed_tensors_args(scheme, group_size)
    fmt = "float-quantized" if scheme == "fp8" else "pack-quantized"
    compressor = FloatQuantizationCompressor if scheme == "fp8" else PackedQuantizationCompressor
    qscheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    state = load_file(str(out_dir / "model.safetensors"))
    names = {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight_scale")}
    out = {}
    for name in names:
        local = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == name}
        out[name] = compressor.decompress(local, qscheme)["weight"]
    return out


def file_bytes(path: Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*.safetensors")) if path.is_dir() else path.stat().st_size


# --- what a file should hold ---------------------------------------------------------------------

@torch.no_grad()
def as_stored(model, fmt: str, kind: str, group_size: int = 32, quantize_embeddings: bool = True):
    """A copy of `model` whose weights are exactly what the file of (fmt, kind) holds, dequantised: the
    reference a reloaded export must reproduce. GGUF: quantised matrices through the torch Q4_0/Q8_0
    (checked against the gguf package), other matrices rounded to f16; compressed-tensors: its fake quantiser."""
    import copy

    from posttrain.quantization import fake_quantize_compressed_tensors, fake_quantize_q4_0, fake_quantize_q8_0

    ref = copy.deepcopy(model)
    if fmt == "compressed-tensors":
        args = compressed_tensors_args(kind, group_size)
        for module in quantised_modules(ref, compressed_tensors_spec(kind, group_size)).values():
            module.weight.copy_(fake_quantize_compressed_tensors(module.weight, args))
        return ref
    chosen = quantised_modules(ref, QuantSpec("int4_per_block", 32, "gguf_q4_0", quantize_embeddings)).values()
    quantised = {id(m.weight) for m in chosen}
    for name, p in ref.named_parameters():
        if p.dim() < 2:
            continue
        if id(p) in quantised and kind != "f16" and p.shape[-1] % 32 == 0:
            p.copy_(fake_quantize_q4_0(p) if kind == "q4_0" else fake_quantize_q8_0(p))
        else:
            p.copy_(p.to(torch.float16).to(p.dtype))
    return ref


def rounds_as_trained(trained: dict, fmt: str, kind: str, group_size: int, quantize_embeddings: bool) -> bool:
    """Whether a file of (fmt, kind) holds exactly the weights a qat stage with `trained` (its quantization.json)
    computed in its forward pass."""
    scheme, block_format = trained.get("scheme"), trained.get("block_format")
    if fmt == "gguf":
        return (kind == "q4_0" and scheme == "int4_per_block" and block_format == "gguf_q4_0"
                and trained.get("quantize_embeddings") == quantize_embeddings)
    if trained.get("quantize_embeddings"):
        return False  # compressed-tensors keeps embeddings in full precision
    if kind == "int4_per_group":
        return (scheme == "int4_per_block" and block_format == "compressed_tensors"
                and trained.get("block_size") == group_size)
    return scheme == kind
