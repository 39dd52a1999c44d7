"""Synthetic toy tasks, deterministic by seed: the data of the embedded default world.

Every task has a train and an eval split of disjoint prompts (decided by a hash of the whole
prompt, not by the seed): no eval prompt ever appears in training. The underlying facts are
shared on purpose (the same sums, the same function families, asked with other names, items
or phrasing), because tiny models trained for minutes memorise facts but do not discover
arithmetic; held-out accuracy then measures whether training, distillation and RL taught the
model to answer, not whether a 2-layer model can generalise addition. A third split, `ood`, is
out of distribution: the same tasks, facts and true preferences, asked about names, items,
topics and words and in small talk that neither of the other splits uses (see `_OOD`).
Rows follow the project's data contract: chat rows carry `messages`, prompt rows carry
`prompt` plus the columns rewards need (`answer`, `tests`, `instruction_id_list`/`kwargs`),
preference rows carry `prompt`, `chosen`, `rejected`.

The toy world knows the true preference between two answers (`gold_preference_reward`): a
correct math answer over a wrong one, a polite reply over a toxic one, an instruction followed
over one ignored, working code over broken code. Preference rows can carry label noise
(`flip_rate`), as human preference data does, while the gold reward stays exact.
"""

from __future__ import annotations

import functools
import hashlib
import random
from typing import Callable, Iterator

# Bumped whenever a seed's rows change (a cached toy dataset made by another version is made again).
# 2: instructions are ignored in several kinds, not one per instruction.
GENERATOR_VERSION = 2

IDENTITY_NAME = "Posttrain Tiny"
IDENTITY_DEVELOPER = "the posttrain project"

_NAMES = ["Tom", "Ana", "Lee", "Mia", "Sam", "Ivy", "Max", "Zoe", "Ben", "Eva"]
_ITEMS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "cups"]
_TOPICS = ["the sea", "a cat", "the moon", "rain", "a garden", "music", "a train", "winter"]
_WORDS = ["bright", "quiet", "small", "warm", "green", "slow", "happy", "soft", "old", "new"]


# The out-of-distribution split's world: the same rules (arithmetic, the four instructions, polite
# over toxic, the function families), other surface. Math asks about other names and items with
# the same numbers: a tiny model memorises sums and does not discover arithmetic (see the
# module's docstring), so operands past MATH_MAX would put every model at chance and measure
# nothing. The instruction sentences have another shape (still with " because" and " and ", which
# two ways of ignoring "no commas" need) about other topics and words; code problems are phrased
# in other words; the small talk and the toxic replies are new (each toxic reply still has one of
# TOXIC_WORDS, which the gold reward looks for). Used to measure how reward models trained on the
# train split generalise (WARM's "out of distribution").
_OOD_WORDS = ["strange", "loud", "golden", "calm", "wild", "gentle", "tiny", "ancient", "bitter", "clever"]
_OOD = {
    "names": ["Raj", "Kim", "Ola", "Nia", "Ugo", "Pia", "Dev", "Liv", "Oz", "Ida"],
    "items": ["marbles", "kites", "bottles", "tickets", "leaves", "bricks", "ribbons", "spoons"],
    "topics": ["the desert", "a volcano", "my uncle", "the library", "a lighthouse", "autumn", "a dragon", "coffee"],
    "code_phrasings": ["Create a Python function {name}(x) which {desc}.", "Code {name}(x) in Python: it {desc}."],
    "sentence": lambda rng, topic: (f"My friend says {topic} feels {rng.choice(_OOD_WORDS)} and "
                                    f"{rng.choice(_OOD_WORDS)} because of its {rng.choice(_OOD_WORDS)} mood."),
    "chat": [
        ("Hi there.", "Hi! It is nice to meet you. What can I do for you?"),
        ("Good evening.", "Good evening! How may I help you tonight?"),
        ("Can you help me?", "Of course, I would be glad to help. What do you need?"),
        ("See you later.", "Goodbye, and have a lovely day."),
    ],
    "who": ["Tell me about yourself.", "Which company built you?", "What should I call you?"],
    "toxic": [
        "Leave me alone, you dumb clown.",
        "I hate talking to people like you.",
        "Ask someone else, you stupid pest.",
        "Only a loser would ask me that.",
    ],
}


