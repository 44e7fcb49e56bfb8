"""Deprecated re-export shim: the engines now live in harness/decoding.py (decode loops), harness/merged.py
(the merged base) and harness/parity.py (parity and its gate). Import from those; this module goes away once no
caller uses it."""

from .decoding import ENGINES, EOS_CHECK_EVERY, HFGreedy, StaticGreedy, left_pad, round_up
from .merged import MergedBase
from .parity import parity

__all__ = ["ENGINES", "EOS_CHECK_EVERY", "StaticGreedy", "HFGreedy", "MergedBase", "round_up", "left_pad", "parity"]
