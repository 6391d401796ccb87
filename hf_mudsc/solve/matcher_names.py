"""The matchers the solver implements, by name: a leaf module (no torch), so option checks can list them."""

from __future__ import annotations

#: Valid values of ``match(..., matcher=...)``; ``num_heads > 1`` selects the group variant of each.
MATCHERS: tuple[str, ...] = ("align", "zip")