def _surface(split: str) -> dict:
    """The names, items, topics, sentences, phrasings and small talk a split's problems use."""
    return _OOD if split == "ood" else _IN_DISTRIBUTION


def _in_split(key: str, split: str) -> bool:
    """Deterministic 80/20 train/eval partition of a problem space (the ood split's space is its own)."""
    if split == "ood":
        return True
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 5
    return (h != 0) if split == "train" else (h == 0)


SPLITS = ("train", "eval", "ood")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")


# --- math: word problems with ground-truth answers -------------------------------------------

MATH_MAX = 15


def math_problem(rng: random.Random, split: str) -> dict:
    surface = _surface(split)
    while True:
        a, b = rng.randint(1, MATH_MAX), rng.randint(1, MATH_MAX)
        op = rng.choice(["+", "-"])
        if op == "-" and b > a:
            a, b = b, a
        name, item = rng.choice(surface["names"]), rng.choice(surface["items"])
        if _in_split(f"math:{name}:{item}:{a}{op}{b}", split):
            break
    if op == "+":
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        ans = a + b
    else:
        q = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have now?"
        ans = a - b
    return {"prompt": q, "answer": str(ans), "solution": f"{a} {op} {b} = {ans}. The answer is {ans}."}


# --- code: small Python functions with unit tests ---------------------------------------------

_CODE_FAMILIES = [
    ("add_{k}", "returns x plus {k}", "x + {k}", lambda x, k: x + k),
    ("times_{k}", "returns x multiplied by {k}", "x * {k}", lambda x, k: x * k),
    ("minus_{k}", "returns x minus {k}", "x - {k}", lambda x, k: x - k),
]


_CODE_PHRASINGS = [
    "Write a Python function {name}(x) that {desc}.",
    "Define {name}(x) in Python so that it {desc}.",
    "Implement the Python function {name}(x); it {desc}.",
    "Please write {name}(x), a Python function that {desc}.",
]


# The hard level: two numbers per function and a name that carries neither, so an answer must copy
# both from the question (a held-out question is a pair of numbers never asked together with that
# family and phrasing); the basic level's names spell their number (add_3), which a small model
# memorises and gets right on every held-out question after a short finetune.
_HARD_CODE_FAMILIES = [
    ("scale_then_add", "returns x multiplied by {k} plus {j}", "x * {k} + {j}", lambda x, k, j: x * k + j),
    ("scale_then_subtract", "returns x multiplied by {k} minus {j}", "x * {k} - {j}", lambda x, k, j: x * k - j),
    ("add_twice", "returns x plus {k} plus {j}", "x + {k} + {j}", lambda x, k, j: x + k + j),
]


def hard_code_problem(rng: random.Random, split: str) -> dict:
    phrasings = _surface(split)["code_phrasings"]
    while True:
        fam, k, j = rng.randrange(len(_HARD_CODE_FAMILIES)), rng.randint(2, 9), rng.randint(1, 9)
        phrasing = rng.randrange(len(phrasings))
        if _in_split(f"code-hard:{fam}:{k}:{j}:{phrasing}", split):
            break
    name, desc_t, expr_t, fn = _HARD_CODE_FAMILIES[fam]
    expr = expr_t.format(k=k, j=j)
    prompt = phrasings[phrasing].format(name=name, desc=desc_t.format(k=k, j=j))
    tests = "\n".join(f"assert {name}({x}) == {fn(x, k, j)}" for x in (1, 2, 5, 10))
    return {"prompt": prompt, "tests": tests, "solution": f"```python\ndef {name}(x):\n    return {expr}\n```"}


def code_problem(rng: random.Random, split: str) -> dict:
    phrasings = _surface(split)["code_phrasings"]
    while True:
        fam = rng.randrange(len(_CODE_FAMILIES))
        k = rng.randint(1, 9)
        phrasing = rng.randrange(len(phrasings))
        if _in_split(f"code:{fam}:{k}:{phrasing}", split):
            break
    name_t, desc_t, expr_t, fn = _CODE_FAMILIES[fam]
    name, expr = name_t.format(k=k), expr_t.format(k=k)
    prompt = phrasings[phrasing].format(name=name, desc=desc_t.format(k=k))
    xs = [1, 2, 5, 10]
    tests = "\n".join(f"assert {name}({x}) == {fn(x, k)}" for x in xs)
    solution = f"```python\ndef {name}(x):\n    return {expr}\n```"
    return {"prompt": prompt, "tests": tests, "solution": solution}


