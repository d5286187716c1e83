"""Sources and outputs on object storage: S3 through s3fs against moto's local S3 server, credentials from
a prefect-aws AwsCredentials block (never in a parameter), plain storage_options, and the refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.flow_helpers import messy_export, run_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")

ACCESS_KEY = "AKIAMOTOTESTKEY00001"
SECRET_KEY = "moto-Secret-Access-Key-never-shown-42"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server on a free local port, with the bucket `crm`."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    ).create_bucket(Bucket="crm")
    yield endpoint
    server.stop()


def _s3(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        key=ACCESS_KEY,
        secret=SECRET_KEY,
        endpoint_url=endpoint,
        client_kwargs={"region_name": "us-east-1"},
        skip_instance_cache=True,
    )


def test_source_and_output_on_s3_with_credentials_from_a_block(
    tmp_path: Path, make_sandbox, api_env, s3_endpoint: str
) -> None:
    from prefect_aws import AwsClientParameters, AwsCredentials

    api_env(make_sandbox(rate_limit=None, latency=0.0))
    AwsCredentials(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint),
    ).save("crm-bucket", overwrite=True, _sync=True)
    s3 = _s3(s3_endpoint)
    s3.put_file(str(messy_export(tmp_path / "crm.csv", unique=30, invalid=2)), "crm/in/contacts.csv")

    state, summary = run_flow(
        source="s3://crm/in/contacts.csv",
        output="s3://crm/out/enriched.parquet",
        store=f"sqlite:///{tmp_path / 's.db'}",
        storage_credentials="block:aws-credentials/crm-bucket",
    )
    assert state.is_completed(), state.message
    assert summary["output"] == "s3://crm/out/enriched.parquet"

    with s3.open("crm/out/enriched.parquet", "rb") as fh:
        enriched = pd.read_parquet(fh)
    with s3.open("crm/out/enriched.rejects.csv", "rb") as fh:
        rejects = pd.read_csv(fh, dtype=str)
    assert len(enriched) == 30 and len(rejects) == 2  # every input row, in one of the two
    assert sorted(s3.ls("crm/out")) == ["crm/out/enriched.parquet", "crm/out/enriched.rejects.csv"]

    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        texts = [run.model_dump_json() for run in client.read_flow_runs(limit=200)]
        texts += [log.message for log in client.read_logs()]
    assert flow_run.parameters["storage_credentials"] == "block:aws-credentials/crm-bucket"
    for text in texts:
        assert SECRET_KEY not in text


def test_storage_options_reach_the_filesystem_for_source_and_output(
    tmp_path: Path, make_sandbox, api_env, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No block: the key pair from the environment (as on a worker with an instance role), the endpoint
    # and region as plain options. Without the endpoint the run would go to AWS itself and fail.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    api_env(make_sandbox(rate_limit=None, latency=0.0))
    s3 = _s3(s3_endpoint)
    s3.put_file(str(messy_export(tmp_path / "crm.csv", unique=12, tag="o")), "crm/opts/contacts.csv")

    state, _ = run_flow(
        source="s3://crm/opts/contacts.csv",
        output="s3://crm/opts/enriched.csv",
        store=f"sqlite:///{tmp_path / 's.db'}",
        storage_options={"endpoint_url": s3_endpoint, "client_kwargs": {"region_name": "us-east-1"}},
    )
    assert state.is_completed(), state.message
    with s3.open("crm/opts/enriched.csv", "rb") as fh:
        assert len(pd.read_csv(fh, dtype=str)) == 12


def test_a_memory_url_round_trips_with_storage_options(tmp_path: Path, make_sandbox, api_env) -> None:
    import fsspec

    api_env(make_sandbox(rate_limit=None, latency=0.0))
    source = messy_export(tmp_path / "crm.csv", unique=8)
    with fsspec.open("memory://storage-opts/in.csv", "wb") as fh:
        fh.write(source.read_bytes())
    state, _ = run_flow(
        source="memory://storage-opts/in.csv",
        output="memory://storage-opts/out.jsonl",
        store=f"sqlite:///{tmp_path / 's.db'}",
        storage_options={"skip_instance_cache": False},
    )
    assert state.is_completed(), state.message
    with fsspec.open("memory://storage-opts/out.jsonl", "rb") as fh:
        assert len(pd.read_json(fh, lines=True)) == 8


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (
            {"storage_options": {"secret": "pasted-by-mistake"}},
            "storage_options must not hold credentials (secret)",
        ),
        (
            {"storage_credentials": "s3://crm"},
            "write block:aws-credentials/NAME or block:gcp-credentials/NAME",
        ),
        (
            {"storage_credentials": "block:aws-credentials/nowhere"},
            "no aws-credentials block named 'nowhere'",
        ),
    ],
)
def test_storage_credentials_problems_are_one_line(
    tmp_path: Path, make_sandbox, api_env, parameters: dict[str, Any], expected: str
) -> None:
    pytest.importorskip("prefect_aws")
    api_env(make_sandbox(rate_limit=None, latency=0.0))
    source = messy_export(tmp_path / "crm.csv", unique=3)
    state, _ = run_flow(source=str(source), output=str(tmp_path / "out.csv"), **parameters)
    assert state.is_failed()
    assert expected in state.message and "\n" not in state.message
    assert SECRET_KEY not in state.message


def test_the_cli_takes_storage_options_as_a_json_object(capsys) -> None:
    from cleanlist_prefect.deployments.cli import _flow_kwargs, build_parser

    argv = ["run", "s3://crm/in.csv", "-o", "s3://crm/out.csv", "--storage-options", '{"anon": true}']
    assert _flow_kwargs(build_parser().parse_args(argv))["storage_options"] == {"anon": True}
    with pytest.raises(SystemExit, match="--storage-options expects a JSON object"):
        _flow_kwargs(build_parser().parse_args([*argv[:-1], "anon=true"]))
