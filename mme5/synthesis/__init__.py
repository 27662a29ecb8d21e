"""Synthetic data generation the mmE5 way: plan the (task, modality, language) mix, then call an MLLM.

`plan` samples what to synthesise and writes it to disk before any call, so a run can be split into
shards and resumed; `client` is the rate-limited, retrying chat-completions client that does the calls.
"""
