"""Per-spectrum quality flag bits, shared by feature stores and output catalogs."""

from __future__ import annotations

#: SNR below the featurizer's / predictor's threshold.
LOW_SNR = 1 << 0
#: A large fraction of the feature pixels is masked (ivar == 0).
HEAVY_MASK = 1 << 1
#: The spectrum does not overlap the feature grid (all features missing).
NO_OVERLAP = 1 << 2
#: The radial velocity was estimated by cross-correlation (no RV/redshift was given).
RV_ESTIMATED = 1 << 3
#: The input had NaN/inf flux or ivar that was masked.
BAD_INPUT = 1 << 4
#: Features far from the training distribution (predict).
OUT_OF_DOMAIN = 1 << 5
#: A prediction beyond the training label range (predict).
OUT_OF_LABEL_RANGE = 1 << 6

NAMES = {
    LOW_SNR: "LOW_SNR",
    HEAVY_MASK: "HEAVY_MASK",
    NO_OVERLAP: "NO_OVERLAP",
    RV_ESTIMATED: "RV_ESTIMATED",
    BAD_INPUT: "BAD_INPUT",
    OUT_OF_DOMAIN: "OUT_OF_DOMAIN",
    OUT_OF_LABEL_RANGE: "OUT_OF_LABEL_RANGE",
}


def describe(flags: int) -> list[str]:
    return [name for bit, name in NAMES.items() if flags & bit]
