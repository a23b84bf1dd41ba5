"""bench.dp_modes: the sampling rate and the server's stage times it reads back."""

from __future__ import annotations

import json
from pathlib import Path

from bench import dp_modes


def test_max_sample_rate_is_the_batch_over_the_smallest_site() -> None:
    assert dp_modes.max_sample_rate(batch_size=64, examples=[480, 479, 479]) == 64 / 479
    assert dp_modes.max_sample_rate(batch_size=64, examples=[500, 32]) == 1.0  # at most 1


def test_stage_medians_read_the_rounds_of_metrics_jsonl() -> None:
    # Prepare: four rounds as the ServerApp records them (a local round has no stages)
    laps = [
        {"advertise-keys": 9.0, "masked-input": 9.0},  # round 1: left out
        {"advertise-keys": 0.5, "masked-input": 2.0},
        {"advertise-keys": 0.75, "masked-input": 1.0},
        {"advertise-keys": 1.0, "masked-input": 1.5},
    ]
    records = [{"round": r, "stage_seconds": v} for r, v in enumerate(laps, start=1)]

    # Execute
    medians = dp_modes.stage_medians([*records, {"round": 5, "accuracy": 0.5}])

    # Assert: medians of rounds 2-4, in the server's stage order
    assert medians == {"advertise-keys": 0.75, "masked-input": 1.5}
    assert dp_modes.stage_medians(records[:1]) == {"advertise-keys": 9.0, "masked-input": 9.0}
    assert dp_modes.stage_medians([]) == {}


def test_settings_say_what_a_round_did(tmp_path: Path) -> None:
    local = {"rounds": 6, "local-epochs": 2, "batch-size": 64, "dp": "local"}
    (tmp_path / "config.json").write_text(json.dumps(local))
    assert dp_modes.settings(tmp_path) == "6 rounds x 2 local epochs of DP-SGD, batch 64"
    dist = {**local, "dp": "distributed", "dp-max-sample-rate": 64 / 479}
    (tmp_path / "config.json").write_text(json.dumps(dist))
    assert dp_modes.settings(tmp_path) == (
        "6 rounds x 1 DP-SGD step, batch 64 (q 0.134), 4 SecAgg exchanges (5 in round 1)"
    )


def test_the_deployed_round_bench_fails_loudly_past_its_line() -> None:
    """bench.deploy_latency exits 1 with a REGRESSION line when the deployed round is more
    than --max-gap seconds over the simulated one; 0 turns the line off."""
    from bench import deploy_latency

    rows = [
        {"mode": "simulated", "minus_simulated_s": 0.0},
        {"mode": "deployed", "minus_simulated_s": 1.3},
        {"mode": "deployed, stock", "minus_simulated_s": 8.0},  # not the line's row
    ]
    assert "REGRESSION" in deploy_latency.gap_verdict(rows, 1.0)
    assert deploy_latency.gap_verdict(rows, 1.5) == ""
    assert deploy_latency.gap_verdict(rows, 0) == ""
