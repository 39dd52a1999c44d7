"""Reward-model training: the `reward_model` stage against TRL's RewardTrainer, side by side.

One Bradley-Terry reward model is trained twice from the same start, the same head and the
same token ids: once by posttrain's `reward_model` stage (members 1, no probe, so it is the
plain Bradley-Terry fine-tune) and once by TRL's RewardTrainer. Same steps, pairs per step,
learning rate (constant, no warm-up), AdamW, gradient clipping and precision. The pairs are
encoded once by the stage's own encoder and handed to TRL already tokenised (`chosen_ids`,
`rejected_ids`), so both see identical sequences and only the training loops differ.

Printed for each, the median over `--rounds` alternating runs:
- seconds per optimizer step in the steady state, from the step after `--skip-steps` to the
  last (start-up, loading and saving excluded), and pairs per second;
- the whole run's wall time (the stage's includes reading and tokenising the pairs, which TRL
  is handed done);
- the mean training loss over the last 10% of steps, and held-out pairwise accuracy, both
  models scored by the same scorer.
The ratio is TRL's seconds per step over posttrain's (> 1: posttrain is faster).

    python bench/bench_reward_model.py                      # toy world, about 4 minutes on 2 CPU cores
    python bench/bench_reward_model.py --model PATH --dataset prefs.jsonl --eval-dataset held.jsonl \\
        --precision bf16 --batch-size 32 --max-length 1024 --steps 200     # a real checkpoint, on a GPU

Without --model it builds the toy world: the toy tokenizer, a tiny Gemma3 (hidden 256, 2
layers, or --hidden and --layers) after a short SFT on toy chat, and toy preference pairs
(math, instructions, chat) with held-out pairs from the eval split.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


def _ctx(root: Path, name: str, seed: int):
    from posttrain.stages.base import StageContext

    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").unlink(missing_ok=True)
    return StageContext(name=name, kind=name, stage_dir=d, run_dir=root, seed=seed, recipe_name="bench_reward_model")


def toy_world(root: Path, seed: int, args) -> dict[str, str]:
    """Toy tokenizer, a tiny Gemma3 (`--hidden` x `--layers`) after `--sft-steps` of SFT on toy chat
    (none: the initialised model, for timing alone), and preference files (reused when present)."""
    from posttrain.data import write_jsonl
    from posttrain.modeling import load_tokenizer
    from posttrain.stages.sft import SFTStageConfig, run_sft
    from posttrain.toy import tasks
    from posttrain.toy.models import TinyModelSpec, build_tiny_model
    from posttrain.toy.tokenizer import build_toy_tokenizer

    size = f"h{args.hidden}_l{args.layers}"
    paths = {k: str(root / v) for k, v in {
        "tokenizer": "tokenizer", "init": f"init_{size}", "sft_data": "data/chat.jsonl",
        "model": f"sft_{size}_{args.sft_steps}/model" if args.sft_steps else f"init_{size}",
        "dataset": "data/prefs.jsonl", "eval_dataset": "data/prefs_eval.jsonl"}.items()}
    mix = {"math": 2, "instructions": 1, "chat": 1}
    if not Path(paths["tokenizer"]).exists():
        build_toy_tokenizer(paths["tokenizer"], seed=seed)
    write_jsonl(paths["dataset"], tasks.generate("mix", args.train_pairs, seed=seed, fmt="preference", mix=mix))
    write_jsonl(paths["eval_dataset"], tasks.generate("mix", args.eval_pairs, seed=seed + 1, split="eval",
                                                      fmt="preference", mix=mix))
    tok = load_tokenizer(paths["tokenizer"])
    if not Path(paths["init"]).exists():
        # Heads of 64, as bench_rl's models (4 heads at the default width of 256).
        build_tiny_model(TinyModelSpec(hidden_size=args.hidden, num_layers=args.layers,
                                       num_heads=max(4, args.hidden // 64), num_kv_heads=2, head_dim=64,
                                       intermediate_size=2 * args.hidden, seed=seed), tok, paths["init"])
    if not Path(paths["model"]).exists():
        write_jsonl(paths["sft_data"], tasks.generate("mix", 3000, seed=seed, fmt="chat", mix=mix))
        run_sft(SFTStageConfig(model=paths["init"], dataset=paths["sft_data"], max_steps=args.sft_steps,
                               batch_size=32, learning_rate=3e-3, warmup_ratio=0.05, logging_steps=50),
                _ctx(root, f"sft_{size}_{args.sft_steps}", seed))
    return paths


def steady_seconds_per_step(times: dict[int, float], skip: int) -> float:
    """Seconds per step between step `skip` and the last step timed."""
    steps = sorted(s for s in times if s >= skip)
    if len(steps) < 2:
        raise SystemExit(f"too few steps timed after --skip-steps {skip}: raise --steps")
    first, last = steps[0], steps[-1]
    return (times[last] - times[first]) / (last - first)


def run_posttrain(paths: dict, root: Path, args) -> dict:
    """The reward_model stage: one member, no probe: a plain Bradley-Terry fine-tune."""
    from posttrain.stages.reward_model import RewardModelStageConfig, run_reward_model

    config = RewardModelStageConfig(
        model=paths["model"], dataset=paths["dataset"], members=1, seeds=[args.seed], probe_steps=0,
        max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, max_length=args.max_length,
        precision=args.precision, gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=0,
        logging_steps=1)
    shutil.rmtree(root / "posttrain", ignore_errors=True)  # a finished member would be kept, not retrained
    ctx = _ctx(root, "posttrain", args.seed)
    started = time.perf_counter()
    result = run_reward_model(config, ctx)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (Path(ctx.stage_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    times = {r["step"]: r["time"] for r in rows}
    losses = [r["loss"] for r in rows]
    return {"model_dir": result.outputs["model"], "wall_seconds": wall, "times": times, "losses": losses}


def run_trl(paths: dict, root: Path, pairs, pad_id: int, args) -> dict:
    """TRL's RewardTrainer on the same token ids, from the same head (the stage's seeded initialisation)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    from posttrain.modeling import load_tokenizer
    from posttrain.stages.reward_model import load_reward_model

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times: dict[int, float] = {}
            self.losses: list[float] = []

        def on_step_end(self, _args, state, _control, **_kw):
            self.times[state.global_step] = time.time()

        def on_log(self, _args, _state, _control, logs=None, **_kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    started = time.perf_counter()
    torch.manual_seed(args.seed)  # what the stage does before it builds the head
    model = load_reward_model(paths["model"], pad_id)
    tokenizer = load_tokenizer(paths["model"])
    data = Dataset.from_dict({"chosen_ids": [c for c, _ in pairs], "rejected_ids": [r for _, r in pairs]})
    out = root / "trl"
    shutil.rmtree(out, ignore_errors=True)
    config = RewardConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, max_length=None, bf16=args.precision == "bf16",
        gradient_checkpointing=args.gradient_checkpointing, logging_steps=1, save_strategy="no", report_to=[],
        seed=args.seed, dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    timer = StepTimes()
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                            callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # one line per step otherwise (disable_tqdm)
    trainer.train()
    trainer.save_model(str(out / "model"))
    wall = time.perf_counter() - started
    return {"model_dir": str(out / "model"), "wall_seconds": wall, "times": timer.times, "losses": timer.losses}


def held_out_accuracy(model_dir: str, pairs, pad_id: int, precision: str, seed: int) -> float:
    from posttrain.losses.preference import pairwise_accuracy
    from posttrain.stages.reward_model import load_reward_model, score_pairs
    from posttrain.training import TrainingSession

    session = TrainingSession(precision, seed)
    model = load_reward_model(model_dir, pad_id).to(session.device)
    accuracy = pairwise_accuracy(*score_pairs(session, model, pairs, pad_id, None, 64))
    session.close()
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_reward_model"), help="work directory")
    parser.add_argument("--model", help="start checkpoint (a causal LM or a reward model); default: the toy world's")
    parser.add_argument("--dataset", help="preference rows to train on (needs --model)")
    parser.add_argument("--eval-dataset", help="held-out preference rows (needs --model)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each run")
    parser.add_argument("--skip-steps", type=int, default=10, help="steps left out of the steady-state timing")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    parser.add_argument("--lr", type=float, default=6e-5, help="constant learning rate")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per side")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=300,
                        help="toy world: SFT steps of the start model (0: the initialised model, for timing alone)")
    parser.add_argument("--hidden", type=int, default=256, help="toy world: the model's width")
    parser.add_argument("--layers", type=int, default=2, help="toy world: the model's depth")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each, alternating (posttrain, TRL, posttrain, ...); the median s/step is kept")
    parser.add_argument("--train-pairs", type=int, default=800, help="toy world: training pairs")
    parser.add_argument("--eval-pairs", type=int, default=1000, help="toy world: held-out pairs")
    args = parser.parse_args()
    if args.skip_steps >= args.steps - 1:
        parser.error(f"--skip-steps {args.skip_steps} leaves fewer than 2 timed steps of --steps {args.steps}")
    if (args.dataset or args.eval_dataset) and not args.model:
        parser.error("--dataset and --eval-dataset go with --model (without it the toy world supplies all three)")
    if args.model and not (args.dataset and args.eval_dataset):
        parser.error("--model needs --dataset and --eval-dataset")
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)

    from posttrain.modeling import load_tokenizer
    from posttrain.data import load_preference_pairs

    paths = ({"model": args.model, "dataset": args.dataset, "eval_dataset": args.eval_dataset} if args.model
             else toy_world(root, args.seed, args))
    tokenizer = load_tokenizer(paths["model"])
    pad_id = tokenizer.pad_token_id
    loaded = load_preference_pairs(paths["dataset"], tokenizer, args.max_length)
    pairs, truncated = loaded.pairs, loaded.truncated
    eval_pairs = load_preference_pairs(paths["eval_dataset"], tokenizer, args.max_length).pairs
    tokens = statistics.mean(len(c) + len(r) for c, r in pairs)
    print(f"{len(pairs)} training pairs ({truncated} cut to {args.max_length} tokens, {tokens:.0f} tokens a pair "
          f"on average), {len(eval_pairs)} held-out pairs; {args.steps} steps of {args.batch_size} pairs, "
          f"lr {args.lr}, {args.precision}")

    # Alternating rounds, so that a slow patch of the machine does not fall on one contender only.
    rounds: dict[str, list[dict]] = {"posttrain": [], "TRL RewardTrainer": []}
    for _ in range(args.rounds):
        rounds["posttrain"].append(run_posttrain(paths, root, args))
        rounds["TRL RewardTrainer"].append(run_trl(paths, root, pairs, pad_id, args))
    print(f"\n{'':<18} {'s/step':>8} {'pairs/s':>8} {'wall s':>7} {'loss (last 10%)':>16} {'held-out acc':>13}")
    summary = {}
    for name, runs in rounds.items():
        per_step = statistics.median(steady_seconds_per_step(r["times"], args.skip_steps) for r in runs)
        r = runs[-1]
        tail = r["losses"][-max(1, len(r["losses"]) // 10):]
        accuracy = held_out_accuracy(r["model_dir"], eval_pairs, pad_id, args.precision, args.seed)
        summary[name] = {"seconds_per_step": per_step, "pairs_per_second": args.batch_size / per_step,
                         "seconds_per_step_each_round": [steady_seconds_per_step(x["times"], args.skip_steps)
                                                         for x in runs],
                         "wall_seconds": statistics.median(x["wall_seconds"] for x in runs), "final_loss": statistics.mean(tail),
                         "held_out_accuracy": accuracy}
        s = summary[name]
        print(f"{name:<18} {per_step:8.4f} {s['pairs_per_second']:8.1f} {s['wall_seconds']:7.1f} "
              f"{s['final_loss']:16.4f} {accuracy:13.3f}")
    ratio = summary["TRL RewardTrainer"]["seconds_per_step"] / summary["posttrain"]["seconds_per_step"]
    print(f"\nspeed ratio (TRL s/step over posttrain s/step): {ratio:.2f}x")
    (root / "bench_reward_model.json").write_text(json.dumps({"runs": summary, "ratio": ratio}, indent=2))
    print(f"numbers: {root / 'bench_reward_model.json'}")


if __name__ == "__main__":
    main()
