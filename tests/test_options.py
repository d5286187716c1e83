"""One definition of a run's options: the flow, the CLI, prefect.yaml, serve and the backfill agree with
`EnrichOptions` — names, defaults and types — and bad values stop a run with one line."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.utilities.callables import parameter_schema, parameter_schema_from_entrypoint

from cleanlist.errors import InputError
from cleanlist.run.options import TASK_RUNNER_WORKERS, EnrichOptions
from cleanlist_prefect.deployments.cli import _flow_kwargs, build_parser
from cleanlist_prefect.flows.enrich_contacts import enrich_contacts

ROOT = Path(__file__).parent.parent
FIELDS = EnrichOptions.model_fields


def _defaults() -> dict[str, Any]:
    return {name: field.default for name, field in FIELDS.items() if not field.is_required()}


def test_flow_signature_is_the_options_model() -> None:
    signature = inspect.signature(enrich_contacts.fn)
    hints = typing.get_type_hints(enrich_contacts.fn)
    assert list(signature.parameters) == list(FIELDS)
    for name, parameter in signature.parameters.items():
        field = FIELDS[name]
        expected_default = inspect.Parameter.empty if field.is_required() else field.default
        assert parameter.default == expected_default, name
        assert hints[name] == field.annotation, name


def test_prefect_sees_the_same_parameters_whether_imported_or_deployed() -> None:
    imported = parameter_schema(enrich_contacts.fn)
    deployed = parameter_schema_from_entrypoint(str(ROOT / "flows/enrich_contacts.py") + ":enrich_contacts")
    for schema in (imported, deployed):
        assert set(schema.properties) == set(FIELDS)
        assert set(schema.required or []) == {"source", "output"}
        defaults = {
            name: prop.get("default") for name, prop in schema.properties.items() if "default" in prop
        }
        assert defaults == _defaults()


def test_every_option_is_reachable_from_the_cli_with_the_flows_default() -> None:
    parser = build_parser()
    minimal = parser.parse_args(["run", "in.csv", "-o", "out.csv"])
    assert _flow_kwargs(minimal) == {"source": "in.csv", "output": "out.csv"}  # the rest: flow defaults
    run_parser = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["run"]  # type: ignore[union-attr]
    dests = {action.dest for action in run_parser._actions}
    assert set(FIELDS) <= dests


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--enrichment-type", "full"], {"enrichment_type": "full"}),
        (
            ["--map", "first_name=Vorname", "--map", "last_name=Nachname"],
            {"mapping": {"first_name": "Vorname", "last_name": "Nachname"}},
        ),
        (
            ["--rejects", "r.csv", "--sql", "SELECT 1", "--store", "sqlite:///s.db"],
            {"rejects": "r.csv", "sql_query": "SELECT 1", "store": "sqlite:///s.db"},
        ),
        (
            ["--refresh-days", "0", "--max-credits", "12.5", "--dry-run"],
            {"refresh_days": 0.0, "max_credits": 12.5, "dry_run": True},
        ),
        (
            [
                "--webhook-url",
                "https://h/x",
                "--credit-recheck-seconds",
                "5",
                "--pause-timeout-seconds",
                "60",
            ],
            {"webhook_url": "https://h/x", "credit_recheck_seconds": 5.0, "pause_timeout_seconds": 60},
        ),
        (
            ["--poll-timeout-seconds", "30", "--initial-poll-seconds", "6", "--max-concurrent-chunks", "4"],
            {"poll_timeout_seconds": 30.0, "initial_poll_seconds": 6.0, "max_concurrent_chunks": 4},
        ),
        (
            ["--retries", "2", "--retry-delay-seconds", "0.5", "--batch-rows", "1000"],
            {"retries": 2, "retry_delay_seconds": 0.5, "batch_rows": 1000},
        ),
        (
            ["--sheet", "Leads", "--encoding", "cp1251", "--raw-csv", "--api-outage-seconds", "60"],
            {"sheet": "Leads", "encoding": "cp1251", "raw_csv": True, "api_outage_seconds": 60.0},
        ),
        (
            ["--base-url", "http://127.0.0.1:1", "--rate-limit", "20/2", "--table", "t"],
            {"base_url": "http://127.0.0.1:1", "rate_limit": "20/2", "table": "t"},
        ),
    ],
)
def test_cli_flags_reach_the_flow_typed(argv: list[str], expected: dict[str, Any]) -> None:
    args = build_parser().parse_args(["run", "in.csv", "-o", "out.csv", *argv])
    kwargs = _flow_kwargs(args)
    assert kwargs == {"source": "in.csv", "output": "out.csv", **expected}
    EnrichOptions.from_parameters(kwargs)  # and the model accepts what the CLI produced


def test_every_option_has_help_text() -> None:
    assert all(field.description for field in FIELDS.values())


def test_prefect_yaml_and_serve_name_only_real_parameters() -> None:
    from cleanlist_prefect.deployments.serve import NIGHTLY_SETTINGS

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        if deployment["entrypoint"] == "flows/enrich_contacts.py:enrich_contacts":
            assert set(deployment.get("parameters") or {}) <= set(FIELDS), deployment["name"]
    assert set(NIGHTLY_SETTINGS) <= set(FIELDS)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"refresh_days": -1}, "refresh_days"),
        ({"max_credits": 0}, "max_credits"),
        ({"max_concurrent_chunks": TASK_RUNNER_WORKERS + 1}, "max_concurrent_chunks"),
        ({"max_concurrent_chunks": 0}, "max_concurrent_chunks"),
        ({"batch_rows": 0}, "batch_rows"),
        ({"enrichment_type": "everything"}, "enrichment_type"),
        ({"rate_limit": "fast"}, "rate limit"),
        ({"no_such_option": 1}, "no_such_option is not an option"),
        ({"source": ""}, "source"),
    ],
)
def test_bad_options_are_one_line_naming_the_option(change: dict[str, Any], named: str) -> None:
    with pytest.raises(InputError) as caught:
        EnrichOptions.from_parameters({"source": "in.csv", "output": "out.csv", **change})
    message = str(caught.value)
    assert named in message and "\n" not in message


def test_as_parameters_keeps_only_what_differs_from_the_defaults() -> None:
    options = EnrichOptions(source="s.csv", output="o.csv", refresh_days=0, mapping={"first_name": "F"})
    assert options.as_parameters() == {
        "source": "s.csv",
        "output": "o.csv",
        "refresh_days": 0.0,
        "mapping": {"first_name": "F"},
    }
    assert EnrichOptions.from_parameters(options.as_parameters()) == options


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_with_a_bad_option_fails_with_that_line(tmp_path: Path) -> None:
    from tests.flow_helpers import run_flow

    state, summary = run_flow(
        source=str(tmp_path / "in.csv"), output=str(tmp_path / "out.csv"), refresh_days=-2
    )
    assert state.is_failed()
    assert "refresh_days" in (state.message or "") and summary == {"status": "failed"}
    assert not (tmp_path / "out.csv").exists()
