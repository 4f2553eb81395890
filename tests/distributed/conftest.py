import sys
from pathlib import Path

# The spawned gloo workers import their entry points from cp_worker.py beside the tests; with pytest's
# importlib mode the test folder is not on sys.path, and spawned children inherit the parent's sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
