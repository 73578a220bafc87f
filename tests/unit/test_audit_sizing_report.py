"""Audit of the report's size statistics against SciPy / NumPy: the lognormal fit and its
goodness of fit when every particle has one size (a degenerate fit: σ = 0, nothing to test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from nanoscout.clients.report import fit_quality, group_stats


@pytest.mark.parametrize("ecd", [7.0, 12.5, 33.0, 0.3, 250.0])
@pytest.mark.parametrize("n", [8, 20, 57, 300])
def test_one_size_gives_an_exact_degenerate_lognormal_fit(ecd: float, n: int) -> None:
    d = np.full(n, ecd)
    st = group_stats("cam", "nm", d)
    # the maximum-likelihood lognormal of equal values: median = the value, σ = 0 exactly
    assert st.lognormal_sigma == 0.0
    assert st.lognormal_median == ecd
    assert (st.d10, st.d50, st.d90) == (ecd, ecd, ecd)
    # no distribution to test: not a "rejected" lognormal with a p-value of 0.001
    assert fit_quality(d) is None


def test_lognormal_fit_matches_scipy() -> None:
    d = np.random.default_rng(4).lognormal(math.log(12.0), 0.35, 300)
    st = group_stats("cam", "nm", d)
    shape, _, scale = stats.lognorm.fit(d, floc=0)
    assert st.lognormal_median == pytest.approx(scale, rel=1e-9)
    assert st.lognormal_sigma == pytest.approx(shape, rel=1e-9)
    assert (st.d10, st.d50, st.d90) == pytest.approx(tuple(np.percentile(d, [10, 50, 90])))
    fq = fit_quality(d)
    assert fq is not None
    x = np.log(d)
    # scipy.stats.goodness_of_fit estimates the normal's scale with ddof = 1
    ks = stats.kstest(x, "norm", args=(x.mean(), x.std(ddof=1))).statistic
    assert fq.ks_statistic == pytest.approx(ks, rel=1e-6)
