"""Independent stand-in for the "Cleanlist v1 Public API" (base path /api/v1/public).

Written from the API's description alone, without this project's sandbox or client in view, to check
the pipeline against an implementation it was not built with: windows aligned on the wall clock,
requests answered concurrently, per-task results in another shape (`result: {email, …}`). See
benchmarks/README.md, "An independent stand-in".

Run:  python -m benchmarks.standin --port 8765 --rate-limit 20/2 --latency 0.5-1.5 --key clapi_<64 chars>

Single process, single asyncio loop. Handlers never await between reading and
mutating shared state, so no locks are needed.
Admin (no auth): GET /_standin/stats, POST /_standin/reset[?all=true].
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

PREFIX = "/api/v1/public"
FIELDS = ("first_name", "last_name", "company_domain", "company_name", "linkedin_url")
MAX_CONTACTS = 250
START_CREDITS = 10_000_000.0
DEFAULT_KEY = "clapi_" + hashlib.sha256(b"cleanlist-standin").hexdigest()  # 64 hex chars


@dataclass
class Config:
    key: str = DEFAULT_KEY
    rate_n: int = 20
    rate_w: float = 2.0
    lat_lo: float = 0.5
    lat_hi: float = 1.5


@dataclass
class Workflow:
    id: str
    enrichment_type: str
    contacts: list[dict[str, Any]]
    task_ids: list[str]
    accepted_at: float
    done_at: float
    results: list[dict[str, Any]] | None = None  # filled once settled (at done_at)
    completed_at: str | None = None


@dataclass
class Stats:
    responses: dict[str, dict[int, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    contacts_accepted: int = 0
    duplicate_acceptances: int = 0  # contacts accepted whose tuple was already accepted in another workflow
    seen: dict[tuple[str | None, ...], str] = field(default_factory=dict)  # tuple -> first workflow id
    dup_tuples: set[tuple[str | None, ...]] = field(default_factory=set)
    workflows: int = 0
    first_bulk_request_at: float | None = None
    first_bulk_accepted_at: float | None = None
    last_completed_status_at: float | None = None


class State:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stats = Stats()
        self.workflows: dict[str, Workflow] = {}
        self.task_index: dict[str, tuple[str, int]] = {}
        self.windows: dict[tuple[str, str], tuple[int, int]] = {}  # (key, endpoint) -> (window idx, count)
        self.credits = START_CREDITS


CFG = Config()
S = State(CFG)
app = FastAPI(title="Cleanlist stand-in", docs_url=None, redoc_url=None, openapi_url=None)


def reply(ep: str, code: int, body: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    S.stats.responses[ep][code] += 1
    return JSONResponse(body, status_code=code, headers=headers)


def gate(request: Request, ep: str) -> JSONResponse | None:
    """Auth, then fixed-window rate limit per (key, endpoint). Returns an error response or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token.strip() != S.cfg.key:
        return reply(ep, 401, {"detail": "Not authenticated"}, {"WWW-Authenticate": "Bearer"})
    now = time.time()
    w = S.cfg.rate_w
    idx = math.floor(now / w)
    cur_idx, count = S.windows.get((token, ep), (idx, 0))
    if cur_idx != idx:
        count = 0
    if count >= S.cfg.rate_n:
        retry = max(1, math.ceil((idx + 1) * w - now))
        return reply(ep, 429, {"detail": "Rate limit exceeded"}, {"Retry-After": str(retry)})
    S.windows[(token, ep)] = (idx, count + 1)
    return None


def _s(c: dict[str, Any], k: str) -> str | None:
    v = c.get(k)
    return v.strip() if isinstance(v, str) and v.strip() else None


def contact_key(c: dict[str, Any]) -> tuple[str | None, ...]:
    return tuple(_s(c, k) for k in FIELDS)


def contact_error(c: Any) -> str | None:
    if not isinstance(c, dict):
        return "Contact must be an object"
    if _s(c, "linkedin_url") or (
        _s(c, "first_name") and _s(c, "last_name") and (_s(c, "company_domain") or _s(c, "company_name"))
    ):
        return None
    return "Contact must have linkedin_url, or first_name + last_name + (company_domain or company_name)"


