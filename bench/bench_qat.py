"""QAT against plain round-to-nearest quantisation (PTQ) on a tiny Gemma 3, per scheme, through the exported files.

Gemma 3's claim (report, section 2.3): finetuning the quantised model towards the full-precision
model's probabilities (QAT) keeps it closer to the full-precision model than rounding alone.
Here, on the toy world:

1. a tiny Gemma 3 (hidden 128, 2 layers) finetuned on toy math conversations: the full-precision
   model (FP);
2. per scheme (int4_per_block = GGUF Q4_0, int4_per_channel and fp8 = compressed-tensors):
   - PTQ: FP's weights rounded to nearest by the scheme's quantiser, written to the scheme's file
     format, loaded back in transformers;
   - QAT: the real `qat` stage (teacher = FP) for --steps steps, one run per seed in --seeds,
     then written and loaded back the same way;
   each measured on held-out toy math prompts: KL(FP || model) per token on FP's greedy answers,
   and greedy accuracy (the answer's number equals the reference);
3. file sizes: each format's file against bf16 weights (2 bytes per parameter), beside the ratios
   of Gemma 3's Table 3 (weights only).

The QAT rows show mean and standard deviation over seeds (the seed changes the QAT batches; PTQ
is deterministic). Prints a table and writes results.json into --out. It does not assert: where
QAT does not beat PTQ the table says so.

    python bench/bench_qat.py                                   # 3 schemes x 3 seeds, 150 QAT steps
    python bench/bench_qat.py --schemes int4_per_block --seeds 0,1 --steps 50

llama.cpp: when the `llama_cpp` Python bindings are installed, the int4_per_block GGUF is also
loaded by llama.cpp itself and asked one held-out prompt (its answer is printed beside
transformers'); otherwise that row says it was skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Gemma 3 report, Table 3: weight memory in GB, raw bf16 vs the QAT checkpoints (quoted from the report;
# only the ratios to bf16 are compared here).
TABLE3_GB = {"1B": (2.0, 0.5, 0.7, 1.0), "4B": (8.0, 2.6, 2.9, 4.4), "12B": (24.0, 6.6, 7.1, 12.4),
             "27B": (54.0, 14.1, 15.3, 27.4)}
TABLE3_COLUMN = {"int4_per_channel": 1, "int4_per_block": 2, "fp8": 3}
LEARNING_RATES = {"int4_per_block": 1e-4, "int4_per_channel": 3e-5, "fp8": 1e-5}  # as in tests/qat


def build_full_precision(work: Path, steps: int) -> Path:
    from posttrain.chat import tokenize_conversation
    from posttrain.modeling import load_policy
    from posttrain.sequences import TokenSequence, pad_batch
    from posttrain.toy import tasks
    from posttrain.toy.models import TinyModelSpec, build_tiny_model
    from posttrain.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer(work / "tokenizer")
    build_tiny_model(TinyModelSpec(arch="gemma3"), tok, work / "init")
    model, tok = load_policy(work / "init")
    rows = tasks.generate("math", 2000, seed=0, fmt="chat")
    seqs = [TokenSequence(*vars(tokenize_conversation(tok, r["messages"])).values()) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = pad_batch([seqs[i] for i in torch.randint(len(seqs), (32,), generator=g).tolist()], tok.pad_token_id)
        labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(work / "fp"))
    tok.save_pretrained(str(work / "fp"))
    return work / "fp"


class Heldout:
    """Held-out math prompts, FP's greedy answers to them, and the two measures."""

    def __init__(self, fp_dir: Path, n: int):
        from posttrain.chat import tokenize_prompt
        from posttrain.modeling import load_policy, stop_token_ids
        from posttrain.stages.qat import teacher_answers
        from posttrain.toy import tasks

        self.fp, self.tok = load_policy(fp_dir)
        self.fp.eval()
        self.rows = tasks.generate("math", n, seed=5, split="eval", fmt="prompt")
        self.prompts = [tokenize_prompt(self.tok, r["prompt"]) for r in self.rows]
        self.stop = stop_token_ids(self.tok)
        self.answers = teacher_answers(self.fp, self.prompts, self.tok.pad_token_id, self.stop, 32)

    def kl(self, model) -> float:
        from posttrain.sequences import summed_kls

        sums = summed_kls(model, self.fp, self.answers, self.tok.pad_token_id, 1.0, None)
        return sums["kl_teacher_student"] / sums["tokens"]

    def accuracy(self, model) -> float:
        from posttrain.stages.qat import teacher_answers
        from rewards.math import extract_answer

        answers = teacher_answers(model, self.prompts, self.tok.pad_token_id, self.stop, 32)
        correct = 0
        for row, seq, prompt in zip(self.rows, answers, self.prompts):
            text = self.tok.decode(seq.input_ids[len(prompt):], skip_special_tokens=True)
            correct += extract_answer(text) == row["answer"]
        return correct / len(self.rows)


