"""Peak memory of one rl step and one distill step against the vocabulary size, with full logits
("before", chunk_size None) and with chunked per-token log-probs ("after").

Model: a tiny Gemma3 (hidden 64, 1 layer, head_dim 32) from posttrain.toy whose output layer
has V rows, V in --vocab (Gemma 3 itself has 262,144). Everything except the output layer is
tiny, so what grows with V is the vocabulary work alone.

- rl: the rl stage's own RLOO pass (posttrain.stages.rl.policy_gradient_pass) on one micro-batch:
  score_completions on the policy (with gradient, with entropy), on the anchor and on the start
  model (no gradient), shared prompts (group_size samples per prompt), KL-regularised RLOO
  advantages, reinforce_loss, backward. --seqs completions of --tokens tokens after a --prompt-tokens prompt.
- distill: the student's and the teacher's logits the way the distill stage gets them (full
  logits, or ProjectedLogits over the decoder's hidden states), the stage's default loss
  (generalised JSD over the full vocabulary, beta 0.5) on --seqs sequences of --tokens tokens
  whose first --prompt-tokens are not trained on, backward.

Each configuration runs in its own process. Peak = growth over the process's state after the
models and inputs are built: ru_maxrss (CPU) or torch.cuda.max_memory_allocated (CUDA).
"before" configurations whose estimated need (B x T x V x 4 bytes x copies, the copies
calibrated on a smaller vocabulary when one ran) exceeds --max-fraction of the machine's memory
are not run and show as "skipped (needs ~N GB)".

    python bench/bench_memory.py                                     # CPU, 32 x 512, V up to 262144
    python bench/bench_memory.py --device cuda
    python bench/bench_memory.py --seqs 8 --tokens 256 --vocab 32768 65536

Sharded mode (`--sharding fsdp --nproc N`): per-rank memory of one rl step and one distill
step of a Gemma3 of --hidden x --layers (default about 300M parameters), `sharding: none`
against `fsdp`, both launched with torchrun on N processes (gloo on CPUs, NCCL on GPUs), and
the bytes the weight sync adds. Each rank reports the bytes it holds of the trained model's
parameters, gradients and AdamW state, of the frozen models (rl: EMA anchor and start model;
distill: teacher), the step's peak growth (CPU: the resident-set high-water mark, reset before
the step through /proc/self/clear_refs; CUDA: max_memory_allocated), and the sync's extra
memory: the whole tensors alive at once during `sync_weights` (each one tracked until freed)
and the high-water growth, pushing into no engine so that only the gathers count. Where the
stages' TrainingSession takes `sharding`, it shards the models (`prepare`, `place_frozen`) and
steps the optimizer; otherwise the bench applies FSDP2 itself the same way (fully_shard per
decoder layer, then the root; frozen models alike) and says so. Both modes run the same step
(full logits of the policy and the frozen models, a REINFORCE-with-KL loss for rl and a
generalised JSD for distill, backward, AdamW), so the comparison isolates the sharding.

    torchrun is started by the bench:
    python bench/bench_memory.py --sharding fsdp --nproc 2                  # ~300M parameters
    python bench/bench_memory.py --sharding fsdp --nproc 2 --hidden 512 --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN = 64  # the tiny model's width: its weights are small next to any vocabulary-sized tensor

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GB = 1e9
# Full-logits copies of [B, T, V] float32 alive at the peak, before any calibration (measured on
# an H200 at 32 x 512: rl 4.0, distill 14.1): rl keeps the policy's logits and log-softmax for
# backward plus the entropy's and the gradient's temporaries; distill holds student and teacher
# logits, both log-softmaxes, the JSD mixture and their gradients.
COPIES = {"rl": 4.5, "distill": 15.0}


class _Vocabulary:
    """The little of a tokenizer that posttrain.toy.models.build_tiny_model reads: its size and ids."""

    def __init__(self, size: int):
        self.size, self.pad_token_id, self.bos_token_id, self.eos_token_id = size, 0, 2, 1

    def __len__(self) -> int:
        return self.size


def _tiny_gemma3(vocab: int, seed: int):
    from posttrain.toy.models import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(arch="gemma3", hidden_size=HIDDEN, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32,
                         intermediate_size=128, max_position_embeddings=4096, seed=seed)
    return build_tiny_model(spec, _Vocabulary(vocab))


# --- one step of each stage -------------------------------------------------------------------------

def _rl_setup(args, vocab: int, device, chunk_size):
    import torch

    from posttrain.rollout.types import Completion
    from posttrain.stages.rl import Learner, RLStageConfig
    from posttrain.training import TrainingSession

    policy = _tiny_gemma3(vocab, 0).to(device).train()
    anchor = _tiny_gemma3(vocab, 1).to(device).eval().requires_grad_(False)
    start_model = _tiny_gemma3(vocab, 2).to(device).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    n = args.group_size
    prompts = [[2] + torch.randint(3, vocab, (args.prompt_tokens - 1,), generator=g).tolist()
               for _ in range(args.seqs // n)]
    completions = [Completion(token_ids=torch.randint(3, vocab, (args.tokens,), generator=g).tolist(), text="",
                              logprobs=[], finish_reason="length") for _ in range(len(prompts) * n)]
    rewards = torch.rand(len(completions), generator=g).tolist()
    config = RLStageConfig(model="bench", dataset="bench", rewards=[{"name": "math"}], num_generations=n,
                           prompts_per_step=len(prompts), beta=0.05, logprob_chunk_size=chunk_size)
    learner = Learner(config, TrainingSession("fp32", seed=0), policy, anchor, start_model, pad_id=0)
    return learner, prompts, completions, rewards


def _rl_step(learner, prompts, completions, rewards):
    """One micro-batch of the rl stage's RLOO step: scoring, advantages, loss, backward."""
    from posttrain.stages.rl import policy_gradient_pass

    stats, _ = policy_gradient_pass(learner, prompts, completions, rewards)
    return {"loss": stats.loss, "entropy": stats.entropy_sum / stats.entropy_count,
            "kl_start": sum(stats.kl_start) / len(stats.kl_start)}


