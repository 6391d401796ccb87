"""The magnitudes the merge arithmetic stays meaningful at: a leaf module (no torch), so the option checks
(`hf_mudsc.options`) and the methods' checks (`hf_mudsc.methods`) read one value."""

from __future__ import annotations

#: The magnitudes a non-zero merge weight may have: the merge runs in float32 (about 1e-38 to 3e38).
WEIGHT_RANGE = (1e-30, 1e30)
#: The largest magnitude of a factor on task vectors (`scaling`, and weights not divided by their sum) or of the
#: TALL-mask threshold (`consensus_lambda`): task arithmetic picks lambda in [0, 1] (Ilharco et al. 2023; -1 negates a
#: task), TALL masks lambda in [0.2, 0.6] (Wang et al. 2024; FusionBench's default 0.6). A task vector scaled 100-fold
#: is no merge of these parents (at 1e30 the weights were 3e29, at 1e308 inf), and a threshold of 100 already keeps
#: almost nothing (the merge is the base).
FACTOR_LIMIT = 100.0