def write_and_load(model, tok, scheme: str, where: Path):
    """The scheme's file (GGUF Q4_0, or compressed-tensors), loaded back with transformers; (model, bytes)."""
    from transformers import AutoModelForCausalLM

    from posttrain.quantized_export import GGUFLayout, file_bytes, write_compressed_tensors, write_gguf

    where.mkdir(parents=True, exist_ok=True)
    if scheme == "int4_per_block":
        model.config.save_pretrained(str(where))  # transformers' GGUF loader needs query_pre_attn_scalar from it
        write_gguf(model, tok, where / "model-q4_0.gguf", GGUFLayout("q4_0"))
        from transformers import AutoConfig
        loaded = AutoModelForCausalLM.from_pretrained(str(where), gguf_file="model-q4_0.gguf",
                                                      config=AutoConfig.from_pretrained(str(where)), dtype=torch.float32)
        return loaded.eval(), file_bytes(where / "model-q4_0.gguf")
    write_compressed_tensors(model, tok, where / "ct", scheme, group_size=32)
    return AutoModelForCausalLM.from_pretrained(str(where / "ct"), dtype=torch.float32).eval(), file_bytes(where / "ct")


def run_qat_stage(fp_dir: Path, scheme: str, seed: int, steps: int, work: Path) -> Path:
    from posttrain.data import write_jsonl
    from posttrain.stages.base import StageContext
    from posttrain.stages.qat import QATStageConfig, run_qat
    from posttrain.toy import tasks

    data = work / "qat_data.jsonl"
    if not data.exists():
        write_jsonl(data, tasks.generate("math", 2000, seed=1, fmt="chat"))
    stage_dir = work / f"qat_{scheme}_{seed}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(name="qat", kind="qat", stage_dir=stage_dir, run_dir=work, seed=seed, recipe_name="bench_qat")
    cfg = QATStageConfig(model=str(fp_dir), dataset=str(data), scheme=scheme, max_steps=steps, batch_size=16,
                         learning_rate=LEARNING_RATES[scheme], chunk_size=None)
    return Path(run_qat(cfg, ctx).outputs["model"])


