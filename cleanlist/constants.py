"""Every tunable number of the client in one place (delays in seconds)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BASE_URL = "https://api.cleanlist.ai"
API_PREFIX = "/api/v1/public"
DEFAULT_RATE_LIMIT = "60/60"

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
WRITE_TIMEOUT = 30.0
POOL_TIMEOUT = 30.0
# The balance read as a run ends (for its report) gives up sooner: a slow answer is not worth a wait.
BALANCE_READ_TIMEOUT = 5.0

MAX_CONTACTS_PER_REQUEST = 250

# Retry-After values above this are treated as "no hint"; a server asking for an hour is broken or
# hostile, and the task's own backoff is the better guide then.
RETRY_AFTER_CAP = 300.0
# The retry policy (cleanlist/retry.py): transient errors back off from INITIAL_RETRY_DELAY, doubling up to
# MAX_RETRY_DELAY, each delay spread by ±RETRY_JITTER_FACTOR (so waiting chunks do not return together),
# for RETRIES tries after the first. A 429 with a Retry-After waits exactly that long (the limiter holds the
# endpoint for everyone meanwhile) and may be retried RATE_LIMIT_RETRIES times beyond RETRIES: a run that
# learns the API's limit meets a few of them without anything being wrong.
RETRIES = 5
INITIAL_RETRY_DELAY = 2.0
MAX_RETRY_DELAY = 60.0
RETRY_JITTER_FACTOR = 0.5
RATE_LIMIT_RETRIES = 3

# The client-side limiter spaces requests over a window slightly longer than the server's. Its slots
# count from each request's answer, which the server can only send after counting the request, so send
# and network jitter need no margin; this one covers the two machines' clocks running at slightly
# different rates (0.2 % of the window, capped at 1 s; it was 2 % while slots counted from the send).
RATE_WINDOW_MARGIN_FRACTION = 0.002
RATE_WINDOW_MARGIN_CAP = 1.0
# Learning the API's unpublished limits (cleanlist/ratelimit.py). Until an endpoint has been refused once
# or served a full window clean, at most PROBE_IN_FLIGHT of its requests are in flight. The counts served
# before several 429s "agree" within RATE_LEARN_TOLERANCE (10 %, rounded down: exactly below ten).
# `auto` never grows past AUTO_RATE_CAP per window. A learned limit is a count in a measured window: each
# 429 bounds where the server's window resets (a Retry-After of a second or more is whole seconds rounded
# up: the reset may be up to RATE_WINDOW_ROUNDING earlier), two resets bound the window's length, and
# measures of different windows agree when their counts agree and their bounds overlap. A limit settled
# in a run probes one request above itself after RATE_RECHECK_WINDOWS clean windows at its edge (the
# spacing doubles after each probe the API refuses), so a limit the API raised is found again. Learned
# limits are kept in the store for LEARNED_RATE_TTL seconds only as the next run's starting point: a run
# paces by one as it is for RATE_STORED_RECHECK_SECONDS (a short run pays no 429 for it), then re-checks
# it (grows from it until its own 429s settle it), so an hour is plenty.
PROBE_IN_FLIGHT = 1
RATE_LEARN_TOLERANCE = 0.1
RATE_WINDOW_ROUNDING = 1.0
RATE_RECHECK_WINDOWS = 20
RATE_STORED_RECHECK_SECONDS = 10.0
AUTO_RATE_CAP = 10_000
LEARNED_RATE_TTL = 3600.0

# The status poller (cleanlist/poller.py). Its estimate of when a workflow is done settles where
# POLL_SHRINK / (POLL_SHRINK + POLL_GROW) ≈ 5 % of first polls come too early (about 1.05 status calls
# per workflow). The first probe goes out at POLL_FIRST_PROBE_FRACTION of the initial guess; until both
# a "done" and a "not yet" have been seen, each "done" halves the estimate and each "not yet" raises it:
# by POLL_SEARCH_STEP_NEAR while it is below the initial guess (the guess is probably about right, and
# overshooting the truth delays every status call of the run), by POLL_SEARCH_FACTOR beyond it.
POLL_SHRINK = 0.03
POLL_GROW = 0.57
POLL_FIRST_PROBE_FRACTION = 0.25
POLL_SEARCH_FACTOR = 2.0
POLL_SEARCH_STEP_NEAR = 1.25
# A "done" from a first poll made this much later than the estimate (the status budget was busy) says
# nothing about the estimate and is not learned from.
POLL_LATE_TOLERANCE = 0.25
# A workflow still running at its poll is polled again at this much more elapsed time (capped by the
# poller's max_interval between polls).
POLL_RETRY_GROWTH = 0.25
# The status budget counts as busy when this share of it was spent within the last window; the
# estimate is then never lowered (an early poll would take a call that a finished workflow needs).
POLL_BUSY_USAGE = 0.75
# Threads making status calls: a burst of workflows due together is fetched in parallel (each call
# still takes a slot of the status limiter); a 250-result answer takes tens of milliseconds to fetch.
POLL_WORKERS = 4
# Workflows whose results were fetched but not yet handed to the callback (stored); a poll worker that
# would exceed this waits. Each holds a full status answer (up to 250 results) in memory.
POLL_PENDING_RESULTS = 8
# A workflow this run just submitted that answers 404 may not be visible yet [assumed]: it is polled again
# for this long before its tasks are asked for one by one. Resumed workflows get no grace.
POLL_NOT_FOUND_GRACE = 30.0  # the default of EnrichOptions.not_found_grace_seconds
# A workflow answering a status word that is neither final nor known to be in progress, with no results,
# is polled this many times (at growing intervals) before it is left unresolved for a later run.
POLL_UNKNOWN_WORD_POLLS = 5


# Prices live here, not in cleanlist/models.py (which re-exports them), so the run report and
# `cleanlist-enrich report` read them without building the API's pydantic models.
@dataclass(frozen=True)
class Pricing:
    """Credits charged per found item for one enrichment type (failed lookups cost 0)."""

    per_email: float = 0.0
    per_phone: float = 0.0
    per_prospect: float = 0.0
    published_per_lead: float = 0.0
    """A flat price per lead where a page publishes one (`full`: 11 [doc, enrichment-types page and
    glossary]); the worst case is never below it, whichever reading the API bills by."""

    @property
    def worst_case_per_contact(self) -> float:
        return max(self.per_email + self.per_phone + self.per_prospect, self.published_per_lead)


# Documented pricing. "Per phone found" is read as per contact whose phone lookup found something.
# The credit cap and the dry-run estimate use `worst_case_per_contact`: the published worst case per
# enrichment type (`full` = 11 per lead under both published readings; `prospecting_only` has no
# published ceiling per contact, 1 per discovered contact is the documented price).
PRICING: dict[str, Pricing] = {
    "none": Pricing(),
    "partial": Pricing(per_email=1.0),
    "phone_only": Pricing(per_phone=10.0),
    "full": Pricing(per_email=1.0, per_phone=10.0, published_per_lead=11.0),
    "prospecting_only": Pricing(per_prospect=1.0),
}
