"""Speculative decoding: acceptance rules, the engine every command drives, and per-method proposers."""

from spectool.decoding.accept import SamplingParams, Verdict, accept_greedy, accept_sampling, probabilities, sample

__all__ = ["SamplingParams", "Verdict", "accept_greedy", "accept_sampling", "probabilities", "sample"]
