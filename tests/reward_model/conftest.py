import sys
from pathlib import Path

# The suite runs with --import-mode=importlib, which does not put test folders on sys.path;
# rm_helpers.py lives beside this file.
sys.path.insert(0, str(Path(__file__).parent))
