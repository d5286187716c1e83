"""The suite's own scheduling: tests that share a module-scoped fixture run on one xdist worker.

pytest-xdist 3.8 groups them by appending the group to each test's node id; pytest 9.2 no longer reads
the attribute it writes, and the groups silently became one test each (every worker that drew a test of
test_deployments built a Prefect stack with workers of its own). pyproject.toml keeps pytest below 9.2;
this test fails if the groups stop holding again.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def shared() -> str:
    return "built once per module"


def test_tests_sharing_a_module_fixture_carry_their_modules_group(
    shared: str, request: pytest.FixtureRequest
) -> None:
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("only under --dist loadgroup (.ci/run)")
    assert shared == "built once per module"
    assert request.node.nodeid.endswith("@tests.test_suite_grouping"), request.node.nodeid