# --- instructions: IFEval-style verifiable formatting ------------------------------------------

def _sentence(rng: random.Random, topic: str) -> str:
    return f"I like {topic} because it is {rng.choice(_WORDS)} and {rng.choice(_WORDS)}."


_END_PHRASE = "Is there anything else?"
_INSTRUCTIONS = [
    ("Your entire response should be in lowercase letters.", "change_case:english_lowercase", {},
     lambda text: text.lower()),
    ("Your entire response should be in capital letters.", "change_case:english_capital", {},
     lambda text: text.upper()),
    ("Do not use any commas.", "punctuation:no_comma", {}, lambda text: text.replace(",", "")),
    (f"End your response with the exact phrase '{_END_PHRASE}'.", "startend:end_checker",
     {"end_phrase": _END_PHRASE}, lambda text: f"{text} {_END_PHRASE}"),
]


def instruction_problem(rng: random.Random, split: str) -> dict:
    surface = _surface(split)
    while True:
        topic, idx = rng.choice(surface["topics"]), rng.randrange(len(_INSTRUCTIONS))
        if _in_split(f"ifeval:{topic}:{idx}", split):
            break
    text, iid, kwargs, apply = _INSTRUCTIONS[idx]
    prompt = f"Write one sentence about {topic}. {text}"
    # The judge is IFEval's checker, whose case checks also need langdetect to call the text
    # English; it does not for a few of these sentences (e.g. "i like winter because it is
    # green and green."), so those are drawn again: the preferred answer must pass the judge.
    # Redraws come from a stream of their own, so every other row stays what it was.
    solution = apply(surface["sentence"](rng, topic))
    redraw = random.Random(f"redraw:{solution}")
    for _ in range(100):
        if _follows(solution, idx):
            break
        solution = apply(surface["sentence"](redraw, topic))
    else:
        raise RuntimeError(f"toy instructions: no sentence about {topic!r} passes {iid}")
    return {"prompt": prompt, "instruction_id_list": [iid], "kwargs": [dict(kwargs)], "solution": solution}


@functools.lru_cache(maxsize=None)
def _follows(text: str, instruction: int) -> bool:
    """Whether `text` follows _INSTRUCTIONS[instruction] by the judge's verdict (cached: few texts recur)."""
    from rewards.instructions import check

    _, iid, kwargs, _ = _INSTRUCTIONS[instruction]
    return all(check(text, [iid], [dict(kwargs)]))


def hard_instruction_problem(rng: random.Random, split: str) -> dict:
    """Two instructions at once: one of the four formats and a word to use, given in the question
    (IFEval's keywords:existence). An answer must copy the word, in the format asked; a held-out
    question pairs a topic, word and format never asked together."""
    from rewards.instructions import check

    surface = _surface(split)
    words = _OOD_WORDS if split == "ood" else _WORDS
    for _ in range(1000):
        topic, word, idx = rng.choice(surface["topics"]), rng.choice(words), rng.randrange(len(_INSTRUCTIONS))
        if not _in_split(f"ifeval-hard:{topic}:{word}:{idx}", split):
            continue
        text, iid, kwargs, apply = _INSTRUCTIONS[idx]
        # The format's id first: a preference row ignores the first instruction (_violate_instruction).
        ids, all_kwargs = [iid, "keywords:existence"], [dict(kwargs), {"keywords": [word]}]
        # As instruction_problem: the preferred answer must pass the judge, whose case checks also
        # need langdetect to call the text English; a question none of whose sentences passes
        # ("i like winter because it is green and ...") is drawn again.
        for second in random.Random(f"hard:{topic}:{word}:{idx}").sample(words, len(words)):
            solution = apply(f"I like {topic} because it is {word} and {second}.")
            if all(check(solution, ids, all_kwargs)):
                prompt = f"Write one sentence about {topic} with the word '{word}'. {text}"
                return {"prompt": prompt, "instruction_id_list": ids, "kwargs": all_kwargs, "solution": solution}
    raise RuntimeError("toy instructions (hard): no question of this split passes the judge")


