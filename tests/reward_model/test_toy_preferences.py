"""Toy preference pairs: the true preference is known, label noise is controlled, splits are disjoint."""

from __future__ import annotations

import pytest

from posttrain.toy.tasks import generate, gold_preference_reward

GOLD_COLUMNS = ("answer", "tests", "instruction_id_list", "kwargs")


def _gold(rows, side):
    cols = {k: [r.get(k) for r in rows] for k in GOLD_COLUMNS}
    return gold_preference_reward([r["prompt"] for r in rows], [r[side] for r in rows], **cols)


def test_gold_prefers_chosen_on_clean_pairs_of_every_judged_task():
    rows = generate("mix", 300, seed=3, fmt="preference")
    assert {r["task"] for r in rows} == {"math", "code", "instructions", "chat"}
    chosen, rejected = _gold(rows, "chosen"), _gold(rows, "rejected")
    for row, c, r in zip(rows, chosen, rejected):
        if row["task"] == "code":
            assert c is None and r is None  # judged by running its tests (the code reward)
        else:
            assert c > r, row


def test_flip_rate_swaps_that_fraction_and_keeps_the_pairs():
    clean = generate("mix", 2000, seed=1, fmt="preference")
    noisy = generate("mix", 2000, seed=1, fmt="preference", flip_rate=0.25)
    flipped = [n["label_flipped"] for n in noisy]
    assert 0.22 < sum(flipped) / len(flipped) < 0.28
    for c, n in zip(clean, noisy):
        assert n["prompt"] == c["prompt"]
        expected = (c["rejected"], c["chosen"]) if n["label_flipped"] else (c["chosen"], c["rejected"])
        assert (n["chosen"], n["rejected"]) == expected


def test_held_out_pairs_come_from_other_prompts():
    train = {r["prompt"] for r in generate("mix", 1000, seed=0, fmt="preference")}
    held_out = {r["prompt"] for r in generate("mix", 300, seed=0, split="eval", fmt="preference")}
    assert not train & {p for p in held_out if "How many" in p or "Python" in p or "sentence" in p}


def test_ood_pairs_keep_the_true_preference_on_a_surface_no_other_split_uses():
    """The ood split: every task, the gold reward still prefers the chosen side of every clean
    pair, and no prompt, name, item, topic, sentence word or small-talk line is shared with train or eval."""
    import re

    ood = generate("mix", 1500, seed=2, split="ood", fmt="preference")
    assert {r["task"] for r in ood} == {"math", "code", "instructions", "chat"}
    for row, c, r in zip(ood, _gold(ood, "chosen"), _gold(ood, "rejected")):
        assert (c is None and r is None) if row["task"] == "code" else c > r, row
    seen = [r for split in ("train", "eval") for r in generate("mix", 1500, seed=2, split=split, fmt="preference")]
    assert not {r["prompt"] for r in seen} & {r["prompt"] for r in ood}
    words = lambda rows, task: {w for r in rows if r["task"] == task for w in re.findall(r"[A-Za-z]+", r["prompt"])}
    for task in ("math", "instructions"):
        assert not (words(seen, task) & words(ood, task)) - {
            "has", "and", "gets", "more", "How", "many", "does", "have", "now", "gives", "away",  # the math question
            "Write", "one", "sentence", "about", "the", "a", "Your", "entire", "response", "should", "be", "in",
            "lowercase", "capital", "letters", "Do", "not", "use", "any", "commas", "End", "your", "with",
            "exact", "phrase", "Is", "there", "anything", "else"}  # the instructions themselves stay
    assert not {r["chosen"] for r in seen if r["task"] == "chat"} & {r["chosen"] for r in ood if r["task"] == "chat"
                                                                        and not r["chosen"].startswith("I am")}
    with pytest.raises(ValueError, match="split: expected one of train, eval, ood"):
        generate("math", 2, split="test")


def test_flip_rate_is_checked():
    with pytest.raises(ValueError, match="flip_rate"):
        generate("math", 4, fmt="preference", flip_rate=1.5)
    with pytest.raises(ValueError, match="flip_rate: label noise applies to preference rows"):
        generate("math", 4, fmt="chat", flip_rate=0.1)


