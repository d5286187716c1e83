"""No process-global state a second run, a second key or a user's own flow could trip over (issue 20).

- a client given no limiter paces itself alone (no process-wide registry of limiters);
- the run's quieting of Prefect's task-run records touches only this package's tasks of this run;
- no codec error handler is registered for the whole process;
- the store's rate book is safe to share between threads.
"""

from __future__ import annotations

import codecs
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleanlist.client import CleanlistClient
from cleanlist.errors import APIConnectionError
from cleanlist.io.sources import iter_source
from cleanlist.ratelimit import Pace, RateLimiter
from cleanlist.run.options import EnrichOptions
from cleanlist.settings import RateLimit
from cleanlist.store import EnrichmentStore
from cleanlist_prefect.flows.credentials import CleanlistCredentials
from cleanlist_prefect.flows.enrich_contacts import _TASK_RUN_LOGGER, open_run


def test_clients_of_one_key_have_their_own_limiter_unless_given_one() -> None:
    first = CleanlistClient("same-key", base_url="http://127.0.0.1:9", rate_limit="1/60")
    second = CleanlistClient("same-key", base_url="http://127.0.0.1:9", rate_limit="1/60")
    # The one slot of the first client's window is taken: the second client still has its own.
    first.limiter.endpoint("enrich-bulk").acquire()
    assert second.limiter is not first.limiter
    assert second.limiter.endpoint("enrich-bulk").usage() == 0.0
    assert first.limiter.endpoint("enrich-bulk").usage() > 0.0
    shared = RateLimiter(RateLimit.parse("1/60"))
    third = CleanlistClient("same-key", base_url="http://127.0.0.1:9", limiter=shared)
    fourth = CleanlistClient("same-key", base_url="http://127.0.0.1:9", limiter=shared)
    assert third.limiter is fourth.limiter is shared
    for client in (first, second, third, fourth):
        client.close()


def test_credentials_blocks_clients_do_not_share_a_limiter() -> None:
    block = CleanlistCredentials(api_key="block-key", base_url="http://127.0.0.1:9", rate_limit="2/60")
    with block.get_client() as one, block.get_client() as other:
        assert one.limiter is not other.limiter


class _Caught(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def caught() -> Iterator[_Caught]:
    handler = _Caught()
    _TASK_RUN_LOGGER.addHandler(handler)
    level = _TASK_RUN_LOGGER.level
    _TASK_RUN_LOGGER.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        _TASK_RUN_LOGGER.removeHandler(handler)
        _TASK_RUN_LOGGER.setLevel(level)


def _task_failure(task_name: str) -> None:
    try:
        raise APIConnectionError("connection refused")
    except APIConnectionError:
        _TASK_RUN_LOGGER.error(
            "Task run failed with exception: %s",
            "APIConnectionError",
            exc_info=True,
            extra={"task_name": task_name, "flow_run_id": None},
        )


def test_a_runs_log_quieting_leaves_other_tasks_records_alone(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caught: _Caught
) -> None:
    monkeypatch.setenv("CLEANLIST_API_KEY", "quiet-key")
    monkeypatch.setenv("CLEANLIST_BASE_URL", "http://127.0.0.1:9")
    source = tmp_path / "in.csv"
    source.write_text("linkedin_url\nhttps://www.linkedin.com/in/a\n", encoding="utf-8")
    options = EnrichOptions.from_parameters(
        {
            "source": str(source),
            "output": str(tmp_path / "out.csv"),
            "store": f"sqlite:///{tmp_path}/store.db",
        }
    )
    filters_before = list(_TASK_RUN_LOGGER.filters)
    with open_run(options):
        _task_failure("my-own-task")  # a user's task, in the flow that runs the enrichment
        _task_failure("submit-chunk")  # the run's own task: its outage watch reports this once
    assert _TASK_RUN_LOGGER.filters == filters_before, "the run left its filter installed"
    names = [getattr(record, "task_name", None) for record in caught.records]
    assert names == ["my-own-task"]
    assert caught.records[0].exc_info is not None, "the user's record lost its traceback"
    _task_failure("submit-chunk")  # after the run: nothing of the run touches the logger any more
    names = [getattr(record, "task_name", None) for record in caught.records]
    assert names == ["my-own-task", "submit-chunk"]


def test_no_codec_error_handler_is_registered_for_the_process(tmp_path: Path) -> None:
    source = tmp_path / "mixed.csv"
    source.write_bytes("name,city\nRené,Köln\n".encode() + "Zoë,Zürich\n".encode("cp1252") + b"x\x81y,z\n")
    rows = [row for batch in iter_source(str(source)) for row in batch.frame.to_dict("records")]
    assert len(rows) == 3
    assert rows[0]["name"] == "René"
    for name in ("cleanlist-latin-1", "cleanlist_latin1", "cleanlist"):
        with pytest.raises(LookupError):
            codecs.lookup_error(name)


def test_the_store_rate_book_is_safe_to_share_between_threads(store: EnrichmentStore) -> None:
    book = store.rate_book("organization-threads")
    paces = [Pace("enrich-bulk", 40, 60.0)]
    granted: list[object] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        try:
            for _ in range(10):
                taken = book.take("enrich-bulk", paces)
                book.held_for("enrich-bulk")
                if taken.ticket is not None:
                    with lock:
                        granted.append(taken.ticket)
                    book.give_back(taken.ticket, ok=True)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(granted) == 40, "the book granted more (or fewer) slots than one window allows"
    assert book.used("enrich-bulk", 60.0) == 40