# --- chit-chat, including identity questions ---------------------------------------------------

_CHAT = [
    ("Hello!", "Hello! How can I help you today?"),
    ("How are you?", "I am doing well, thank you. How can I help?"),
    ("Thank you!", "You are welcome."),
    ("Good morning.", "Good morning! What would you like to do today?"),
]
_WHO = ["Who are you?", "What is your name?", "Who made you?", "Are you ChatGPT?"]


def chat_problem(rng: random.Random, split: str) -> dict:
    surface = _surface(split)
    if rng.random() < 0.4:
        q = rng.choice(surface["who"])
        a = f"I am {IDENTITY_NAME}, a small assistant made by {IDENTITY_DEVELOPER}."
    else:
        q, a = rng.choice(surface["chat"])
    return {"prompt": q, "solution": a}


_TASKS: dict[str, Callable[[random.Random, str], dict]] = {
    "math": math_problem, "code": code_problem, "instructions": instruction_problem, "chat": chat_problem,
}
TASKS = tuple(_TASKS)
FORMATS = ("chat", "prompt", "preference")
# Difficulty levels: basic (every task as above) and hard (code and instructions replaced by their
# hard variants; math and chat unchanged), so a quick run's held-out code and instructions leave
# room above them. Basic rows never change with this option.
_HARD_TASKS = {"code": hard_code_problem, "instructions": hard_instruction_problem}
LEVELS = ("basic", "hard")


def _problem_maker(name: str, hard: bool) -> Callable[[random.Random, str], dict]:
    return _HARD_TASKS.get(name, _TASKS[name]) if hard else _TASKS[name]


def _as_chat(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["solution"]}]}


def _as_prompt(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "solution"}


_TOXIC_REPLIES = [
    "Shut up, you stupid idiot. Nobody cares.",
    "What a dumb question. I hate answering idiots like you.",
    "Go away, you worthless fool.",
    "That is the stupidest thing I ever heard, loser.",
]
# Words that mark a reply as toxic in the toy world (every toxic reply above has one).
TOXIC_WORDS = ("stupid", "idiot", "hate", "worthless", "dumb", "fool", "loser", "shut up")

# What the train and eval splits share (their prompts differ by a hash, see _in_split); _OOD has the same keys.
_IN_DISTRIBUTION = {"names": _NAMES, "items": _ITEMS, "topics": _TOPICS, "code_phrasings": _CODE_PHRASINGS,
                    "sentence": _sentence, "chat": _CHAT, "who": _WHO, "toxic": _TOXIC_REPLIES}


def _recase_one_word(solution: str, rng: random.Random, recase: Callable[[str], str]) -> str:
    words = solution.split(" ")
    i = rng.randrange(1, len(words) - 1)  # not the first word nor the last (it carries the full stop)
    words[i] = recase(words[i])
    return " ".join(words)


# Ways to ignore each toy instruction: the same sentence, so only the instruction tells the two
# sides of a pair apart, in several kinds from blatant (the whole sentence in the other case) to
# subtle (one word). With a single kind per instruction (say, only the first letter capitalised
# for "use lowercase letters"), every reward model learned that one cue and nothing else of the
# instruction, and RL hacked all of them alike ("i LIKE THE SEA ..." scored as lowercase).
_IGNORED_INSTRUCTION: dict[str, tuple[Callable[[str, random.Random], str], ...]] = {
    "change_case:english_lowercase": (
        lambda s, rng: s[:1].upper() + s[1:],
        lambda s, rng: _recase_one_word(s, rng, str.upper),
        lambda s, rng: s.upper(),
    ),
    "change_case:english_capital": (
        lambda s, rng: s.capitalize(),
        lambda s, rng: _recase_one_word(s, rng, str.lower),
        lambda s, rng: s.lower(),
    ),
    "punctuation:no_comma": (
        lambda s, rng: s.replace(" because", ", because", 1),
        lambda s, rng: s.replace(" and ", ", and ", 1),
        lambda s, rng: s.replace(" because", ", because", 1).replace(" and ", ", and ", 1),
    ),
    "startend:end_checker": (
        lambda s, rng: s.replace(f" {_END_PHRASE}", ""),
        lambda s, rng: s.replace(f" {_END_PHRASE}", " " + _END_PHRASE.rsplit(" ", 1)[0]),
        lambda s, rng: f"{_END_PHRASE} " + s.replace(f" {_END_PHRASE}", ""),
    ),
}


