"""Runs a script (grpo.py) with the reward replaced, for tests only:

    python tests/reward_by_kind.py grpo.py <flags>

digit answers always score 0, so every digit group has no signal; any other answer scores by its text,
so those groups (almost always) have one. That makes --dynamic-sampling's rounds needed, and uneven
between ranks."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402


def reward_batch(responses, gts, kinds, contexts=None, scorer=None):
    return [0.0 if kind == "digit" else sum(map(ord, text)) % 97 / 97 for text, kind in zip(responses, kinds)]


rewards.reward_batch = reward_batch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
