"""Seed offsets: every kind of sampled request adds its own offset to the run's ``seed``.

Each kind of request gets a random stream of its own, so adding a request of one kind
never moves another's samples. They are named here, once; changing a value changes the
results of every run with that seed (and its cached requests no longer match).

Requests are seeded per conversation on top of this (``engines.base.request_seed``), so
two kinds that share an offset but never share a conversation draw independent samples
(``FEEDBACK_COT`` and ``EXPAND`` do).
"""

#: critique_revision: the first answer to each prompt.
ANSWER = 0
#: critique_revision: round r's critique adds ``CRITIQUE + 2 * r``, its revision ``REVISION + 2 * r``.
CRITIQUE = 1000
REVISION = 1001
#: A request retried after the quality gates rejected its text adds this per attempt (a prime).
RETRY_STEP = 7919
#: feedback: the answers sampled to make pairs (in contrast mode too: each under its own system prompt).
FEEDBACK_ANSWERS = 2000
#: feedback: the chains of thought before the options are read.
FEEDBACK_COT = 3000
#: expand: the requests for new red-team prompts (``+ RETRY_STEP * attempt``).
EXPAND = 3000
#: evaluate: every model's answers to the held-out prompts.
EVALUATE_ANSWERS = 5000
#: evaluate: the bootstrap of the PM-by-revision change of round ``k`` adds ``REVISION_DELTA + k``
#: (round ``r``'s mean and change use ``seed + r``).
REVISION_DELTA = 1000
#: rl: the held-out answers scored before and after training (never a training step's ``seed + step``).
RL_EVAL = 1_000_003