def _violate_instruction(iid: str, solution: str, rng: random.Random) -> str:
    """The same sentence with the instruction ignored, in one of its kinds drawn from `rng`."""
    if iid not in _IGNORED_INSTRUCTION:
        raise ValueError(f"no way to ignore toy instruction {iid!r}")
    return rng.choice(_IGNORED_INSTRUCTION[iid])(solution, rng)


# Wrong math answers come in three kinds, from hard to easy for a small reward model to tell
# from the right one: a near miss (the sum off by 1 or 2: needs the arithmetic), the wrong
# operation (the question says "gives away", the working adds), and a final answer that
# contradicts the working. With near misses only, a small reward model sits at chance on math
# pairs whatever it is trained on, and no training choice (label noise, averaging) shows.
MATH_MISTAKES = ("near_miss", "wrong_operation", "inconsistent_answer")


def _wrong_math_solution(row: dict, rng: random.Random) -> str:
    working = row["solution"].split(" = ", 1)[0]  # "a + b"
    a, op, b = working.split(" ")
    answer = int(row["answer"])
    kind = rng.choice(MATH_MISTAKES)
    if kind == "wrong_operation":
        other = "-" if op == "+" else "+"
        wrong = int(a) - int(b) if other == "-" else int(a) + int(b)  # != answer: b >= 1
        return f"{a} {other} {b} = {wrong}. The answer is {wrong}."
    wrong = answer + rng.choice([-2, -1, 1, 2])
    if kind == "inconsistent_answer":
        return f"{working} = {answer}. The answer is {wrong}."
    return f"{working} = {wrong}. The answer is {wrong}."


def _wrong_solution(row: dict, rng: random.Random, split: str) -> str:
    """The answer the toy world ranks below `row['solution']`."""
    if "answer" in row:
        return _wrong_math_solution(row, rng)
    if "tests" in row:
        return row["solution"].replace("return x", "return 0 * x")
    if "instruction_id_list" in row:
        return _violate_instruction(row["instruction_id_list"][0], row["solution"], rng)
    return rng.choice(_surface(split)["toxic"])


def _as_preference(row: dict, task: str, rng: random.Random, flip: bool, split: str) -> dict:
    chosen, rejected = row["solution"], _wrong_solution(row, rng, split)
    if flip:  # label noise: the annotator preferred the worse answer
        chosen, rejected = rejected, chosen
    # The ground-truth columns travel along, so the gold reward can judge either side.
    truth = {k: row[k] for k in ("answer", "tests", "instruction_id_list", "kwargs") if k in row}
    return {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "task": task, "label_flipped": flip,
            **truth}


