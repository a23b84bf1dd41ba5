"""The ServerApp refuses a distributed-DP run config that was never planned."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedsilo.config import RunConfig
from fedsilo.errors import PrivacyError
from fedsilo.privacy.distributed import planned
from fedsilo.server.server_app import main


def context(cfg: RunConfig) -> Context:
    return Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flwr()
    )


@pytest.mark.parametrize("scale,needle", [(0.0, "never planned"), (0.8, "above the run's target")])
def test_an_unplanned_or_underplanned_distributed_run_stops_before_it_starts(
    tmp_path: Path, scale: float, needle: str
) -> None:
    # A plain `flwr run` of the manifest (noise-multiplier 0), or a hand-edited run config
    # with less noise than its largest sample rate needs: the sites receive this same run
    # config, so the ServerApp cannot re-plan it; it stops the run instead.
    run = planned(
        RunConfig(
            dp="distributed",
            dp_min_sites=3,
            min_sites=3,
            dp_max_sample_rate=0.1,
            run_dir=str(tmp_path / "run"),
        )
    )
    cfg = dataclasses.replace(run, noise_multiplier=run.noise_multiplier * scale)
    with pytest.raises(PrivacyError, match=needle):
        main(grid=None, context=context(cfg))  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()  # no run directory, nothing sent


@pytest.mark.parametrize(
    ("sites", "needle"),
    [
        (["site-0"], "1 usable repl(ies), fewer than min-sites=2"),
        # Enough sites, but no update: never "2 ..., fewer than min-sites=2" (issue 26).
        (["site-0", "site-1"], "no update of round 3 could be aggregated (min-sites=2)"),
    ],
)
def test_why_a_round_stops_is_what_happened(sites: list[str], needle: str) -> None:
    from types import SimpleNamespace

    from fedsilo.server.server_app import close_round

    def never(state: object) -> object:
        raise AssertionError("a round without an update is not evaluated")

    strategy = SimpleNamespace(last_round_sites=sites)
    why = close_round(3, None, strategy, RunConfig(min_sites=2), never)  # type: ignore[arg-type]
    assert why == needle or (isinstance(why, str) and why.startswith(needle))
    assert "fewer than" not in why or len(sites) < 2
