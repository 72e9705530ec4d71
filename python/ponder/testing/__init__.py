"""Deterministic stand-ins for the models, for tests and benchmarks.

* ``ponder.testing.scripted``: scripted Policy / PRM implementations (no model, no torch):
  ``ScriptedPolicy`` / ``ScriptedPRM`` (hash-driven steps and scores), ``SeededScriptedPolicy``
  (per-request seeded streams), ``TablePolicy`` / ``TablePRM`` (steps and scores from tables),
  ``VotePolicy`` / ``VotePRM`` (answers drawn from fixed distributions), and the helpers that
  run them against ``ponder.baselines.oracle`` (``PROBLEMS``, ``LIMIT``, ``scripted_config``,
  ``assert_matches_oracle``).
* ``ponder.testing.tiny``: tiny random Hugging Face models built from configs and saved with
  ``save_pretrained`` (byte-level BPE tokenizers trained on a few math strings, Llama / Qwen2
  policies, the PRM formats' checkpoints); fully offline. Imports torch and transformers.
* ``ponder.testing.prm_reference``: each PRM format's published usage written out as a
  full-path scorer, the oracle that ``HFPRM``'s incremental scores are checked against.
* ``ponder.testing.forest``: build small forests (either implementation), snapshot and compare
  their whole observable state.
* ``ponder.testing.serve``: start and stop a live ``ponder serve`` on a free loopback port.

Nothing is imported here: import the submodule you need.
"""