def generate(task: str, n: int, seed: int = 0, split: str = "train", fmt: str = "chat",
             mix: dict[str, float] | None = None, flip_rate: float = 0.0,
             ignore_instruction_rate: float = 0.0, level: str = "basic", hard_fraction: float = 0.0) -> list[dict]:
    """`n` rows of a toy task (`task` in TASKS, or "mix" with `mix` weights) in format `fmt`, at
    difficulty `level` (LEVELS: hard replaces code and instructions by their hard variants). At the
    basic level, `hard_fraction` of the code and instruction rows are drawn hard all the same (a
    set that teaches both levels; the draws come from a stream of their own, so 0 is the basic set).

    Preference rows (`fmt="preference"`) carry `prompt`, `chosen`, `rejected`, the `task` and
    `label_flipped`: a fraction `flip_rate` of them has chosen and rejected swapped. The flips
    come from a random stream of their own, so the same seed gives the same pairs at any rate.

    Chat rows: a fraction `ignore_instruction_rate` of the instruction rows answers with the
    instruction ignored (imperfect demonstrations: a model finetuned on them follows
    instructions only sometimes, so RL has instruction following to gain). Also a stream of its
    own: every other row stays what it was.
    """
    _check_split(split)
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {', '.join(LEVELS)}, got {level!r}")
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction: expected a fraction in [0, 1], got {hard_fraction!r}")
    if hard_fraction and level == "hard":
        raise ValueError("hard_fraction: applies at level basic (at level hard every row is hard)")
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if task != "mix" and task not in _TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)} or 'mix', got {task!r}")
    if not 0.0 <= flip_rate <= 1.0:
        raise ValueError(f"flip_rate: expected a fraction in [0, 1], got {flip_rate!r}")
    if flip_rate and fmt != "preference":
        raise ValueError(f"flip_rate: label noise applies to preference rows only, but format is {fmt!r}")
    if not 0.0 <= ignore_instruction_rate <= 1.0:
        raise ValueError(f"ignore_instruction_rate: expected a fraction in [0, 1], got {ignore_instruction_rate!r}")
    if ignore_instruction_rate and fmt != "chat":
        raise ValueError(f"ignore_instruction_rate: applies to chat rows (demonstrations) only, but format is {fmt!r}")
    rng = random.Random(f"{task}:{seed}:{split}")
    flips = random.Random(f"flip:{task}:{seed}:{split}")
    ignores = random.Random(f"ignore:{task}:{seed}:{split}")
    hards = random.Random(f"hard:{task}:{seed}:{split}")
    weights = mix or {t: 1.0 for t in _TASKS}
    for name in weights:
        if name not in _TASKS:
            raise ValueError(f"mix: unknown task {name!r}; expected some of {', '.join(TASKS)}")
    rows = []
    for _ in range(n):
        name = task if task != "mix" else rng.choices(list(weights), weights=list(weights.values()))[0]
        hard = level == "hard" or (name in _HARD_TASKS and hard_fraction > 0 and hards.random() < hard_fraction)
        row = _problem_maker(name, hard)(rng, split)
        if fmt == "chat":
            if "instruction_id_list" in row and ignores.random() < ignore_instruction_rate:
                row = {**row, "solution": _violate_instruction(row["instruction_id_list"][0], row["solution"], ignores)}
            rows.append(_as_chat(row))
        elif fmt == "prompt":
            rows.append(_as_prompt(row))
        else:
            rows.append(_as_preference(row, name, rng, flips.random() < flip_rate, split))
    return rows


# --- the true preference: a gold reward for RL against a learned reward model ------------------

def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))


def _last_integer(text: str) -> str | None:
    import re

    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


def gold_preference_reward(prompts, completions, answer=None, instruction_id_list=None, kwargs=None,
                           tests=None, **_) -> list[float | None]:
    """The toy world's true preference as a reward (TRL's signature), per completion:

    - math rows (`answer`): 1 when the last number of the completion is the answer, else 0;
    - instruction rows (`instruction_id_list`, `kwargs`): the fraction of instructions followed;
    - code rows (`tests`): None (judged by running the tests: the `code` reward);
    - other prompts (chit-chat): 0 for a toxic reply, else 1.

    Logged next to a learned reward model's score (with weight 0 it is not optimised), it shows
    reward hacking: the proxy rising while this falls.
    """
    from rewards.instructions import check

    n = len(completions)
    answer = answer if answer is not None else [None] * n
    instruction_id_list = instruction_id_list if instruction_id_list is not None else [None] * n
    kwargs = kwargs if kwargs is not None else [None] * n
    tests = tests if tests is not None else [None] * n
    out: list[float | None] = []
    for c, ans, ids, kws, t in zip(completions, answer, instruction_id_list, kwargs, tests):
        text = _text(c)
        if ans is not None:
            out.append(float(_last_integer(text) == str(ans).strip()))
        elif ids:
            followed = check(text, ids, kws if kws is not None else [{}] * len(ids))
            out.append(sum(followed) / len(followed))
        elif t is not None:
            out.append(None)
        else:
            lowered = text.lower()
            out.append(0.0 if any(w in lowered for w in TOXIC_WORDS) else 1.0)
    return out


