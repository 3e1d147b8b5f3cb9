"""``megatron-ext sweep``: run variants of one training launch and compare them (docs/sweeps.md).

* ``spec``: the variants (a grid's product and/or a list), their exact commands, checked by the
  trainer's (or the launcher's) own parser before anything runs; YAML experiment configs.
* ``runner``: runs one variant (log, metrics, ``result.json``, stop on a non-finite loss), writes
  the job scripts, and is what a job script runs (``python -m megatron_ext.sweeps.runner DIR``).
* ``results``: one variant's numbers from its ``metrics.jsonl``; the combined JSON/CSV and table.
* ``recommend``: the selection rule and the instability flags; ``plots``: the comparison plots.
"""
