"""The GSM8K study: how well CacheCards carry context along agent chains.

This subpackage is the experiment, not the library: the core
(``qkvshare_mlx.agents``, ``card``, ``quant``, ...) never imports it. One
concept per module:

- ``gsm8k``: the problems, answer extraction and answer matching;
- ``roles``: the study's agents (solver, checker, calculator, answerer);
- ``lanes``: several chains decoded as one batch;
- ``replay``: teacher-forced replay of cards along a reference transcript;
- ``metrics``: scores of a candidate against the exact reference;
- ``state``: the resumable, append-only results file;
- ``phases``: per problem, the reference chain, the teacher-forced grid and
  generation, each writing rows to the state;
- ``report``: aggregation of the state into JSON and markdown;
- ``plots``: figures (matplotlib, the ``eval`` extra);
- ``run``: the whole study from parsed options (``qkvshare eval`` and
  ``bench/eval_gsm8k.py`` call it).

Importing the package imports none of its modules.
"""