def enrich(c: dict[str, Any]) -> dict[str, Any] | None:
    """Deterministic: ~80 % of contacts (by hash of the identity tuple) get an email."""
    k = contact_key(c)
    h = hashlib.sha256(json.dumps(k).encode()).digest()
    if int.from_bytes(h[:4], "big") % 100 >= 80:
        return None

    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9]+", "", text.lower())

    first, last, domain, company, linkedin = k
    if first and last:
        local = f"{slug(first)}.{slug(last)}"
    else:
        m = re.search(r"/in/([^/?#]+)", linkedin or "")
        local = slug(m.group(1)) if m else "contact" + h.hex()[:8]
    dom = (domain or "").lower().removeprefix("www.") or (
        slug(company) + ".com" if company else "example.com"
    )
    return {"email": f"{local or 'contact'}@{dom}", "email_status": "valid", "phone": None}


def settle(wf: Workflow, now: float) -> bool:
    """Finish a workflow once its time has come; charges credits once. Returns True if completed."""
    if wf.results is None and now >= wf.done_at:
        wf.results = []
        for tid, c in zip(wf.task_ids, wf.contacts, strict=True):
            r = enrich(c)
            wf.results.append(
                {
                    "task_id": tid,
                    "status": "completed" if r else "failed",
                    "contact": c,
                    "result": r or {"email": None, "email_status": None, "phone": None},
                }
            )
        S.credits -= sum(1 for r in wf.results if r["status"] == "completed")
        wf.completed_at = datetime.fromtimestamp(wf.done_at, UTC).isoformat()
    return wf.results is not None


@app.get(PREFIX + "/auth/validate-key")
async def validate_key(request: Request) -> JSONResponse:
    ep = "validate-key"
    return gate(request, ep) or reply(
        ep, 200, {"valid": True, "user_id": "user_1", "organization_id": "org_1"}
    )


@app.get(PREFIX + "/credits/balance")
async def credits_balance(request: Request) -> JSONResponse:
    ep = "credits-balance"
    if err := gate(request, ep):
        return err
    now = time.time()
    for wf in S.workflows.values():
        settle(wf, now)
    return reply(ep, 200, {"organization_id": "org_1", "credits": float(S.credits)})


@app.post(PREFIX + "/enrich/bulk")
async def enrich_bulk(request: Request) -> JSONResponse:  # noqa: PLR0911 - one return per documented answer
    ep = "enrich-bulk"
    if S.stats.first_bulk_request_at is None:
        S.stats.first_bulk_request_at = time.time()
    if err := gate(request, ep):
        return err
    try:
        body = json.loads(await request.body())
    except ValueError:
        return reply(
            ep, 422, {"detail": [{"loc": ["body"], "msg": "Invalid JSON body", "type": "value_error"}]}
        )
    if not isinstance(body, dict) or not isinstance(body.get("contacts"), list):
        return reply(
            ep,
            422,
            {
                "detail": [
                    {"loc": ["body", "contacts"], "msg": "Field required (list)", "type": "value_error"}
                ]
            },
        )
    etype = body.get("enrichment_type", "partial")
    if etype not in ("partial", "full"):
        return reply(
            ep,
            422,
            {
                "detail": [
                    {
                        "loc": ["body", "enrichment_type"],
                        "msg": "Input should be 'partial' or 'full'",
                        "type": "value_error",
                    }
                ]
            },
        )
    contacts: list[Any] = body["contacts"]
    if not 1 <= len(contacts) <= MAX_CONTACTS:
        return reply(
            ep,
            400,
            {"detail": f"contacts must contain between 1 and {MAX_CONTACTS} items (got {len(contacts)})"},
        )
    errors = [
        {"loc": ["body", "contacts", i], "msg": m, "type": "value_error"}
        for i, c in enumerate(contacts)
        if (m := contact_error(c))
    ]
    if errors:
        return reply(ep, 422, {"detail": errors})
    now = time.time()
    wf = Workflow(
        id=f"public_bulk_{uuid.uuid4()}",
        enrichment_type=etype,
        contacts=contacts,
        task_ids=[str(uuid.uuid4()) for _ in contacts],
        accepted_at=now,
        done_at=now + random.uniform(S.cfg.lat_lo, S.cfg.lat_hi),
    )
    S.workflows[wf.id] = wf
    for i, tid in enumerate(wf.task_ids):
        S.task_index[tid] = (wf.id, i)
    st = S.stats
    st.workflows += 1
    st.contacts_accepted += len(contacts)
    st.first_bulk_accepted_at = st.first_bulk_accepted_at or now
    for k, n in Counter(contact_key(c) for c in contacts).items():  # repeats inside one workflow don't count
        if k in st.seen:
            st.duplicate_acceptances += n
            st.dup_tuples.add(k)
        else:
            st.seen[k] = wf.id
    return reply(
        ep,
        200,
        {
            "workflow_id": wf.id,
            "status": "processing",
            "message": "Bulk enrichment started",
            "task_ids": wf.task_ids,
            "total_contacts": len(contacts),
        },
    )


