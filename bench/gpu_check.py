"""One command that proves the GPU path on any CUDA machine, with or without vLLM installed.

    python bench/gpu_check.py                       # the checks below, then bench_rl against TRL
    python bench/gpu_check.py --skip-bench          # the recipes only
    python bench/gpu_check.py --skip-warm           # without the reward-model (WARM) recipe
    python bench/gpu_check.py --skip-rm-bench       # without bench_reward_model against TRL
    python bench/gpu_check.py --skip-fsdp           # without the sharded (FSDP) checks
    python bench/gpu_check.py --cpu                 # the same steps on the CPU (to try the script itself)

1. Runs the short quickstart recipe (recipes/quickstart_rloo.yaml), shortened, so that every
   stage kind runs (filter, sft, evaluate, distill, rl, export) on the GPU, and asserts from the
   stage manifests that `distill` and `rl` trained on `cuda` (their metrics record device, world
   size and global batch).
2. Reports, per stage: wall time, peak GPU memory (the runner records it in the manifest) and
   GPU utilisation sampled with nvidia-smi while the stage ran; asserts the GPU was busy during
   `distill` and `rl`.
2b. Runs recipes/warm.yaml, shortened (SFT, three reward models and their average in bf16, RL
   against the best member and against WARM), and asserts that the `reward_model` stage and
   both RL stages trained on `cuda` and that RL against WARM logged proxy and gold per step.
3. Runs bench/bench_rl.py with both contenders on the same GPU: posttrain's `rl` (each engine
   available: vLLM when installed, else transformers) against TRL's GRPOTrainer, and prints the
   tokens/s ratio (target: 1.5x or more).
4. Runs bench/bench_reward_model.py on the same GPU: the `reward_model` stage against TRL's
   RewardTrainer on the same token ids, in bf16, and prints the seconds-per-step ratio.
5. Sharding (needs 2 or more GPUs: FSDP over one process trains whole, so a 1-GPU machine skips
   this step and says so): runs bench/bench_memory.py --sharding fsdp over every GPU (torchrun,
   NCCL, bf16) and asserts that each rank holds at most 1/N + 0.1 of the unsharded run's
   parameter, gradient and AdamW bytes and that the weight sync held at most one bucket (or one
   larger tensor) of whole tensors at once; then, where the stages take `sharding`, runs the
   shortened quickstart's distill and rl under torchrun with `sharding: fsdp` and checks from
   their manifests that they trained sharded on every GPU.

Everything prints as it goes and a JSON summary is written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Shorter stages than the quickstart: the point is that each runs on the GPU, not final accuracy.
SHORT = [
    "stages.teacher.max_steps=150", "stages.sft.max_steps=100", "stages.distill.max_steps=40",
    "stages.rl.max_steps=30", "stages.rl.checkpoint_every=10",
    "datasets.chat_dirty.toy_dirty.n_clean=600", "datasets.math_eval.toy.n=50",
]

# recipes/warm.yaml cut to a few minutes: every stage kind of it runs, on the device, in bf16.
WARM_SHORT = [
    "stages.sft.max_steps=100", "stages.rm.max_steps=60", "stages.rm.probe_steps=10", "stages.rm.precision=bf16",
    "stages.rm.checkpoint_every=30", "stages.rl_best_member.max_steps=10", "stages.rl_warm.max_steps=10",
    "stages.rl_best_member.precision=bf16", "stages.rl_warm.precision=bf16",
]


class UtilisationSampler:
    """nvidia-smi's GPU utilisation and memory every 200 ms, in a background thread."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []
        self._proc = None
        self._thread = None

    def start(self) -> bool:
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "200", "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                stdout=subprocess.PIPE, text=True)
        except (FileNotFoundError, OSError):
            return False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return True

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                util, mem = (float(x) for x in line.strip().split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()

    def between(self, start: float, end: float) -> dict:
        inside = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if not inside:
            return {"util_mean": None, "util_max": None, "busy_fraction": None, "samples": 0}
        utils = [u for u, _ in inside]
        return {"util_mean": round(sum(utils) / len(utils), 1), "util_max": max(utils),
                "busy_fraction": round(sum(u > 0 for u in utils) / len(utils), 3), "samples": len(utils),
                "memory_used_max_mib": max(m for _, m in inside)}


def run_recipe(work: Path, extra: list[str], use_cpu: bool) -> dict[str, dict]:
    from posttrain.pipeline.runner import run_recipe as run

    overrides = SHORT + [f"output_dir={work / 'run'}"] + extra
    if not use_cpu:
        overrides += ["stages.rl.precision=bf16", "stages.distill.precision=bf16"]
    return run(ROOT / "recipes" / "quickstart_rloo.yaml", overrides)


def run_warm_recipe(work: Path) -> tuple[dict[str, dict], list[str]]:
    """recipes/warm.yaml, shortened: (its manifests, what failed). The reward_model stage and both
    RL stages must have trained on the expected device, and RL against WARM must log its proxy
    (the averaged reward model) and gold reward at every step."""
    import torch

    from posttrain.pipeline.runner import run_recipe as run

    failures: list[str] = []
    try:
        manifests = run(ROOT / "recipes" / "warm.yaml", WARM_SHORT + [f"output_dir={work / 'warm'}"])
    except Exception as e:  # noqa: BLE001 - reported with the rest
        return {}, [f"warm recipe: {type(e).__name__}: {e}"]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("rm", "rl_best_member", "rl_warm"):
        device = str(manifests[name]["metrics"].get("device"))
        if not device.startswith(expected):
            failures.append(f"warm/{name}: trained on {device}, expected {expected}")
    rm = manifests["rm"]["metrics"]
    print("warm/rm held-out accuracy: " + ", ".join(f"{k} {rm[k]:.3f}" for k in (
        "members/accuracy_mean", "members/accuracy_best", "average/accuracy", "ensemble/accuracy") if k in rm), flush=True)
    rows = [json.loads(line) for line in (work / "warm" / "rl_warm" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/proxy/mean" in r and "reward/gold/mean" in r]
    if len(steps) < 10:
        failures.append(f"warm/rl_warm: {len(steps)} steps logged proxy and gold reward, expected 10")
    return manifests, failures


def run_fsdp_checks(work: Path, use_cpu: bool) -> tuple[dict, list[str]]:
    """Step 5: (its summary, what failed). Skipped, with the reason, below 2 devices."""
    import torch

    ranks = 2 if use_cpu else torch.cuda.device_count()
    if ranks < 2:
        reason = (f"skipped: {ranks} GPU here; sharding needs 2 or more processes with a GPU each (one process "
                  "trains whole, as sharding: none)")
        print(f"\nfsdp: {reason}", flush=True)
        return {"skipped": reason}, []
    failures: list[str] = []
    numbers = work / "bench_memory_fsdp.json"
    size = ["--hidden", "256", "--layers", "4", "--sync-bucket-mb", "8"] if use_cpu else \
        ["--precision", "bf16", "--sync-bucket-mb", "256"]
    cmd = [sys.executable, str(ROOT / "bench" / "bench_memory.py"), "--sharding", "fsdp", "--nproc", str(ranks),
           "--json", str(numbers), *size]
    print("\n" + " ".join(cmd), flush=True)
    done = subprocess.run(cmd)
    summary: dict = {"ranks": ranks}
    if done.returncode != 0 or not numbers.exists():
        return summary, [f"bench_memory --sharding fsdp exited with {done.returncode}"]
    rows = {(r["step"], r["sharding"]): r for r in json.loads(numbers.read_text())}
    for step in ("rl", "distill"):
        none, fsdp = rows[(step, "none")], rows[(step, "fsdp")]
        held = lambda r: r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]  # noqa: E731
        ratio = held(fsdp) / held(none)
        summary[f"{step}_state_ratio"] = round(ratio, 3)
        summary[f"{step}_sync_live_peak_bytes"] = fsdp["sync_live_peak_bytes"]
        if ratio > 1 / ranks + 0.1:
            failures.append(f"fsdp/{step}: a rank holds {ratio:.2f} of the unsharded parameter+gradient+AdamW bytes")
        if fsdp["sync_live_peak_bytes"] > fsdp["sync_largest_bucket_bytes"]:
            failures.append(f"fsdp/{step}: the sync held {fsdp['sync_live_peak_bytes']} bytes of whole tensors, more "
                            f"than its largest bucket ({fsdp['sync_largest_bucket_bytes']})")
    from posttrain.stages.rl.config import RLStageConfig

    if "sharding" not in RLStageConfig.model_fields:
        summary["stages"] = "skipped: the stages have no sharding option in this version"
        return summary, failures
    run_dir = work / "fsdp_run"
    overrides = SHORT + [f"output_dir={run_dir}", "stages.rl.sharding=fsdp", "stages.distill.sharding=fsdp"]
    if not use_cpu:
        overrides += ["stages.rl.precision=bf16", "stages.distill.precision=bf16"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "posttrain.cli", "run", str(ROOT / "recipes" / "quickstart_rloo.yaml")]
    for override in overrides:
        cmd += ["--set", override]
    print("\n" + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        return summary, failures + [f"quickstart under torchrun with sharding: fsdp exited with {done.returncode}"]
    for name in ("distill", "rl"):
        metrics = json.loads((run_dir / name / "manifest.json").read_text()).get("metrics", {})
        summary[f"{name}_metrics"] = {k: metrics.get(k) for k in ("sharding", "world_size", "param_bytes_per_rank",
                                                                  "device")}
        if metrics.get("sharding") != "fsdp" or metrics.get("world_size") != ranks:
            failures.append(f"fsdp/{name}: trained with sharding {metrics.get('sharding')} on "
                            f"{metrics.get('world_size')} ranks, expected fsdp on {ranks}")
    return summary, failures


def run_rl_bench(work: Path, bench_args: str, summary: dict) -> list[str]:
    """bench_rl against TRL's GRPOTrainer on this device; its numbers go into `summary`."""
    failures: list[str] = []
    from posttrain.rollout import vllm_available

    # TRL generates under bf16 autocast; "transformers-bf16" holds the engine's weights in bf16, the
    # like-for-like contender ("transformers" keeps fp32 weights, as a reference).
    engines = "transformers-bf16,transformers"
    if vllm_available():
        engines = "vllm-compiled-bf16," + engines
    bench_json = work / "bench_rl.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_rl.py"), "--engines", engines, "--json", str(bench_json),
           *bench_args.split()]
    print("\n" + " ".join(cmd), flush=True)
    done = subprocess.run(cmd)
    if done.returncode != 0 or not bench_json.exists():
        failures.append(f"bench_rl exited with {done.returncode}")
    else:
        results = json.loads(bench_json.read_text())
        trl = results[-1]["tokens_per_s"]
        summary["bench_rl"] = [{"name": r["name"], "tokens_per_s": round(r["tokens_per_s"], 1),
                                "vs_trl": round(r["tokens_per_s"] / trl, 2), "split": r.get("split")}
                               for r in results]
        best = max(r["tokens_per_s"] for r in results[:-1]) / trl
        summary["rl_vs_trl_best"] = round(best, 2)
        print(f"\nposttrain rl against TRL GRPOTrainer on the same device: {best:.2f}x (target 1.5x)")
    return failures


def run_reward_model_bench(work: Path, rm_bench_args: str, summary: dict) -> list[str]:
    """bench_reward_model against TRL's RewardTrainer on this device; its numbers go into `summary`."""
    failures: list[str] = []
    out = work / "bench_reward_model"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_reward_model.py"), "--out", str(out),
           *rm_bench_args.split()]
    print("\n" + " ".join(cmd), flush=True)
    done = subprocess.run(cmd)
    numbers = out / "bench_reward_model.json"
    if done.returncode != 0 or not numbers.exists():
        failures.append(f"bench_reward_model exited with {done.returncode}")
    else:
        results = json.loads(numbers.read_text())
        summary["bench_reward_model"] = results
        print(f"\nposttrain reward_model against TRL RewardTrainer on the same device: {results['ratio']:.2f}x "
              "(TRL's seconds per step over posttrain's)")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json", help="JSON summary")
    ap.add_argument("--work", default=None, help="working directory (default: a new temporary one)")
    ap.add_argument("--skip-bench", action="store_true", help="skip bench_rl against TRL")
    ap.add_argument("--skip-warm", action="store_true", help="skip the shortened recipes/warm.yaml")
    ap.add_argument("--skip-rm-bench", action="store_true", help="skip bench_reward_model against TRL")
    ap.add_argument("--rm-bench-args", default="--hidden 768 --layers 12 --sft-steps 0 --steps 60 --batch-size 32 "
                    "--precision bf16 --rounds 2",
                    help="arguments for bench/bench_reward_model.py (default: a Gemma3 of bench_rl's size, untrained)")
    ap.add_argument("--skip-fsdp", action="store_true", help="skip the sharded checks (step 5)")
    ap.add_argument("--cpu", action="store_true", help="run the steps on the CPU (tries the script; proves nothing)")
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides")
    ap.add_argument("--bench-args", default="--hidden 768 --layers 12 --steps 6 --prompts 8 --group 8 --length 128",
                    help="arguments for bench/bench_rl.py (default: a 58M-parameter Gemma3)")
    args = ap.parse_args()

    import tempfile

    import torch

    from posttrain.rollout import vllm_available

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; run it on a GPU machine (or --cpu to try the steps)")
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "vllm": vllm_available(),
                     "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    import transformers

    summary["transformers"] = transformers.__version__
    print(f"gpu_check: {summary}", flush=True)

    sampler = UtilisationSampler()
    sampling = sampler.start() if not args.cpu else False
    failures: list[str] = []
    t0 = time.time()
    try:
        manifests = run_recipe(work, args.set, args.cpu)
    except Exception as e:  # noqa: BLE001 - reported, then the manifests on disk tell the rest
        failures.append(f"recipe: {type(e).__name__}: {e}")
        manifests = {}
        for m in (work / "run").glob("*/manifest.json"):
            manifests[m.parent.name] = json.loads(m.read_text())
    summary["recipe_seconds"] = round(time.time() - t0, 1)
    if not args.skip_warm:
        t0 = time.time()
        warm, warm_failures = run_warm_recipe(work)
        failures += warm_failures
        manifests.update({f"warm/{name}": m for name, m in warm.items()})
        summary["warm_recipe_seconds"] = round(time.time() - t0, 1)
    sampler.stop()

    stages = {}
    print(f"\n{'stage':14s} {'kind':9s} {'status':9s} {'s':>7s} {'peak GiB':>9s} {'util %':>7s} {'busy':>6s} device")
    for name, m in manifests.items():
        util = sampler.between(m.get("started", 0), m.get("ended", m.get("started", 0))) if sampling else {}
        metrics = m.get("metrics", {})
        row = {"kind": m.get("kind"), "status": m.get("status"), "seconds": m.get("seconds"),
               "gpu_peak_memory_gib": m.get("gpu_peak_memory_gib"), **util,
               "device": metrics.get("device"), "world_size": metrics.get("world_size")}
        for key in ("accuracy_before", "accuracy_after", "eval/reward_before", "eval/reward_after", "tokens_per_s",
                    "math/accuracy", "global_batch_sequences"):
            if key in metrics:
                row[key] = metrics[key]
        stages[name] = row
        print(f"{name:14s} {str(row['kind']):9s} {str(row['status']):9s} {row['seconds'] or 0:7.1f} "
              f"{row['gpu_peak_memory_gib'] if row['gpu_peak_memory_gib'] is not None else '-':>9} "
              f"{row.get('util_mean') if row.get('util_mean') is not None else '-':>7} "
              f"{row.get('busy_fraction') if row.get('busy_fraction') is not None else '-':>6} {row['device']}")
    summary["stages"] = stages

    # The acceptance checks, from the manifests.
    for name in ("distill", "rl"):
        row = stages.get(name)
        if row is None or row["status"] != "complete":
            failures.append(f"{name}: did not complete ({row and row['status']})")
            continue
        expected = "cpu" if args.cpu else "cuda"
        if not str(row["device"]).startswith(expected):
            failures.append(f"{name}: trained on {row['device']}, expected {expected}")
        if sampling and not (row.get("util_max") or 0) > 0:
            failures.append(f"{name}: the GPU showed 0% utilisation throughout")
    for name, row in stages.items():
        if row["status"] != "complete":
            failures.append(f"{name}: {row['status']}")

    if not args.skip_bench:
        failures += run_rl_bench(work, args.bench_args, summary)

    if not args.skip_rm_bench:
        failures += run_reward_model_bench(work, args.rm_bench_args, summary)

    if not args.skip_fsdp:
        summary["fsdp"], fsdp_failures = run_fsdp_checks(work, args.cpu)
        failures += fsdp_failures

    summary["failures"] = failures
    Path(args.out).write_text(json.dumps(summary, indent=2, default=str))
    print("\n" + ("gpu_check: PASSED" if not failures else "gpu_check: FAILED\n  " + "\n  ".join(failures)))
    print(f"summary: {args.out}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
