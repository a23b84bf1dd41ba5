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
    """The slow end-to-end tests first, longest first, unit tests after.

    `make test` spreads tests over three pytest-xdist workers (`-n 3 --dist load`): the
    end-to-end tests mostly wait (on heartbeats, retries, other processes), so three
    workers overlap those waits on two cores. Handed out first, they start on every
    worker at once instead of queueing behind each other at the end.
    """
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> tuple[int, int]:
        if item.get_closest_marker("slow") is None:
            return (2, 0)
        return (0, order[item.name]) if item.name in order else (1, 0)

    items.sort(key=key)  # stable: files keep their order within each group


# Measured one by one on 2 cores (2026-12-02), longest first: 15-117 s each. Dealt out
# round-robin, they spread evenly over the workers.
LONGEST_FIRST = (
    "test_a_killed_server_resumes_and_the_sites_ledgers_audit",
    "test_live_sites_keep_serving_across_a_server_restart",
    "test_a_killed_site_started_again_rejoins_and_its_ledger_counts_once",
    "test_slow_but_live_sites_are_not_taken_for_dead",
    "test_three_sites_over_tls_then_one_is_lost",
    "test_deployed_sites_train_the_task_on_their_own_csv_files",
    "test_only_authorised_sites_with_the_federation_ca_and_tls_get_in",
    "test_two_sites_over_a_25ms_100mbit_wan",
    "test_a_killed_simulation_resumes_and_its_ledgers_audit",
    "test_sites_run_on_both_nodes_and_compute_what_a_local_run_does",
    "test_refusing_site_then_audit",
    "test_distributed_dp_simulation_records_both_epsilons",
    "test_simulation_reaches_the_accuracy_target_at_epsilon_3",
    "test_insecure_server_refuses_secure_site",
)
