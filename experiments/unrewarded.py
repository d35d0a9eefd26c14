"""Runs a script (grpo.py) with the reward of some verifier kinds set to 0: their samples stay in
every batch, their groups without signal (advantage 0). The reward ablation's second reading of
"without a reward" (experiments/reward_ablation.py); its first removes the kind's records.

    python experiments/unrewarded.py mcq grpo.py <flags>
"""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402

UNREWARDED = set(sys.argv[1].split(","))
scored = rewards.reward_batch


def reward_batch(responses, gts, kinds, contexts=None, scorer=None):
    scores = scored(responses, gts, kinds, contexts, scorer)
    return [0.0 if kind in UNREWARDED else score for score, kind in zip(scores, kinds)]


rewards.reward_batch = reward_batch
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
