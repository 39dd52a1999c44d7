"""Reward plugins loaded by file path: a file that registers rewards loads (no deadlock), and a
missing function is reported against the user's file, not an internal module name."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rewards import RewardLoadError, load_reward, registered_rewards

REPO = Path(__file__).resolve().parents[2]


def _plugin(tmp_path: Path) -> Path:
    path = tmp_path / "my_plugin.py"
    path.write_text(textwrap.dedent("""
        from rewards import register_reward

        @register_reward("plugin_brevity")
        def brevity(prompts, completions, **_):
            return [1.0 / (1 + len(c)) for c in completions]

        def wrong_len(prompts, completions, **_):
            return [1.0]
    """))
    return path


def test_a_reward_file_that_registers_rewards_loads_without_deadlock(tmp_path):
    # In a child process with a timeout: a regression fails here instead of hanging the suite.
    path = _plugin(tmp_path)
    code = ("from rewards import load_reward, load_reward as lr\n"
            f"fn = load_reward({str(path) + ':wrong_len'!r})\n"
            "print(fn.__name__, lr('plugin_brevity').__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["wrong_len", "brevity"]


def test_registering_inside_a_loaded_file_is_visible_in_this_process(tmp_path):
    path = _plugin(tmp_path)
    load_reward(f"{path}:wrong_len")
    assert "plugin_brevity" in registered_rewards()


def test_a_missing_function_names_the_users_file_and_its_functions(tmp_path):
    path = _plugin(tmp_path)
    with pytest.raises(RewardLoadError) as e:
        load_reward(f"{path}:wrong_lenght")
    msg = str(e.value)
    assert str(path) in msg and "reward_file_" not in msg
    assert "did you mean 'wrong_len'" in msg
