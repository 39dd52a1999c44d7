"""Do a reward_model stage's members average well? Accuracy along the straight line between them.

WARM rests on linear mode connectivity: members fine-tuned from one start stay in one basin, so
a point between them is as good as its ends and, when they are close enough to behave linearly,
as good as their prediction ensemble. For every two members i, j of a `reward_model` stage this
prints the held-out pairwise accuracy of (1 - a) * theta_i + a * theta_j at a = 0, 0.25, 0.5,
0.75, 1 (posttrain.weights.linear_average, the average the stage itself uses), the barrier (the
mean of the ends minus the midpoint: above 0, the midpoint loses what both ends have), the
midpoint against the two-member prediction ensemble, and their distance relative to the
weights' norm.

    python bench/warm_connectivity.py STAGE_DIR HELD_OUT.jsonl [--json out.json]

STAGE_DIR is a reward_model stage directory (runs/NAME/rm, or a repetition of bench_warm.py such
as runs/warm_bench/rm_flip25_0); HELD_OUT.jsonl holds preference rows never trained on (for the
toy world: runs/warm_bench/held_out_test.jsonl).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage_dir", type=Path)
    parser.add_argument("held_out", type=Path)
    parser.add_argument("--max-length", type=int, default=512, help="pairs longer than this keep their end")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    import torch

    from posttrain.modeling import load_tokenizer
    from posttrain.data import load_preference_pairs
    from posttrain.losses.preference import ensemble_scores, pairwise_accuracy
    from posttrain.stages.reward_model import load_reward_model, score_pairs
    from posttrain.training import TrainingSession
    from posttrain.weights import linear_average
    from rewards.reward_model import MEMBERS_FILE

    listing_path = args.stage_dir / "members" / MEMBERS_FILE
    if not listing_path.is_file():
        raise SystemExit(f"{listing_path}: not found; expected a finished reward_model stage directory")
    paths = json.loads(listing_path.read_text())["members"]
    if len(paths) < 2:
        raise SystemExit(f"{listing_path}: {len(paths)} member; a line between members needs at least 2")
    tokenizer = load_tokenizer(paths[0])
    pairs = load_preference_pairs(str(args.held_out), tokenizer, args.max_length).pairs
    session = TrainingSession("fp32", 0)
    model = load_reward_model(paths[0], tokenizer.pad_token_id)
    session.prepare(model, 1e-5)  # on the session's device; no step is taken
    weights = [{k: v.detach().clone() for k, v in load_reward_model(p, tokenizer.pad_token_id).state_dict().items()}
               for p in paths]

    def scores_at(state: dict) -> tuple[list[float], list[float]]:
        model.load_state_dict(state)
        return score_pairs(session, model, pairs, tokenizer.pad_token_id, 16384, 64)

    ends = [scores_at(w) for w in weights]
    print(f"{len(pairs)} held-out pairs; accuracy at a = {', '.join(map(str, ALPHAS))}")
    rows = []
    for i, j in itertools.combinations(range(len(weights)), 2):
        line = []
        for a in ALPHAS:
            scored = ends[i] if a == 0 else ends[j] if a == 1 else scores_at(
                linear_average([weights[i], weights[j]], [1 - a, a]))
            line.append(pairwise_accuracy(*scored))
        floating = [k for k, v in weights[i].items() if v.is_floating_point()]
        distance = torch.sqrt(sum(((weights[i][k] - weights[j][k]) ** 2).sum() for k in floating))
        norm = torch.sqrt(sum((weights[i][k] ** 2).sum() for k in floating))
        ensemble = pairwise_accuracy(*ensemble_scores([ends[i], ends[j]]))
        row = {"members": [i + 1, j + 1], "alphas": list(ALPHAS), "accuracy": line,
               "barrier": (line[0] + line[-1]) / 2 - line[len(ALPHAS) // 2], "ensemble": ensemble,
               "relative_distance": float(distance / norm)}
        rows.append(row)
        print(f"members {i + 1}-{j + 1}: {' '.join(f'{x:.3f}' for x in line)}  barrier {row['barrier']:+.3f}  "
              f"midpoint - ensemble {line[len(ALPHAS) // 2] - ensemble:+.3f}  distance {row['relative_distance']:.3f}"
              " of the weights' norm")
    session.close()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