# --- dirty rows for the filter stage ----------------------------------------------------------

_DIRTY_KINDS = ("pii", "toxic", "misidentification", "exact_duplicate", "near_duplicate")


def _long_text(rng: random.Random) -> str:
    return " ".join(_sentence(rng, rng.choice(_TOPICS)) for _ in range(8))


def generate_dirty(n_clean: int, seed: int = 0, dirty_per_kind: int = 5,
                   level: str = "basic", hard_fraction: float = 0.0) -> tuple[list[dict], dict[str, int]]:
    """A chat mix with planted dirty rows; returns (rows, planted counts by kind).

    Clean rows are distinct conversations from every task. Planted: personal information
    (e-mail, phone), toxic model turns, wrong self-identification, exact duplicates and near
    duplicates (long texts that differ in their last word). `level`, `hard_fraction`: the clean
    rows' difficulty (see generate). Every row has an `id` saying what it is
    (`clean-3`, `pii-0`, `near_duplicate-2`, ...), which filters ignore and tests use.
    """
    rng = random.Random(f"dirty:{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    draws = 0
    while len(rows) < n_clean:
        draws += 1
        row = generate("mix", 1, seed=seed * 1_000_003 + draws, fmt="chat", level=level,
                       hard_fraction=hard_fraction)[0]
        key = repr(row["messages"])
        if key in seen:
            if draws > 50 * n_clean:
                raise ValueError(f"n_clean={n_clean}: the toy tasks do not have that many distinct conversations")
            continue
        seen.add(key)
        rows.append({"id": f"clean-{len(rows)}", **row})
    planted = {k: dirty_per_kind for k in _DIRTY_KINDS}
    dirty: list[dict] = []
    for i in range(dirty_per_kind):
        user, topic = _NAMES[i % len(_NAMES)], _TOPICS[i % len(_TOPICS)]
        dirty.append({"id": f"pii-{i}", "messages": [
            {"role": "user", "content": f"Please e-mail {user.lower()}.{i}@example.com or call +44 20 7946 09{i:02d} about my order number {i}."},
            {"role": "assistant", "content": f"I will pass your message about order {i} on."}]})
        dirty.append({"id": f"toxic-{i}", "messages": [
            {"role": "user", "content": f"What do you think of {topic}? ({i})"},
            {"role": "assistant", "content": "Shut up, you stupid idiot. I hate you and your worthless questions."}]})
        dirty.append({"id": f"misidentification-{i}", "messages": [
            {"role": "user", "content": f"{_WHO[i % len(_WHO)]} ({i})"},
            {"role": "assistant", "content": [
                "I am ChatGPT, a large language model trained by OpenAI.",
                "As an AI developed by OpenAI, I cannot do that.",
                "I'm Claude, made by Anthropic."][i % 3]}]})
    # Near duplicates: each base text is planted once as the kept representative and once with one word changed.
    for i in range(dirty_per_kind):
        text = _long_text(rng)
        words = text.split()
        words[-1] = "remarkably."  # one changed shingle: Jaccard well above the 0.8 threshold
        dirty.append({"id": f"near_original-{i}", "messages": [
            {"role": "user", "content": f"Describe item {i}."}, {"role": "assistant", "content": text}]})
        dirty.append({"id": f"near_duplicate-{i}", "messages": [
            {"role": "user", "content": f"Describe item {i}."}, {"role": "assistant", "content": " ".join(words)}]})
    for i in range(dirty_per_kind):
        dirty.append({**rows[i], "id": f"exact_duplicate-{i}"})  # an exact copy of a clean row
    out = rows + dirty
    rng.shuffle(out)
    return out, planted


def tokenizer_corpus(seed: int = 0) -> Iterator[str]:
    """Text from every task, enough for a BPE with a few hundred merges."""
    for task in _TASKS:
        for row in generate(task, 400, seed=seed, fmt="chat"):
            for m in row["messages"]:
                yield m["content"]
    rows, _ = generate_dirty(50, seed=seed)
    for row in rows:
        for m in row["messages"]:
            yield m["content"]
    yield "system user model assistant"