def llama_cpp_answer(gguf_path: Path, prompt: str) -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, verbose=False)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=32, temperature=0)
    return out["choices"][0]["message"]["content"]


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} +- {statistics.stdev(values):.2g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schemes", default="int4_per_block,int4_per_channel,fp8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150, help="QAT steps per run")
    ap.add_argument("--fp-steps", type=int, default=600, help="finetuning steps of the full-precision model")
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_qat_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    fp_dir = build_full_precision(work, args.fp_steps)
    held = Heldout(fp_dir, args.heldout)
    n_params = sum(p.numel() for p in held.fp.parameters())
    results = {"fp": {"accuracy": held.accuracy(held.fp), "kl": 0.0, "parameters": n_params,
                      "bf16_bytes": 2 * n_params}, "schemes": {}}
    print(f"FP: accuracy {results['fp']['accuracy']:.3f} on {args.heldout} held-out prompts, {n_params} parameters")

    from posttrain.modeling import load_policy
    from posttrain.quantization import QuantSpec, quantize_weights_in_place

    for scheme in args.schemes.split(","):
        spec = QuantSpec(scheme, 32, "gguf_q4_0" if scheme == "int4_per_block" else "compressed_tensors")
        ptq_model, tok = load_policy(fp_dir)
        quantize_weights_in_place(ptq_model, spec)
        ptq_kl_memory = held.kl(ptq_model)
        loaded, size = write_and_load(load_policy(fp_dir)[0], tok, scheme, work / f"ptq_{scheme}")
        row = {"ptq": {"kl": held.kl(loaded), "kl_in_memory": ptq_kl_memory, "accuracy": held.accuracy(loaded)},
               "bytes": size, "qat": []}
        for seed in [int(s) for s in args.seeds.split(",")]:
            qat_dir = run_qat_stage(fp_dir, scheme, seed, args.steps, work)
            qat_model, _ = load_policy(qat_dir)
            loaded, _ = write_and_load(qat_model, tok, scheme, work / f"qat_{scheme}_{seed}_files")
            row["qat"].append({"seed": seed, "kl": held.kl(loaded), "accuracy": held.accuracy(loaded)})
            print(f"  {scheme} seed {seed}: QAT KL {row['qat'][-1]['kl']:.3g} (PTQ {row['ptq']['kl']:.3g})", flush=True)
        if scheme == "int4_per_block":
            answer = llama_cpp_answer(work / f"qat_{scheme}_0_files" / "model-q4_0.gguf", held.rows[0]["prompt"])
            row["llama_cpp_answer"] = answer if answer is not None else "skipped: llama_cpp bindings not installed"
        results["schemes"][scheme] = row

    print(f"\n{'scheme':<18}{'model':<6}{'KL(FP||model)':>22}{'accuracy':>20}   (through the exported file, "
          f"seeds {args.seeds}, {args.steps} QAT steps)")
    print(f"{'full precision':<18}{'FP':<6}{0.0:>22.3g}{results['fp']['accuracy']:>20.3f}")
    for scheme, row in results["schemes"].items():
        qkl = [r["kl"] for r in row["qat"]]
        qacc = [r["accuracy"] for r in row["qat"]]
        print(f"{scheme:<18}{'PTQ':<6}{row['ptq']['kl']:>22.3g}{row['ptq']['accuracy']:>20.3f}")
        print(f"{'':<18}{'QAT':<6}{_spread(qkl):>22}{_spread(qacc):>20}")
        wins = sum(k < row["ptq"]["kl"] for k in qkl)
        row["qat_kl_below_ptq"] = f"{wins} of {len(qkl)} seeds"
        print(f"{'':<18}QAT KL / PTQ KL = {statistics.mean(qkl) / max(row['ptq']['kl'], 1e-12):.3f}; "
              f"QAT below PTQ in {wins} of {len(qkl)} seeds")
    print(f"\n{'file':<32}{'bytes':>12}{'/ bf16':>10}   Gemma 3 Table 3 (weights / bf16): 1B, 4B, 12B, 27B")
    for scheme, row in results["schemes"].items():
        ratio = row["bytes"] / results["fp"]["bf16_bytes"]
        table = ", ".join(f"{v[TABLE3_COLUMN[scheme]] / v[0]:.3f}" for v in TABLE3_GB.values())
        name = "GGUF Q4_0" if scheme == "int4_per_block" else f"compressed-tensors {scheme}"
        print(f"{name:<32}{row['bytes']:>12}{ratio:>10.3f}   {table}")
        row["bytes_over_bf16"] = ratio
    if "int4_per_block" in results["schemes"]:
        print(f"\nllama.cpp: {results['schemes']['int4_per_block']['llama_cpp_answer']}")
    print(f"\n{time.time() - started:.0f} s; results in {work / 'results.json'}")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
