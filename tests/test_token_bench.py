"""The token bench's estimators: the same method for verify and raw, and every slice on record.

No timing is asserted: the slices are given, or counted, never judged by their speed.
"""

from __future__ import annotations

import pytest

from bench import token_bench


def test_the_ratio_is_the_fastest_slice_of_each_side() -> None:
    verify = [[50.0, 80.0, 10.0], [70.0, 60.0, 75.0]]
    raw = [[100.0, 40.0, 90.0], [95.0, 100.0, 20.0]]
    estimates = token_bench.ratio_estimates(verify, raw)
    assert estimates["best"] == pytest.approx(80.0 / 100.0)
    pairs = sorted([0.5, 2.0, 10.0 / 90.0, 70.0 / 95.0, 0.6, 75.0 / 20.0])
    assert estimates["paired_median"] == pytest.approx((pairs[2] + pairs[3]) / 2)
    rounds = sorted([(140 / 3) / (230 / 3), (205 / 3) / (215 / 3)])
    assert estimates["round_median"] == pytest.approx(sum(rounds) / 2)


def test_a_slow_moment_on_one_side_does_not_move_the_best_estimate() -> None:
    steady_verify, steady_raw = [[80.0] * 6], [[100.0] * 6]
    noisy_verify = [[80.0, 20.0, 80.0, 30.0, 80.0, 80.0]]  # two slices hit by a neighbour
    noisy_raw = [[100.0, 100.0, 25.0, 100.0, 100.0, 40.0]]
    assert token_bench.ratio_estimates(noisy_verify, noisy_raw)["best"] == pytest.approx(
        token_bench.ratio_estimates(steady_verify, steady_raw)["best"]
    )


def test_paired_alternates_slices_and_stops_when_the_pool_runs_out() -> None:
    calls: list[tuple[str, int]] = []

    def verify(i: int) -> None:
        calls.append(("verify", i))

    def raw(i: int) -> None:
        calls.append(("raw", i))

    verify_rates, raw_rates = token_bench.paired(verify, raw, seconds=0.0, pool_size=10_000)
    assert len(verify_rates) == len(raw_rates) == token_bench.SLICES
    kinds = [kind for kind, _ in calls]
    turns = [kinds[i] for i in range(len(kinds)) if i == 0 or kinds[i] != kinds[i - 1]]
    assert turns == ["verify", "raw"] * token_bench.SLICES
    verified = [i for kind, i in calls if kind == "verify"]
    assert verified == list(range(len(verified)))  # each token of the pool once, in order

    calls.clear()
    verify_rates, raw_rates = token_bench.paired(verify, raw, seconds=0.0, pool_size=token_bench.BATCH)
    assert len(verify_rates) == len(raw_rates) == 1  # one batch used the pool up: no second turn
    assert [i for kind, i in calls if kind == "verify"] == list(range(token_bench.BATCH))


def test_the_report_names_the_method_and_the_other_estimators() -> None:
    result = {
        "cpu": 0,
        "python": "3.11",
        "cryptography": "x",
        "openssl": "y",
        "rounds": 2,
        "seconds_per_round": 0.5,
        "slices_per_round": token_bench.SLICES,
        "token_length": 849,
        "signing_input_length": 450,
        "best_per_second": {"mint": 1.0, "verify": 8.0, "aes": 1.0, "raw": 10.0},
        "verify_over_raw": 0.8,
        "verify_over_raw_estimates": {"best": 0.8, "paired_median": 0.75, "round_median": 0.7},
        "goal_met": True,
    }
    text = token_bench.report(result)
    assert f"fastest of {2 * token_bench.SLICES} interleaved slices" in text
    assert "80.0%" in text and "75.0%" in text and "70.0%" in text
