"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's user config (~/.flwr) never leaks between tests or into $HOME."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


def pytest_report_header() -> str:
    return f"fashion-mnist present: {FASHION_DIR.is_dir()}; cpus: {os.cpu_count()}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first, longest first, then the other slow ones, unit tests last.

    `make test` spreads tests over three pytest-xdist workers (`-n 3 --dist load
    --maxschedchunk 1`): the end-to-end tests mostly wait (on heartbeats, retries, other
    processes), so three workers overlap those waits on two cores. `--maxschedchunk 1`
    deals tests out one at a time as workers free up (xdist's default hands each worker
    a quarter of its share at once, which gave one worker every end-to-end test), so the
    long tests start together on every worker and short unit tests fill the end.
    """
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> tuple[int, int]:
        name = item.name.split("[")[0]
        if name in order:
            return (0, order[name])
        return (1, 0) if item.get_closest_marker("slow") is not None else (2, 0)

    items.sort(key=key)  # stable: files keep their order within each group


# Measured in `make test` on 2 cores (2026-12-06), longest first: 1-220 s each.
LONGEST_FIRST = (
    "test_sites_killed_in_each_stage_of_a_distributed_round",
    "test_live_sites_keep_serving_across_a_server_restart",
    "test_three_sites_over_tls_then_one_is_lost",
    "test_a_killed_server_resumes_and_the_sites_ledgers_audit",
    "test_a_killed_simulation_resumes_and_its_ledgers_audit",
    "test_a_killed_site_started_again_rejoins_and_its_ledger_counts_once",
    "test_a_finished_run_resumes_with_more_rounds_where_the_sites_allow_them",
    "test_slow_but_live_sites_are_not_taken_for_dead",
    "test_flower_operator_commands_on_a_deployed_federation",
    "test_only_authorised_sites_with_the_federation_ca_and_tls_get_in",
    "test_a_crash_in_a_round_the_sites_answered_loses_nothing",
    "test_krum_keeps_the_model_that_one_sign_flipping_site_steers_under_fedavg",
    "test_deployed_sites_train_the_task_on_their_own_csv_files",
    "test_sites_run_on_both_nodes_and_compute_what_a_local_run_does",
    "test_simulation_reaches_the_accuracy_target_at_epsilon_3",
    "test_the_dashboard_of_a_3_site_run_in_chromium",
    "test_two_sites_over_a_25ms_100mbit_wan",
    "test_distributed_dp_simulation_records_both_epsilons",
    "test_refusing_site_then_audit",
    "test_flwr_run_dot_simulates_and_the_sites_ledgers_audit",
    "test_insecure_server_refuses_secure_site",
    "test_a_sites_new_spends_become_events_with_its_total",
    "test_restarted_site_process_keeps_its_spend",
    "test_calibration_never_overshoots",
    "test_distributed_sites_of_10x_different_sizes_record_what_the_sum_spends",
    "test_calibration_with_prior_spend_never_overshoots",
    "test_epsilon_non_decreasing_in_steps",
    "test_the_real_trainer_stays_below_its_claim_and_a_noiseless_one_does_not",
    "test_more_rounds_on_resume_only_where_every_site_allows_them",
    "test_the_server_only_holds_masked_vectors_and_their_sum",
    "test_answers_are_memoised_per_history_whatever_its_order_and_refusals_are_not",
    "test_epsilon_non_decreasing_in_sample_rate",
)