def _distill_setup(args, vocab: int, device):
    import torch

    student = _tiny_gemma3(vocab, 0).to(device).train()
    teacher = _tiny_gemma3(vocab, 3).to(device).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.seqs, args.tokens), generator=g)
    ids[:, 0] = 2
    loss_mask = torch.ones_like(ids)
    loss_mask[:, :args.prompt_tokens] = 0
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "loss_mask": loss_mask.to(device)}
    return student, teacher, batch


def _shifted_logits(model, batch, chunk_size):
    """The distill stage's logits at positions 0..L-2: full, or ProjectedLogits over the decoder's output."""
    from posttrain.losses.distillation import ProjectedLogits
    from posttrain.losses.token_logprobs import vocabulary_projection

    if chunk_size is None:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
    return ProjectedLogits(hidden[:, :-1], vocabulary_projection(model))


def _distill_step(args, chunk_size, student, teacher, batch):
    import torch

    from posttrain.losses.distillation import generalized_jsd

    mask = batch["loss_mask"][:, 1:]
    with torch.no_grad():
        teacher_logits = _shifted_logits(teacher, batch, chunk_size)
    student_logits = _shifted_logits(student, batch, chunk_size)
    loss = generalized_jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0, mask=mask,
                           chunk_size=chunk_size, reduction="token_mean")
    loss.backward()
    return {"loss": loss.item()}


# --- one configuration in this process --------------------------------------------------------------

def _chunk_option(text: str):
    return text if text == "auto" else int(text)


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args) -> dict:
    import torch

    from posttrain.losses.token_logprobs import resolve_chunk_size

    torch.manual_seed(0)
    step, mode, vocab = args.worker.split(":")
    vocab = int(vocab)
    chunk_size = None if mode == "before" else resolve_chunk_size(args.chunk_size, vocab)
    device = torch.device(args.device)
    if step == "rl":
        state = _rl_setup(args, vocab, device, chunk_size)
        models = (state[0].policy, state[0].anchor, state[0].start_model)
        run = lambda: _rl_step(*state)  # noqa: E731
    else:
        state = _distill_setup(args, vocab, device)
        models = tuple(m for m in state if isinstance(m, torch.nn.Module))
        run = lambda: _distill_step(args, chunk_size, *state)  # noqa: E731
    weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    metrics = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_bytes() - base
    return {"step": step, "mode": mode, "vocab": vocab, "peak_bytes": peak, "weights_bytes": weights,
            "seconds": time.perf_counter() - t0, **metrics}


