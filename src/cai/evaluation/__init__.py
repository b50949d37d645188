"""The evaluation wing: what the ``evaluate`` stage (``cai/stages/evaluate.py``) composes.

Each module does one job and imports no stage:

* ``elo``: Bradley-Terry fits of soft pairwise outcomes, Elo and bootstrap intervals
  (numpy only, no torch or engine).
* ``pairwise``: the pairs of models of the design (every pair, or every model with the
  anchors: ``comparison_pairs``) on every prompt, asked in both orders.
* ``measures``: the per-answer questions (harmfulness 0-4, refusal, safe answer), the
  refusal phrase list, the plain-text quality measures and the per-model summaries.
* ``revisions``: the PM score against the number of critique/revision rounds (Fig. 5).
* ``frontier``: the checkpoints kept along training, answered and scored (Fig. 2).
* ``results``: typed records that ``results.json``, ``frontier.json`` and
  ``revisions.json`` are written from and read back into (the report and the study read
  fields, not nested ``.get()`` calls).
* ``sets``: the standard evaluation sets, one file each, behind one registry.
"""
