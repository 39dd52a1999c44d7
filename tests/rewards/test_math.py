"""Math ground truth: extraction, equivalence, and bounded time in any thread."""

from __future__ import annotations

import threading
import time

import pytest

from rewards.math import extract_answer, math_reward, stats, verify, verify_many


@pytest.mark.parametrize("text,expected", [
    ("so the result is \\boxed{\\frac{1}{2}} and \\boxed{7}", "7"),
    ("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}"),
    ("steps...\n#### 1,234\n", "1,234"),
    ("Thus the answer is $\\frac{3}{4}$. Done", "\\frac{3}{4}"),
    ("The answer is 42.", "42"),
    ("I had 3 apples and ate 2, leaving 1 apple", "1"),
    ("no numbers here", None),
])
def test_extract(text, expected):
    assert extract_answer(text) == expected


def test_extract_order_configurable():
    text = "The answer is 5. \\boxed{6}"
    assert extract_answer(text) == "6"
    assert extract_answer(text, order=("answer_is", "boxed")) == "5"
    with pytest.raises(ValueError, match="unknown extraction"):
        extract_answer(text, order=("nope",))


@pytest.mark.parametrize("completion,answer,ok", [
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("#### 1,234", "1234", True),
    ("The answer is 3.0000001.", "3", True),
    ("The answer is 3.01.", "3", False),
    ("\\boxed{50\\%}", "0.5", True),
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
    ("\\boxed{x^2+1}", "x^2-1", False),
    ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", True),
    ("so the final value is 12", "12", True),
    ("so the final value is 13", "12", False),
    ("nothing", "12", False),
])
def test_verify(completion, answer, ok):
    assert verify(completion, answer) is ok


def test_chat_completion_and_reward():
    msgs = [{"role": "assistant", "content": "\\boxed{4}"}]
    vals = math_reward(["p"] * 3, [msgs, "\\boxed{5}", "x"], answer=["4", "4", None])
    assert vals == [1.0, 0.0, None]


@pytest.mark.parametrize("bad", [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{(10^{10^{10}})!}",
    "\\boxed{" + "(" * 400 + "x" + ")" * 400 + "}",
    "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
])
def test_pathological_inputs_bounded_off_main_thread(bad):
    out = []

    def target():
        t = time.monotonic()
        out.append((verify(bad, "5", timeout_s=2), time.monotonic() - t))

    th = threading.Thread(target=target)
    th.start()
    th.join(30)
    assert not th.is_alive()
    ok, dt = out[0]
    # the bound is about 2 x timeout (compute + waiting for a worker); slack for loaded machines, the
    # unbounded case never returns at all
    assert ok is False and dt < 15, dt


def test_many_in_parallel_threads():
    comps = [f"\\boxed{{{i}/2}}" for i in range(40)] + ["\\boxed{9^{9^{9^{9}}}}"]
    ans = [f"\\frac{{{i}}}{{2}}" for i in range(40)] + ["1"]
    t = time.monotonic()
    res = verify_many(comps, ans, timeout_s=2)
    assert res == [True] * 40 + [False]
    assert time.monotonic() - t < 60  # would never return if the pathological input were not bounded
    assert stats()["timeouts"] >= 1


def test_pool_warm_up_starts_idle_workers_that_then_serve_checks():
    from rewards.math import VerifierPool

    pool = VerifierPool(size=2)
    try:
        assert pool.warm_up() == 2
        assert pool.warm_up() == 2  # idempotent: no extra workers
        assert pool.check("1/2", "0.5") is True
        assert pool._live == 2
    finally:
        pool.close()
