"""HellaSwag as EleutherAI lm-evaluation-harness's ``hellaswag`` task builds it (lm-eval 0.4.x,
``lm_eval/tasks/hellaswag``), so that the trainer's ``--eval-mc-file`` score of a file in HellaSwag's
full format is lm-eval's number on the same model.

What the task does, written here from its description:

* the rows it reads: ``activity_label``, ``ctx_a``, ``ctx_b``, ``endings`` and the string ``label``;
* the context is ``activity_label + ": " + ctx_a + " " + ctx_b`` with ``ctx_b``'s first character
  upper-cased and the rest lower-cased (Python's ``str.capitalize``), then cleaned; each ending
  is cleaned the same way;
* the clean-up (for WikiHow artefacts): strip the ends, ``" [title]"`` becomes ``". "``, every
  bracketed tag (``[header]``, ``[step]``, ...; shortest match) is removed, then each double space
  becomes one (a single pass, as ``str.replace`` does);
* each ending is scored as the continuation ``" " + ending`` after the context (no token before
  the context); ``acc`` picks the highest sum of log-likelihoods, ``acc_norm`` the highest sum
  divided by the ending's length in characters.
"""
from __future__ import annotations

import re
from typing import List

# The fields lm-eval's hellaswag task reads from each row.
FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
TARGET_DELIMITER = " "  # lm-eval's default: between the context and each ending

_TAG = re.compile(r"\[.*?\]")


def clean(text: str) -> str:
    """lm-eval's clean-up of HellaSwag text (see the module docstring)."""
    text = text.strip().replace(" [title]", ". ")
    return _TAG.sub("", text).replace("  ", " ")


def context(row: dict) -> str:
    """The text every ending of ``row`` is scored after."""
    return clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")


def endings(row: dict) -> List[str]:
    return [clean(ending) for ending in row["endings"]]


def missing_fields(row: dict) -> List[str]:
    return [name for name in FIELDS if name not in row]
