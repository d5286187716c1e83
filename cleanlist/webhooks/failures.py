"""Why a delivery did not arrive: the API's deliveries log, asked once per overdue workflow.

A 200 from `POST /enrich/bulk` does not mean the webhook was delivered [doc, errors page]; the log
`GET /webhooks/deliveries?workflow_id=…` tells, per attempt, `delivered` or `failed` with the answer
code and an error message. A run asks it when a workflow's delivery is overdue, before polling:

- a delivered attempt: the receiver stored it (it acknowledges only then), so the inbox picks it up
  within moments: wait `settle` seconds, then poll only if it still has not;
- failed attempts with retries still to come (5 attempts [doc], waits 1, 2, 4, 8 s between them): wait
  for the rest of the schedule, during which the inbox keeps watching; poll only if none arrives;
- five failed attempts (failed for good): poll now;
- no attempt yet: most likely a workflow slower than the recent ones; it gets as long again as it has
  taken so far, then is polled.

Each workflow whose log shows a failed attempt is counted under the kind of its last failure, e.g.
`502 from https://hooks.example.com`; `lines()` says it for the report, with the likely cause. The
URL's path (which carries the run's receiver token) is never part of a kind. No Prefect here: the
flow emits the event.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from urllib.parse import urlsplit

from cleanlist.client import CleanlistClient
from cleanlist.errors import APIError, StoppedBeforeSending
from cleanlist.models import WebhookDeliveries, WebhookDelivery

logger = logging.getLogger("cleanlist.webhooks")

# Cleanlist's retries [doc]: 5 attempts (another page: "retries up to 5 times", i.e. 6 — a sixth attempt
# after the log showed five failures is still picked up by the inbox; the poll made meanwhile costs one
# status call, waiting 16 s more for every failed-for-good workflow would cost time on every run).
MAX_ATTEMPTS = 5
RETRY_WAITS_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0)
ATTEMPT_TIMEOUT_SECONDS = 10.0
NEVER_SENT = "no delivery attempt in the API's log"
NO_ATTEMPT_WAIT_CAP = 60.0


def origin_of(url: str | None) -> str:
    """`scheme://host[:port]` of a receiver URL: its path holds the token and is never shown."""
    if not url:
        return "the receiver"
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return "the receiver"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def _error_word(error: str | None) -> str:
    text = (error or "").lower()
    if "certificate" in text or "ssl" in text or "tls" in text:
        return "TLS error"
    if "timeout" in text or "timed out" in text or "did not answer within" in text:
        return "timeout"
    if "refused" in text or "connecterror" in text or "connect" in text:
        return "connection refused"
    if "resolve" in text or "name or service" in text or "nodename" in text or "getaddrinfo" in text:
        return "DNS failure"
    if "reset" in text or "closed" in text or "disconnect" in text:
        return "connection closed"
    return "no answer"


def failure_kind(attempt: WebhookDelivery, origin: str) -> str:
    """One failed attempt as a kind: `502 from https://h`, `timeout from https://h`, …"""
    if attempt.response_code is not None:
        return f"{attempt.response_code} from {origin}"
    return f"{_error_word(attempt.error)} from {origin}"


_CAUSE_OF_CODE = {
    "502": "your proxy or load balancer (the receiver behind it is down or slow)",
    "503": "your proxy or load balancer (the receiver behind it is down or slow)",
    "504": "your proxy or load balancer (the receiver behind it is down or slow)",
    "401": "your receiver or firewall refuses Cleanlist's addresses (allow-list)",
    "403": "your receiver or firewall refuses Cleanlist's addresses (allow-list)",
    "404": "wrong receiver URL (or a receiver that does not know the run)",
    "410": "wrong receiver URL (or a receiver that does not know the run)",
    "408": "your receiver refused the body",
    "413": "your receiver refused the body",
    "422": "your receiver refused the body",
}
_CAUSE_OF_ERROR = {
    "TLS error": "your receiver's TLS certificate (expired, self-signed or wrong name)",
    "timeout": "your receiver took longer than the 10 s Cleanlist waits",
    "connection refused": "your receiver was down or unreachable",
    "DNS failure": "the receiver's host name does not resolve",
    "connection closed": "your receiver closed the connection without an answer",
}


def likely_cause(kind: str) -> str:
    """What a kind most often means, in a few words."""
    word = kind.split(" from ", 1)[0]
    if word in _CAUSE_OF_CODE:
        return _CAUSE_OF_CODE[word]
    if word.isdigit():
        return (
            "your receiver failed (its store unavailable?)"
            if word.startswith("5")
            else ("your receiver refused the delivery")
        )
    return _CAUSE_OF_ERROR.get(word, "the receiver did not answer")


class DeliveryLog:
    """Asks the deliveries log for overdue workflows and tallies why deliveries failed (thread-safe)."""

    def __init__(
        self,
        client: CleanlistClient,
        webhook_url: str | None,
        *,
        retry_scale: float = 1.0,
        settle: float = 2.0,
        attempt_timeout: float = ATTEMPT_TIMEOUT_SECONDS,
    ) -> None:
        self._client = client
        self.origin = origin_of(webhook_url)
        self.retry_scale = retry_scale
        self.settle = settle
        self.attempt_timeout = attempt_timeout
        self._lock = threading.Lock()
        self.calls = 0
        self.failures: Counter[str] = Counter()  # kind → workflows whose last failed attempt was of it
        self.failed_for_good = 0  # workflows with failed attempts whose delivery never came: polled
        self.never_sent = 0  # workflows whose log showed no attempt and that were polled
        self._failing: set[str] = set()
        self._unattempted: set[str] = set()
        self._judged: set[str] = set()
        self.waited = 0  # workflows left to the inbox because a retry (or a delivered one) was still due

    def consult(self, workflow_id: str, elapsed: float = 0.0) -> float | None:
        """Seconds to leave `workflow_id` (submitted `elapsed` s ago) to the inbox before polling it, or
        None to poll now. The log is read once per workflow, or twice when the first answer showed no
        attempt yet; a workflow consulted again after the wait its log's attempts gave is polled."""
        with self._lock:
            judged = workflow_id in self._judged
            again = workflow_id in self._unattempted
            self._judged.add(workflow_id)
        if judged and not again:
            return None
        try:
            log = self._client.webhook_deliveries(workflow_id)
        except StoppedBeforeSending:
            raise
        except APIError as exc:
            logger.info("deliveries log of %s not read (%s); polling it", workflow_id, exc)
            return None
        finally:
            with self._lock:
                self.calls += 1
        verdict = self.judge(log, workflow_id, elapsed if not again else 0.0)
        return verdict

    def judge(self, log: WebhookDeliveries, workflow_id: str = "", elapsed: float = 0.0) -> float | None:
        """The decision `consult` takes for one answer of the log (counted in the tallies).

        No attempt yet most often means a workflow slower than the recent ones (Cleanlist attempts
        every delivery it has, at once): it gets as long again as it has taken so far (at most
        `NO_ATTEMPT_WAIT_CAP`), then is polled without asking again.
        """
        failed = [attempt for attempt in log.deliveries if attempt.failed]
        with self._lock:
            self._judged.add(workflow_id)
            self._unattempted.discard(workflow_id)
            if failed:
                self.failures[failure_kind(failed[-1], self.origin)] += 1
                self._failing.add(workflow_id)
            if log.delivered:
                self.waited += 1
                return self.settle
            if not log.deliveries:
                if elapsed <= 0:  # nothing to go by, or asked again and still no attempt: poll
                    return None
                self._unattempted.add(workflow_id)
                return min(max(elapsed, self.settle), NO_ATTEMPT_WAIT_CAP)
            attempts = max(len(log.deliveries), max((a.attempt or 0) for a in log.deliveries))
            if attempts >= MAX_ATTEMPTS:
                return None
            self.waited += 1
        waits = sum(RETRY_WAITS_SECONDS[attempts - 1 : MAX_ATTEMPTS - 1]) * self.retry_scale
        last = failed[-1] if failed else None
        slow = last is not None and last.response_code is None and _error_word(last.error) == "timeout"
        timeouts = (MAX_ATTEMPTS - attempts) * self.attempt_timeout if slow else 0.0
        return waits + timeouts + self.settle

    def polled(self, workflow_id: str) -> None:
        """The run polled `workflow_id` after asking the log: its delivery never came."""
        with self._lock:
            if workflow_id in self._failing:
                self.failed_for_good += 1
            elif workflow_id in self._judged:
                self.never_sent += 1  # (or delivered per the log yet not in the store: rare)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.failures.most_common())

    def lines(self) -> list[str]:
        """One line per failure kind, most frequent first: `12 deliveries failed: 502 from … — cause`."""
        out = []
        for kind, count in self.counts().items():
            noun = "delivery" if count == 1 else "deliveries"
            out.append(f"{count} {noun} failed: {kind} — {likely_cause(kind)}")
        if self.never_sent:
            noun = "workflow" if self.never_sent == 1 else "workflows"
            out.append(f"{self.never_sent} {noun} polled with {NEVER_SENT}")
        return out
