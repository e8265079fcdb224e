"""tools/demo_report.py: the loss curve of the latest run of an appended metrics.json."""

from helpers import load_script


def test_loss_curve_keeps_the_latest_run_of_an_appended_metrics_file():
    latest_run = load_script("tools", "demo_report").latest_run
    stopped = [{"iteration": i, "total_loss": 9.0} for i in (19, 39, 59, 79)]
    # Resumed from the checkpoint at iteration 49: the stopped run's 59 and 79 are replaced.
    resumed = [{"iteration": i, "total_loss": 1.0} for i in (59, 79, 99)]
    kept, dropped = latest_run(stopped + resumed)
    assert [(r["iteration"], r["total_loss"]) for r in kept] == [
        (19, 9.0),
        (39, 9.0),
        (59, 1.0),
        (79, 1.0),
        (99, 1.0),
    ]
    assert dropped == 2
    # Started again from scratch: nothing of the stopped run is left.
    fresh = [{"iteration": i, "total_loss": 2.0} for i in (19, 39)]
    kept, dropped = latest_run(stopped + fresh)
    assert [r["total_loss"] for r in kept] == [2.0, 2.0] and dropped == 4
    assert latest_run(stopped) == (stopped, 0)
