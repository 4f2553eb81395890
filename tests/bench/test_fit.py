"""Slope fits on synthetic timings: exact slopes, batch schedules, verdicts against the claims."""
import pytest

from effattn.bench.fit import fit_records, slope, verdict


def _records(name, exponent_t, exponent_m, claimed_t, claimed_m, ns=(64, 128, 256, 512), batch=None, mode="fwd"):
    out = []
    for n in ns:
        b = batch(n) if batch else 1
        out.append({"kind": "method", "name": name, "form": "default", "label": name, "mode": mode, "n": n,
                    "status": "ok", "batch": b, "time_s": 1e-6 * b * n ** exponent_t,
                    "peak_bytes": int(100 * b * n ** exponent_m), "claimed_time_exponent": claimed_t,
                    "claimed_memory_exponent": claimed_m, "cache_per_token": True})
    return out


def test_slope_of_power_laws():
    ns = [64, 128, 256, 1024]
    assert slope(ns, [3e-6 * n**2 for n in ns]) == pytest.approx(2.0)
    assert slope(ns, [5.0 * n for n in ns]) == pytest.approx(1.0)
    assert slope(ns, [7.0 for _ in ns]) == pytest.approx(0.0)
    assert slope([64], [1.0]) is None and slope([64, 64], [1.0, 2.0]) is None
    assert slope(ns, [1.0, None, 0.0, 4.0]) == pytest.approx(0.5)  # only (64, 1) and (1024, 4): log 4 / log 16


def test_fits_per_sequence_under_a_batch_schedule_and_verdicts():
    recs = (_records("quadratic", 2, 2, 2.0, 2.0, batch=lambda n: max(1, 16384 // n))
            + _records("flashlike", 2, 1, 2.0, 1.0)
            + _records("liar", 2, 2, 1.0, 1.0)
            + _records("overhead", 0.2, 1, 1.0, 1.0)
            + _records("short", 2, 2, 2.0, 2.0, ns=(64, 128)))
    recs.append(dict(recs[0], status="timeout"))  # failed cells are not fitted
    fits = {f["name"]: f for f in fit_records(recs)}
    q = fits["quadratic"]
    assert q["time_slope"] == pytest.approx(2.0) and q["memory_slope"] == pytest.approx(2.0)
    assert q["time_verdict"] == q["memory_verdict"] == "ok" and q["points"] == 4
    assert fits["flashlike"]["memory_slope"] == pytest.approx(1.0, abs=1e-3)
    assert fits["liar"]["time_verdict"].startswith("CONTRADICTS") and fits["liar"]["memory_verdict"].startswith("CONTRADICTS")
    assert fits["overhead"]["time_verdict"].startswith("below claim")
    assert fits["short"]["time_verdict"].startswith("too few sizes")


def test_decode_claims_follow_the_cache_kind():
    cache = _records("kv", 1, 1, 2.0, 2.0, mode="decode")
    state = [dict(r, name="rnn", label="rnn", cache_per_token=False, time_s=1e-3, peak_bytes=64) for r in cache]
    fits = {f["name"]: f for f in fit_records(cache + state)}
    assert fits["kv"]["claimed_time"] == 1.0 and fits["kv"]["time_verdict"] == "ok"
    assert fits["rnn"]["claimed_time"] == 0.0 and fits["rnn"]["time_slope"] == pytest.approx(0.0)
    assert fits["rnn"]["memory_verdict"] == "ok"


def test_verdict_tolerance():
    assert verdict(2.4, 2.0, 4, 8) == "ok"
    assert verdict(2.6, 2.0, 4, 8).startswith("CONTRADICTS")
    assert verdict(2.6, 2.0, 4, 8, tolerance=1.0) == "ok"
    assert verdict(None, 2.0, 4, 8) == "n/a" and verdict(1.0, None, 4, 8) == "n/a"


def test_fixed_length_methods_are_fitted_on_the_lengths_they_ran():
    fixed = [dict(r, seq_q=35) for r in _records("grid", 2, 2, 1.0, 1.0)]
    fit = fit_records(fixed)[0]
    assert fit["n_min"] == fit["n_max"] == 35 and fit["time_slope"] is None
    assert fit["time_verdict"] == "n/a"
    honest = [dict(r, seq_q=r["n"]) for r in _records("q", 2, 2, 2.0, 2.0)]
    assert fit_records(honest)[0]["time_slope"] == pytest.approx(2.0)