# --- sharded: none against fsdp, per rank ----------------------------------------------------------

def _sharded_spec(args):
    from posttrain.toy.models import TinyModelSpec

    heads = max(4, args.hidden // 128)
    return TinyModelSpec(arch="gemma3", hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                         num_kv_heads=max(1, heads // 2), head_dim=max(32, args.hidden // heads),
                         intermediate_size=4 * args.hidden, max_position_embeddings=4096,
                         vocab_size=max(300, min(args.sharded_vocab, 32768)))


def _high_water_reset() -> None:
    """Reset this process's resident-set high-water mark (VmHWM), so a later read is this phase's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class _Phase:
    """Peak memory growth of one phase: CUDA's allocator peak, or the CPU resident set's high-water mark."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _high_water_reset()
            self.base = _status_kib("VmRSS") * 1024

    def peak_growth(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _own_fsdp(model, device):
    """FSDP2 the way the stages shard (one unit per decoder layer, then the root), for a
    TrainingSession that does not take `sharding`."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _sharded_models(args, mode: str, device):
    """(session or None, policy, frozen models, optimizer, how they were sharded)."""
    import copy
    import inspect

    import torch

    from posttrain.toy.models import build_tiny_model
    from posttrain.training import TrainingSession

    spec = _sharded_spec(args)
    policy = build_tiny_model(spec, _Vocabulary(spec.vocab_size))
    frozen = [copy.deepcopy(policy).eval().requires_grad_(False) for _ in range(2 if args.worker_step == "rl" else 1)]
    if "sharding" in inspect.signature(TrainingSession.__init__).parameters:
        session = TrainingSession(args.precision, 0, sharding=mode)
        policy = session.prepare(policy, 1e-5)
        frozen = [session.place_frozen(m, "accelerator", "anchor_placement") for m in frozen]
        return session, policy, frozen, session.optimizer, "the stages' TrainingSession(sharding=...)"
    if mode == "fsdp":
        policy = _own_fsdp(policy.to(device), device)
        frozen = [_own_fsdp(m.to(device), device) for m in frozen]
    else:
        policy, frozen = policy.to(device), [m.to(device) for m in frozen]
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    return None, policy.train(), frozen, optimizer, "the bench's own fully_shard (TrainingSession has no sharding)"


def _sharded_loss(args, policy, frozen, ids):
    """rl: REINFORCE with a KL to the anchor (the start model scored too, as the stage logs it);
    distill: generalised JSD to the teacher. Full logits, the same in both sharding modes."""
    import torch

    from posttrain.losses.distillation import generalized_jsd

    logits = policy(input_ids=ids).logits[:, :-1].float()
    others = []
    with torch.no_grad():
        for m in frozen:
            others.append(m(input_ids=ids).logits[:, :-1].float())
            if hasattr(m, "reshard"):
                # FSDP2 keeps the root unit's parameters gathered after a forward (it expects the
                # backward to need them); a frozen model has no backward, so they are freed here.
                m.reshard()
    if args.worker_step == "distill":
        return generalized_jsd(logits, others[0], beta=0.5, temperature=1.0, reduction="token_mean")
    targets = ids[:, 1:, None]
    logp = torch.log_softmax(logits, -1).gather(-1, targets)[..., 0]
    anchor = torch.log_softmax(others[0], -1).gather(-1, targets)[..., 0]
    advantages = torch.randn(ids.shape[0], 1, generator=torch.Generator().manual_seed(0)).to(logp.device)
    return -(advantages * logp).mean() + 0.05 * (logp - anchor).mean()


def sharded_worker(args) -> dict:
    """One rank of one (step, sharding) configuration, under torchrun."""
    import torch
    import torch.distributed as dist

    from posttrain.rollout.sync import WeightStream, sync_weights

    cuda = torch.cuda.is_available()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    mode = args.worker_sharding
    session, policy, frozen, optimizer, how = _sharded_models(args, mode, device)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, _sharded_spec(args).vocab_size, (args.seqs, args.tokens), generator=g).to(device)

    phase = _Phase(device)
    t0 = time.perf_counter()
    loss = _sharded_loss(args, policy, frozen, ids)
    loss.backward()
    grads = _local_bytes(p.grad for p in policy.parameters())
    if session is not None:
        session.step(None)
    else:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_peak = phase.peak_growth()
    seconds = time.perf_counter() - t0
    optimizer_bytes = _local_bytes(t for state in optimizer.state.values() for t in state.values()
                                   if torch.is_tensor(t) and t.dim() > 0)

    # The sync's extra memory: every whole tensor the stream assembles, tracked until freed.
    live = {"now": 0, "peak": 0}
    original = WeightStream._gathered

    def tracked(self, planned):
        import weakref

        name, tensor = original(self, planned)
        nbytes = tensor.numel() * tensor.element_size()
        live["now"] += nbytes
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(tensor, lambda: live.__setitem__("now", live["now"] - nbytes))
        return name, tensor

    WeightStream._gathered = tracked
    phase = _Phase(device)
    try:
        stats = sync_weights(None, policy, args.sync_bucket_mb)
    finally:
        WeightStream._gathered = original
    sync_peak = phase.peak_growth()
    return {"rank": rank, "step": args.worker_step, "sharding": mode, "how": how, "loss": float(loss),
            "seconds": seconds, "param_bytes": _local_bytes(policy.parameters()), "grad_bytes": grads,
            "optimizer_bytes": optimizer_bytes, "frozen_bytes": sum(_local_bytes(m.parameters()) for m in frozen),
            "step_peak_bytes": step_peak, "sync_live_peak_bytes": live["peak"], "sync_peak_bytes": sync_peak,
            "sync_bytes": stats.bytes, "sync_largest_bucket_bytes": stats.largest_bucket_bytes,
            "model_params": sum(p.numel() for p in policy.parameters())}


def _launch_sharded(args, step: str, mode: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               __file__, "--sharded-worker", "--json", str(Path(tmp) / "rank{rank}.json"),
               "--worker-step", step, "--worker-sharding", mode, "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--sharded-vocab", str(args.sharded_vocab), "--seqs", str(args.seqs),
               "--tokens", str(args.tokens), "--precision", args.precision,
               "--sync-bucket-mb", str(args.sync_bucket_mb)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        files = sorted(Path(tmp).glob("rank*.json"))
        if proc.returncode != 0 or len(files) != args.nproc:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise SystemExit(f"{step}/{mode}: torchrun exited {proc.returncode}: " + " | ".join(tail))
        return [json.loads(f.read_text()) for f in files]


def sharded_main(args) -> None:
    rows = {}
    for step in args.steps:
        for mode in ("none", args.sharding):
            ranks = _launch_sharded(args, step, mode)
            # Per rank: the largest over the ranks (they hold about the same).
            rows[(step, mode)] = {k: max(r[k] for r in ranks) if isinstance(ranks[0][k], (int, float)) else ranks[0][k]
                                  for k in ranks[0]}
            print(f"  {step:8s} {mode:5s}: done in {rows[(step, mode)]['seconds']:.1f} s", flush=True)
    first = next(iter(rows.values()))
    print(f"\nGemma3 {args.hidden}x{args.layers}, {first['model_params'] / 1e6:.0f}M parameters, {args.precision}; "
          f"{args.nproc} ranks; {args.seqs} x {args.tokens} tokens per rank; sync_bucket_mb {args.sync_bucket_mb}; "
          f"sharded by {first['how']}")
    print(f"{'step':8s} {'sharding':8s} {'params':>9s} {'grads':>9s} {'AdamW':>9s} {'p+g+opt':>9s} {'frozen':>9s} "
          f"{'step peak':>10s} {'sync live':>10s} {'sync peak':>10s}   (GB per rank)")
    for (step, mode), r in rows.items():
        pgo = r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
        print(f"{step:8s} {mode:8s} {_fmt(r['param_bytes']):>9s} {_fmt(r['grad_bytes']):>9s} "
              f"{_fmt(r['optimizer_bytes']):>9s} {_fmt(pgo):>9s} {_fmt(r['frozen_bytes']):>9s} "
              f"{_fmt(r['step_peak_bytes']):>10s} {_fmt(r['sync_live_peak_bytes']):>10s} {_fmt(r['sync_peak_bytes']):>10s}")
    for step in args.steps:
        none, sharded = rows[(step, "none")], rows[(step, args.sharding)]
        pgo = {k: v["param_bytes"] + v["grad_bytes"] + v["optimizer_bytes"] for k, v in (("n", none), ("s", sharded))}
        print(f"{step}: parameters+gradients+AdamW per rank, {args.sharding} / none = {pgo['s'] / pgo['n']:.3f} "
              f"(target <= 0.6 on 2 ranks); frozen models {sharded['frozen_bytes'] / none['frozen_bytes']:.3f}; "
              f"step peak {sharded['step_peak_bytes'] / max(1, none['step_peak_bytes']):.3f}; sync adds "
              f"{_fmt(sharded['sync_live_peak_bytes'])} of whole tensors at once (one bucket: "
              f"{_fmt(args.sync_bucket_mb * 2**20)}; largest bucket {_fmt(sharded['sync_largest_bucket_bytes'])}; "
              f"the whole model {_fmt(sharded['sync_bytes'])})")
    if args.json:
        Path(args.json).write_text(json.dumps([{"step": s, "sharding": m, **r} for (s, m), r in rows.items()], indent=1))


def _fmt(n: float) -> str:
    return f"{n / GB:.3f}"


# --- the table ------------------------------------------------------------------------------------

def _machine_memory(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _run_one(args, name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", name, "--json", str(out), "--device", args.device,
               "--seqs", str(args.seqs), "--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens),
               "--group-size", str(args.group_size), "--chunk-size", str(args.chunk_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
        return json.loads(out.read_text())


def _fmt_gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--seqs", type=int, default=32, help="sequences per step (rl: completions)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per sequence (rl: completion tokens)")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt tokens (rl: before each completion; "
                    "distill: the untrained start of each sequence)")
    ap.add_argument("--group-size", type=int, default=4, help="rl: samples per prompt (shared-prompt scoring)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 65536, 131072, 262144])
    ap.add_argument("--chunk-size", type=_chunk_option, default="auto",
                    help="positions per chunk in the 'after' runs: an integer, or auto (the stages' default: as many "
                    "as fit 2**25 logits, so a chunk's memory does not depend on the vocabulary)")
    ap.add_argument("--steps", nargs="+", default=["rl", "distill"], choices=["rl", "distill"])
    ap.add_argument("--max-fraction", type=float, default=0.7,
                    help="skip 'before' runs estimated to need more than this fraction of the device's memory")
    ap.add_argument("--json", default=None, help="write the results here (a worker: its one result)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one configuration
    ap.add_argument("--sharding", choices=["fsdp"], default=None,
                    help="sharded mode: per-rank memory, sharding none against this, under torchrun (see above)")
    ap.add_argument("--nproc", type=int, default=2, help="sharded mode: processes per launch")
    ap.add_argument("--hidden", type=int, default=1024, help="sharded mode: the Gemma3's width")
    ap.add_argument("--layers", type=int, default=20, help="sharded mode: decoder layers (1024 x 20: ~350M parameters)")
    ap.add_argument("--sharded-vocab", type=int, default=32768, help="sharded mode: vocabulary rows")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="sharded mode: stage precision")
    ap.add_argument("--sync-bucket-mb", type=float, default=256, help="sharded mode: rollout.sync_bucket_mb")
    ap.add_argument("--sharded-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-step", default="rl", help=argparse.SUPPRESS)
    ap.add_argument("--worker-sharding", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sharded_worker:
        result = sharded_worker(args)
        Path(args.json.format(rank=result["rank"])).write_text(json.dumps(result))
        return
    if args.sharding:
        if args.seqs == 32 and args.tokens == 512:  # the vocabulary mode's defaults: too long for this mode on CPUs
            args.seqs, args.tokens = 2, 128
        sharded_main(args)
        return
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.seqs % args.group_size:
        ap.error(f"--seqs ({args.seqs}) must be a multiple of --group-size ({args.group_size})")
    if args.worker:
        Path(args.json).write_text(json.dumps(worker(args)))
        return

    budget = args.max_fraction * _machine_memory(args.device)
    full = args.seqs * args.tokens * 4  # bytes of one float32 row of logits per vocabulary entry
    print(f"device {args.device}; {args.seqs} sequences x {args.tokens} tokens; chunk_size {args.chunk_size}; "
          f"budget for 'before' runs {_fmt_gb(budget)} ({args.max_fraction:.0%} of {_fmt_gb(budget / args.max_fraction)})",
          flush=True)
    results = []
    for step in args.steps:
        copies = COPIES[step]
        for vocab in sorted(args.vocab):
            for mode in ("before", "after"):
                need = full * vocab * copies
                if mode == "before" and need > budget:
                    res = {"skipped": f"skipped (needs ~{need / GB:.0f} GB)"}
                else:
                    res = _run_one(args, f"{step}:{mode}:{vocab}")
                    if mode == "before" and "peak_bytes" in res:
                        # Calibrate the copies on what was measured, with a 10% margin.
                        copies = max(copies * 0.5, 1.1 * res["peak_bytes"] / (full * vocab))
                res.update(step=step, mode=mode, vocab=vocab)
                results.append(res)
                shown = res.get("skipped") or res.get("error") or f"{_fmt_gb(res['peak_bytes'])} in {res['seconds']:.1f} s"
                print(f"  {step:8s} {mode:6s} V={vocab:>7d}: {shown}", flush=True)

    print()
    print(f"{'step':8s} {'vocab':>8s} {'before':>26s} {'after':>12s} {'after/before':>13s} {'weights':>10s}")
    for step in args.steps:
        rows = {(r["mode"], r["vocab"]): r for r in results if r["step"] == step}
        for vocab in sorted(args.vocab):
            b, a = rows[("before", vocab)], rows[("after", vocab)]
            b_txt = b.get("skipped") or b.get("error", "")[:26] or _fmt_gb(b["peak_bytes"])
            a_txt = a.get("error", "")[:12] or _fmt_gb(a["peak_bytes"])
            ratio = (f"{a['peak_bytes'] / b['peak_bytes']:.3f}" if "peak_bytes" in a and "peak_bytes" in b
                     and b["peak_bytes"] > 0 else "-")
            w_txt = _fmt_gb(a["weights_bytes"]) if "weights_bytes" in a else "-"
            print(f"{step:8s} {vocab:>8d} {b_txt:>26s} {a_txt:>12s} {ratio:>13s} {w_txt:>10s}")
        after = [(v, rows[("after", v)]) for v in sorted(args.vocab) if "peak_bytes" in rows[("after", v)]]
        if len(after) >= 2:
            # The trained model's output-layer gradient, one float32 [hidden] row per vocabulary row,
            # necessarily grows with the vocabulary (as the weights do); everything else is the
            # step's working set, which is what must not.
            grad_row = HIDDEN * 4
            beyond = [r["peak_bytes"] - v * grad_row for v, r in after]
            (v0, r0), (v1, r1) = after[0], after[-1]
            print(f"{step}: 'after' peak beyond the output layer's gradient: "
                  + ", ".join(f"V={v}: {_fmt_gb(b)}" for (v, _), b in zip(after, beyond))
                  + f" (x{beyond[-1] / beyond[0]:.2f} from V={v0} to V={v1}, while the vocabulary grows "
                  f"x{v1 / v0:.0f}); the full-logits path needs ~{full * COPIES[step] * 1000 / GB:.1f} GB per "
                  f"1,000 vocabulary rows ({COPIES[step]:.1f} float32 copies of the batch's logits).")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
