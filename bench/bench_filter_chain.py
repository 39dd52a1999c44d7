"""Throughput of the full filter chain (every filter on, except an HF classifier).

Generates N synthetic chat conversations (1-3 exchanges, ~40-word prompts, ~150-word
answers) with planted PII, toxic turns, foreign self-identification, exact and near
duplicates, eval-set overlaps and invalid rows, then runs `run_filters` on them and
reports throughput against the project target of 2,000 conversations per second per core,
and peak memory (main process and largest worker process).

The headline is conversations per CPU-second: CPU time (user + system) of the main process
and its workers, from resource usage, so one CPU-second is one core busy for one second.
On a shared machine wall time also counts waiting for a core; CPU time does not, which
makes it the per-core rate that holds when the cores are free. `--repeat` runs the filter
chain several times on the same data and reports each run and the best.

    python bench/bench_filter_chain.py                     # 100,000 conversations, all cores
    python bench/bench_filter_chain.py --rows 20000 --num-proc 1 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_filters import FilterConfig, run_filters  # noqa: E402
from data_filters.config import DecontaminateConfig  # noqa: E402


def make_vocabulary(rng: random.Random, n: int = 5000) -> list[str]:
    syllables = "ka lo mi ne ru ta se vo pi da fe gu hi jo ba ce ly qu wa xe zo an er in on".split()
    words = {"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n * 2)}
    common = ("the a of to and in is it that for on with as this be are you can by "
              "from or at an not we if will use each").split()
    return common * 20 + sorted(words)[:n]


def sentence(rng, vocab, n):
    words = [rng.choice(vocab) for _ in range(n)]
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def paragraph(rng, vocab, n_words):
    out, left = [], n_words
    while left > 0:
        k = min(left, rng.randint(8, 20))
        out.append(sentence(rng, vocab, k))
        left -= k
    return " ".join(out)


PLANTS = [
    lambda rng: f" You can reach me at user{rng.randint(1, 99999)}@example.com.",
    lambda rng: f" My number is +1 415 555 {rng.randint(1000, 9999)}.",
    lambda rng: " My card is 4111 1111 1111 1111.",
    lambda rng: f" Connect to 198.51.{rng.randint(0, 255)}.{rng.randint(1, 254)} with key AKIAIOSFODNN7EXAMPLE.",
]


def generate(path: Path, n: int, eval_path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = make_vocabulary(rng)
    eval_texts = [paragraph(rng, vocab, 40) for _ in range(200)]
    with open(eval_path, "w") as f:
        for t in eval_texts:
            f.write(json.dumps({"question": t, "answer": "42"}) + "\n")
    recent: list[dict] = []
    with open(path, "w") as f:
        for i in range(n):
            r = rng.random()
            if r < 0.03 and recent:  # exact duplicate
                row = rng.choice(recent)
            elif r < 0.05 and recent:  # near duplicate: one word changed
                row = json.loads(json.dumps(rng.choice(recent)))
                words = row["messages"][-1]["content"].split()
                words[rng.randrange(len(words))] = "changed"
                row["messages"][-1]["content"] = " ".join(words)
            else:
                messages = []
                for _ in range(rng.choice((1, 1, 2, 3))):
                    user = paragraph(rng, vocab, rng.randint(15, 60))
                    model = paragraph(rng, vocab, rng.randint(60, 240))
                    if rng.random() < 0.05:
                        user += rng.choice(PLANTS)(rng)
                    if rng.random() < 0.01:
                        model += " Shut the fuck up."
                    if rng.random() < 0.01:
                        model = "I am ChatGPT, a model trained by OpenAI. " + model
                    if rng.random() < 0.005:
                        user += " " + rng.choice(eval_texts)
                    messages += [{"role": "user", "content": user},
                                 {"role": "assistant", "content": model}]
                row = {"messages": messages}
                recent = (recent + [row])[-200:]
            if rng.random() < 0.002:
                f.write('{"messages": [{"role": "bot", "content": 1}]}\n')
            else:
                f.write(json.dumps(row) + "\n")


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mib() -> tuple[float, float]:
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return self_kib / 1024, children_kib / 1024


class WorkerPeakMemory:
    """Largest peak RSS (VmHWM) of this process's children, sampled from /proc while they run.

    RUSAGE_CHILDREN's ru_maxrss is no measure of a spawned worker: Linux carries the peak of
    the forked parent's memory across exec, so it reports at least the main process's RSS at
    the time the worker started. VmHWM is the peak of the worker's own address space.
    """

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak_kib = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _children(self) -> list[str]:
        pids = []
        for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
            pids += children.read_text().split()
        return pids

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in self._children():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue  # exited meanwhile
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))

    def __enter__(self) -> "WorkerPeakMemory":
        if Path("/proc/self/status").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


TARGET_PER_CORE = 2000  # conversations per second per core


def run_once(data: Path, out: Path, config: FilterConfig, num_proc: int) -> dict:
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    with WorkerPeakMemory() as workers:
        report = run_filters(data, out, config, num_proc=num_proc)
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    return {
        "peak_rss_largest_worker_mib": round(workers.peak_kib / 1024) if num_proc > 1 else None,
        "rows": report.input_rows, "kept": report.kept_rows, "rejected": report.rejected_rows,
        "rejected_by": report.rejected_by, "redactions": report.redactions,
        "num_proc": num_proc, "wall_seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
        # One CPU-second is one core for one second: this is the per-core rate.
        "conversations_per_cpu_second_per_core": round(report.input_rows / cpu),
        "wall_conversations_per_second": round(report.input_rows / seconds),
        "wall_conversations_per_second_per_core": round(report.input_rows / seconds / num_proc),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=1, help="filter runs on the same data (best is reported)")
    ap.add_argument("--workdir", help="where to write data and outputs (default: a temp dir)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="filter_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    data, evals = work / "conversations.jsonl", work / "eval.jsonl"
    t0 = time.perf_counter()
    generate(data, args.rows, evals)
    print(f"generated {args.rows:,} conversations ({data.stat().st_size / 2**20:.0f} MiB) "
          f"in {time.perf_counter() - t0:.1f} s")

    config = FilterConfig(decontaminate=DecontaminateConfig(eval_sets=[f"eval={evals}"]))
    runs = []
    for i in range(args.repeat):
        run = run_once(data, work / "out", config, args.num_proc)
        runs.append(run)
        print(f"run {i + 1}/{args.repeat}: {run['conversations_per_cpu_second_per_core']:,} conversations "
              f"per CPU-second per core ({run['cpu_seconds']} CPU-s), "
              f"{run['wall_conversations_per_second']:,} conversations/s wall ({run['wall_seconds']} s)")
    best = max(runs, key=lambda r: r["conversations_per_cpu_second_per_core"])
    main_mib, _ = peak_rss_mib()
    worker_peaks = [r["peak_rss_largest_worker_mib"] for r in runs if r["peak_rss_largest_worker_mib"]]
    worker_mib = max(worker_peaks) if worker_peaks else 0.0
    result = best | {
        "runs": [{k: r[k] for k in ("cpu_seconds", "wall_seconds", "conversations_per_cpu_second_per_core",
                                    "wall_conversations_per_second")} for r in runs],
        "target_per_core": TARGET_PER_CORE,
        "ratio_to_target": round(best["conversations_per_cpu_second_per_core"] / TARGET_PER_CORE, 2),
        "peak_rss_main_mib": round(main_mib), "peak_rss_largest_worker_mib": round(worker_mib),
    }
    print(json.dumps(result, indent=2))
    rate = best["conversations_per_cpu_second_per_core"]
    print(f"\nthroughput (best of {len(runs)}): {rate:,} conversations per CPU-second per core "
          f"= {rate / TARGET_PER_CORE:.2f} x the target of {TARGET_PER_CORE:,} "
          f"({'met' if rate >= TARGET_PER_CORE else 'NOT met'})")
    print(f"wall clock: {best['wall_conversations_per_second']:,} conversations/s on {args.num_proc} "
          f"process(es) = {best['wall_conversations_per_second_per_core']:,} per core (includes waiting "
          f"for a shared core)")
    workers = f"largest worker {worker_mib:,.0f} MiB (VmHWM)" if worker_peaks else "no worker processes"
    print(f"peak memory: main process {main_mib:,.0f} MiB (max RSS, includes generating the data), {workers}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
