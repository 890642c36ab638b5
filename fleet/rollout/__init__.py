"""Staged rollouts: the policy that judges canaries (policy), the loop that runs a rollout on
the broker (runner), and its progress display (display)."""
