"""The HTTP reward server: one scorer behind FastAPI.

Routes:
  POST /score   {"prompts": [str], "completions": [str]}
                -> {"scores": [float], "scorer": str, "elapsed_s": float}
  GET  /health  -> {"status": "ok", "scorer": str}
  GET  /metrics -> Prometheus text: requests, items scored, scoring latency

/score is a sync endpoint, so FastAPI runs it in its thread pool and /health
(async, on the event loop) answers while a batch is being scored.  A lock lets
one batch score at a time: concurrent batches would only split the same cores.
Bad requests get 422 (413 for a batch above `max_batch`) with a body that
names the field and says what the server expects.
"""

from __future__ import annotations

import threading
import time

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, StrictStr, model_validator
from starlette.responses import Response

from reward_service.scorers import Scorer


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[StrictStr]  # (B,)
    completions: list[StrictStr]  # (B,), completions[i] continues prompts[i]

    @model_validator(mode="after")
    def _same_length(self) -> "ScoreRequest":
        if len(self.prompts) != len(self.completions):
            raise ValueError(
                f"prompts and completions must have the same length, got "
                f"{len(self.prompts)} prompts and {len(self.completions)} completions; "
                "send exactly one completion per prompt"
            )
        return self


class ScoreResponse(BaseModel):
    scores: list[float]  # (B,)
    scorer: str
    elapsed_s: float  # time spent in the scorer


def create_app(scorer: Scorer, max_batch: int = 4096) -> FastAPI:
    """A FastAPI app serving `scorer`; batches above `max_batch` items get 413."""
    app = FastAPI(title="Flywheel reward service")
    expected = (
        f'POST /score expects JSON {{"prompts": [str, ...], "completions": [str, ...]}}: '
        f"two lists of strings of equal length, at most {max_batch} items"
    )
    # A registry per app, so that several apps (tests) can live in one process.
    registry = CollectorRegistry()
    requests = Counter(
        "reward_requests", "Score requests, by outcome", ["outcome"], registry=registry
    )
    items = Counter("reward_items_scored", "Items scored", registry=registry)
    latency = Histogram("reward_score_seconds", "Time spent scoring one request", registry=registry)
    score_lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        requests.labels(outcome="rejected").inc()
        # Drop pydantic's echo of the input: it can be the whole batch.
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": detail, "expected": expected})

    @app.post("/score", response_model=ScoreResponse)
    def score(req: ScoreRequest) -> ScoreResponse:
        if len(req.prompts) > max_batch:
            requests.labels(outcome="rejected").inc()
            raise HTTPException(
                status_code=413,
                detail=(
                    f"batch of {len(req.prompts)} items exceeds the server's max_batch "
                    f"{max_batch}; split it (RewardClient(batch_size=...)) or start the "
                    "server with a larger --max-batch"
                ),
            )
        start = time.perf_counter()
        try:
            with score_lock:
                scores = scorer.score(req.prompts, req.completions)
        except Exception as exc:
            requests.labels(outcome="error").inc()
            raise HTTPException(
                status_code=500, detail=f"scorer {scorer.name} failed: {type(exc).__name__}: {exc}"
            ) from exc
        elapsed = time.perf_counter() - start
        requests.labels(outcome="ok").inc()
        items.inc(len(scores))
        latency.observe(elapsed)
        return ScoreResponse(scores=scores, scorer=scorer.name, elapsed_s=elapsed)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "scorer": scorer.name}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
