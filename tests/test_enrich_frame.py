"""The Python API: `enrich_dataframe` over the sandbox, the README's example run as written."""

from __future__ import annotations

import inspect
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from prefect.client.orchestration import get_client

from cleanlist.run.options import EnrichOptions
from cleanlist.store import EnrichmentStore
from cleanlist_prefect import EnrichedFrame, enrich_dataframe
from flows.enrich_frame import _enrich_dataframe
from tests.flow_helpers import FAST

pytestmark = pytest.mark.usefixtures("prefect_harness")

README = Path(__file__).resolve().parent.parent / "README.md"
# Options that name files or tables: the frame flow owns its source and destinations (a dry run would
# return no frames; a frame has no identity to keep a cursor mark under).
NOT_FOR_FRAMES = {
    *("source", "output", "rejects", "table", "sql_query", "sheet", "encoding", "raw_csv"),
    *("dry_run", "cursor", "full_refresh", "cursor_type", "storage_options", "storage_credentials"),
}


def readme_example() -> str:
    """The first python block of the README's "Use it from your own flow" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use it from your own flow", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the README section lost its example"
    return block.group(1)


def leftover_frame_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("cleanlist-frame-*")}


def test_readme_example_returns_every_row(
    tmp_path: Path, make_sandbox: Any, api_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("CLEANLIST_STORE_URL", store_url)
    # A contact sent with its subdomain would be refused (quarantined into the rejects).
    sandbox.refuse_contacts_containing("blog.acme")
    before = leftover_frame_folders()

    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    leads: pd.DataFrame = namespace["load_leads"]()
    enriched = namespace["enrich_leads"]()

    assert isinstance(enriched, EnrichedFrame)
    assert len(enriched.output) + len(enriched.rejects) == len(leads)
    assert sorted([*enriched.output.index, *enriched.rejects.index]) == list(leads.index)
    assert list(enriched.rejects["crm_id"]) == [104]  # "Solo": no last name, no company
    jane = enriched.output.loc[enriched.output["crm_id"] == 101].iloc[0]
    assert jane["Website"] == "https://blog.acme.co.uk/about"  # the user's column as given
    assert jane["cleanlist_status"] in {"enriched", "not_found"}  # answered, not refused
    assert enriched.output["crm_id"].dtype == leads["crm_id"].dtype
    assert enriched.summary.status == "completed"
    assert enriched.summary.rows_read == len(leads)
    with EnrichmentStore(store_url) as store:
        keys = ["nm:jane|doe|acme.co.uk", "nm:li|wei|initech.com"]
        assert set(store.results(keys, "partial")) == set(keys)
    assert leftover_frame_folders() <= before


async def _stored_parameters(flow_name: str) -> list[dict[str, Any]]:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async with get_client() as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    return [run.parameters for run in runs]


def test_an_arrow_table_on_its_own_keeps_its_contacts_out_of_the_prefect_database(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    rows = 300  # two chunks
    table = pa.table(
        {
            "first_name": [f"Secretname{i}" for i in range(rows)],
            "last_name": [f"Lee{i}" for i in range(rows)],
            "company_domain": [f"www.co{i}.example" if i % 7 else "not a domain" for i in range(rows)],
        }
    )
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    enriched = enrich_dataframe(table, store=store_url, **FAST)

    assert len(enriched.output) + len(enriched.rejects) == rows
    assert len(enriched.rejects) == len(range(0, rows, 7))
    assert set(enriched.rejects["reject_code"]) == {"missing_fields"}
    assert enriched.summary.submitted == rows - len(enriched.rejects)
    assert enriched.summary.output == "<Table: 300 rows x 3 columns>"

    import asyncio

    stored = asyncio.run(_stored_parameters("enrich-dataframe"))
    assert "<Table: 300 rows x 3 columns>" in [parameters.get("frame") for parameters in stored]
    assert all(str(parameters["frame"]).startswith("<") for parameters in stored)  # every run's: a shape
    assert "Secretname" not in repr(stored)

    # A second run pays for nothing: every contact comes from the store.
    again = enrich_dataframe(table, store=store_url, **FAST)
    assert again.summary.submitted == 0
    assert again.summary.fresh_in_store == rows - len(enriched.rejects)


def test_a_revoked_key_fails_the_flow_with_one_line_and_leaves_no_file(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    sandbox.revoke_key()
    before = leftover_frame_folders()
    frame = pd.DataFrame({"First Name": ["Jane"], "Last Name": ["Doe"], "Website": ["acme.com"]})

    state = enrich_dataframe(frame, store=f"sqlite:///{tmp_path / 'store.db'}", return_state=True, **FAST)

    assert state.is_failed()
    assert state.message is not None and "run stopped before submitting anything" in state.message
    assert "\n" not in state.message
    with pytest.raises(Exception, match="run stopped before submitting anything"):
        enrich_dataframe(frame, store=f"sqlite:///{tmp_path / 'store.db'}", **FAST)
    assert leftover_frame_folders() <= before


def test_the_frame_on_disk_is_private(tmp_path: Path) -> None:
    from flows.enrich_frame import as_arrow, private_folder, write_private_parquet

    with private_folder() as folder:
        written = write_private_parquet(as_arrow(pd.DataFrame({"a": [1, "x"]})), folder / "in.parquet")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert not folder.exists()


def test_parameters_match_the_options_model() -> None:
    parameters = inspect.signature(_enrich_dataframe).parameters
    fields = EnrichOptions.model_fields
    assert set(parameters) - {"frame"} == set(fields) - NOT_FOR_FRAMES
    for name, parameter in parameters.items():
        if name != "frame":
            assert parameter.default == fields[name].default, name