@app.get(PREFIX + "/enrich/status")
async def enrich_status(
    request: Request, workflow_id: str | None = None, task_id: str | None = None
) -> JSONResponse:
    ep = "enrich-status"
    if err := gate(request, ep):
        return err
    if bool(workflow_id) == bool(task_id):
        return reply(ep, 400, {"detail": "Provide exactly one of workflow_id or task_id"})
    idx: int | None = None
    if task_id:
        if task_id not in S.task_index:
            return reply(ep, 404, {"detail": "Task not found"})
        workflow_id, idx = S.task_index[task_id]
    wf = S.workflows.get(workflow_id or "")
    if wf is None:
        return reply(ep, 404, {"detail": "Workflow not found"})
    out: dict[str, Any] = {
        "workflow_id": wf.id,
        "status": "processing",
        "enrichment_type": wf.enrichment_type,
        "total_contacts": len(wf.contacts),
        "results": [],
    }
    if settle(wf, time.time()):
        assert wf.results is not None
        results = wf.results if idx is None else [wf.results[idx]]
        done = sum(1 for r in results if r["status"] == "completed")
        out.update(
            status="completed",
            completed_at=wf.completed_at,
            results=results,
            summary={"total": len(results), "completed": done, "failed": len(results) - done},
        )
        if idx is None:
            S.stats.last_completed_status_at = time.time()
    return reply(ep, 200, out)


@app.get("/_standin/stats")
async def stats() -> dict[str, Any]:
    st = S.stats
    span = (
        st.last_completed_status_at - st.first_bulk_request_at
        if st.last_completed_status_at and st.first_bulk_request_at
        else None
    )
    return {
        "responses": {
            ep: {str(c): n for c, n in sorted(codes.items())} for ep, codes in st.responses.items()
        },
        "contacts_accepted": st.contacts_accepted,
        "distinct_contacts_accepted": len(st.seen),
        "contacts_accepted_more_than_once": len(st.dup_tuples),
        "duplicate_acceptances": st.duplicate_acceptances,
        "workflows": st.workflows,
        "first_bulk_request_at": st.first_bulk_request_at,
        "first_bulk_accepted_at": st.first_bulk_accepted_at,
        "last_completed_status_at": st.last_completed_status_at,
        "elapsed_first_bulk_to_last_completed": span,
        "credits": S.credits,
        "config": {"rate_limit": f"{S.cfg.rate_n}/{S.cfg.rate_w:g}", "latency": [S.cfg.lat_lo, S.cfg.lat_hi]},
    }


@app.post("/_standin/reset")
async def reset(all: bool = False) -> dict[str, Any]:
    """Clear stats. With ?all=true also forget workflows, rate-limit windows and restore credits."""
    S.stats = Stats()
    if all:
        S.workflows.clear()
        S.task_index.clear()
        S.windows.clear()
        S.credits = START_CREDITS
    return {"reset": True, "all": all}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--rate-limit", default="20/2", help="N/W: N requests per W seconds per endpoint")
    p.add_argument("--latency", default="0.5-1.5", help="LO-HI seconds (or a single number)")
    p.add_argument("--key", default=DEFAULT_KEY)
    a = p.parse_args()
    n, w = a.rate_limit.split("/")
    lo, _, hi = a.latency.partition("-")
    CFG.key, CFG.rate_n, CFG.rate_w = a.key, int(n), float(w)
    CFG.lat_lo, CFG.lat_hi = float(lo), float(hi or lo)
    if not re.fullmatch(r"clapi_.{64}", CFG.key):
        print(f"warning: key {CFG.key!r} is not of the form clapi_<64 chars>")
    import uvicorn

    uvicorn.run(app, host=a.host, port=a.port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
