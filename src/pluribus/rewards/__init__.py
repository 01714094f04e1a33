"""Rewards for real data: math, code run in a sandbox, instruction constraints, the generative judge."""
