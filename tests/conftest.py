import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: runs on a real two-node Slurm cluster started on this machine "
                            "(launch/local_slurm.sh); skipped where slurmctld is not installed")
    config.addinivalue_line("markers", "bit_identity: bit-for-bit regression against "
                            "tests/fixtures/bit_identity_before.json (a few minutes)")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def pytest_sessionfinish(session, exitstatus):
    """Kill any process a test left behind (a hung pool worker, an orphaned torchrun rank): a leftover child
    keeps CI's output pipe open, so the job would wait out its hard limit after the tests have finished."""
    from launch.procs import descendants, kill_pids
    if "wandb" in sys.modules:  # its service process is expected: close it the way wandb's own atexit would
        try:
            sys.modules["wandb"].teardown()
        except Exception as e:  # noqa: BLE001 - whatever is left is killed below
            print(f"\nconftest: wandb teardown failed: {e}")
    leftovers = kill_pids(descendants(os.getpid()))
    if leftovers:
        print(f"\nconftest: killed {len(leftovers)} process(es) left behind by the tests: {leftovers}")