def test_wrong_math_answers_come_in_three_kinds():
    """Near misses, the wrong operation, a final answer contradicting the working: every kind is
    drawn, and in every kind the final answer is wrong (the gold reward ranks it lower)."""
    rows = generate("math", 300, seed=5, fmt="preference")
    kinds = set()
    for r in rows:
        working, final = r["rejected"].split(". The answer is ")
        lhs, result = working.split(" = ")
        stated, correct_op = int(final.rstrip(".")), r["chosen"].split(" ")[1]
        assert stated != int(r["answer"]), r
        if lhs.split(" ")[1] != correct_op:
            kinds.add("wrong_operation")
        elif int(result) != stated:
            kinds.add("inconsistent_answer")
        else:
            kinds.add("near_miss")
            assert abs(stated - int(r["answer"])) <= 2
    assert kinds == {"near_miss", "wrong_operation", "inconsistent_answer"}


def test_ignore_instruction_rate_spoils_that_fraction_of_instruction_demonstrations_only():
    """Imperfect demonstrations: the spoiled answers fail the instruction's judge, every other row
    (math, chat, the other instruction rows) is exactly the clean row."""
    clean = generate("mix", 1200, seed=4, fmt="chat")
    spoiled = generate("mix", 1200, seed=4, fmt="chat", ignore_instruction_rate=0.5)
    by_prompt = generate("mix", 1200, seed=4, fmt="prompt")
    changed = instruction_rows = 0
    for c, s, p in zip(clean, spoiled, by_prompt):
        assert s["messages"][0] == c["messages"][0]
        answer = s["messages"][1]["content"]
        if "instruction_id_list" not in p:
            assert answer == c["messages"][1]["content"]
            continue
        instruction_rows += 1
        followed = _gold([{**p, "chosen": answer}], "chosen")[0]
        if answer != c["messages"][1]["content"]:
            changed += 1
            assert followed == 0.0, answer
        else:
            assert followed == 1.0, answer
    assert instruction_rows > 200 and 0.4 < changed / instruction_rows < 0.6


def test_ignore_instruction_rate_is_checked():
    with pytest.raises(ValueError, match="ignore_instruction_rate"):
        generate("instructions", 4, ignore_instruction_rate=-0.1)
    with pytest.raises(ValueError, match="ignore_instruction_rate: applies to chat rows"):
        generate("instructions", 4, fmt="preference", ignore_instruction_rate=0.1)


def test_instructions_are_ignored_in_several_kinds_each_failing_the_judge():
    """Rejected instruction answers are the same sentence with the instruction ignored in one of
    several kinds (with one kind per instruction, every reward model learned that single cue), and
    every kind fails IFEval's judge. Demonstrations spoiled by `ignore_instruction_rate` draw from
    the same kinds."""
    rows = generate("instructions", 600, seed=2, fmt="preference")
    variants: dict[str, set[str]] = {}
    rejected_gold = _gold(rows, "rejected")
    for r, g in zip(rows, rejected_gold):
        assert g == 0.0 and r["rejected"] != r["chosen"], r
        iid, chosen, rejected = r["instruction_id_list"][0], r["chosen"], r["rejected"]
        if iid == "change_case:english_lowercase":
            kind = "all" if rejected.isupper() else "first" if rejected[1:] == chosen[1:] else "one word"
        elif iid == "change_case:english_capital":
            kind = "all" if rejected.islower() else "sentence" if rejected == chosen.capitalize() else "one word"
        elif iid == "punctuation:no_comma":
            kind = rejected.count(",")
        else:
            kind = "missing" if "Is there anything" not in rejected else (
                "first" if rejected.startswith("Is there") else "cut short")
        variants.setdefault(iid, set()).add(kind)
    assert {iid: len(kinds) for iid, kinds in variants.items()} == {
        "change_case:english_lowercase": 3, "change_case:english_capital": 3,
        "punctuation:no_comma": 3 - 1,  # one comma (in two places) or two
        "startend:end_checker": 3}
    spoiled = generate("instructions", 400, seed=2, fmt="chat", ignore_instruction_rate=1.0)
    assert len({s["messages"][1]["content"].isupper() for s in spoiled}) == 2
