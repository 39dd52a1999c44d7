import sys
from pathlib import Path

# The suite runs with --import-mode=importlib, which does not put test folders on sys.path;
# rl_testutil.py (what the rl stage tests share) lives beside this file.
sys.path.insert(0, str(Path(__file__).parent))
