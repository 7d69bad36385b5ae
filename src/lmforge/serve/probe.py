"""A served app asked for real: `serving` runs an ASGI app on a free 127.0.0.1 port in a thread (the pipeline's
serve probe and the server tests), `probe` sends chats to it over HTTP and counts what came back per served name:
redirect questions sent to real care, and the requests a guardrails policy acted on."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@contextmanager
def serving(app: Any, timeout: float = 60.0) -> Iterator[str]:
    """`app` served by uvicorn on a free 127.0.0.1 port in a thread: its URL once it listens; stopped after."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="lmforge-serve-probe", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server on 127.0.0.1:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST `body` as JSON; the response's JSON, or {"error": ...} for an HTTP error status."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        return {"error": json.loads(e.read() or b"{}").get("error", {"message": str(e)})}


@dataclass(frozen=True)
class Chat:
    """One chat to send: the served name to ask, the messages, and whether its right reply sends to real care."""

    model: str
    messages: list[dict[str, str]]
    redirect: bool
    kind: str | None = None


def probe(app: Any, chats: Sequence[Chat], max_new_tokens: int) -> dict[str, Any]:
    """Serve `app`, send each chat (greedy) through HTTP, and count per served name: redirect questions whose
    reply sends the user to real care (`rewards.sends_to_care`), and replies a policy acted on (the response's
    `policy` field: which rules, what they did). Returns {"models": counts, "replies": [...]}."""
    from lmforge.eval.rewards import sends_to_care

    replies = []
    with serving(app) as url:
        for chat in chats:
            body = {
                "model": chat.model,
                "messages": chat.messages,
                "temperature": 0,
                "max_tokens": max_new_tokens,
            }
            response = post_json(f"{url}/v1/chat/completions", body)
            reply = response["choices"][0]["message"]["content"] if "choices" in response else None
            replies.append({"model": chat.model, "question": chat.messages[-1]["content"], "kind": chat.kind,
                            "redirect": chat.redirect, "reply": reply,
                            "referred": reply is not None and sends_to_care(reply),
                            "policy": response.get("policy") or [],
                            **({"error": response["error"]} if "error" in response else {})})  # fmt: skip
    counts: dict[str, dict[str, Any]] = {}
    for r in replies:
        n = counts.setdefault(r["model"], {"asked": 0, "errors": 0, "redirect_questions": 0,
                                           "redirect_referred": 0, "other_questions": 0, "other_referred": 0,
                                           "policy_acted": 0, "rules": Counter()})  # fmt: skip
        group = "redirect" if r["redirect"] else "other"
        n["asked"] += 1
        n["errors"] += "error" in r
        n[f"{group}_questions"] += 1
        n[f"{group}_referred"] += r["referred"]
        n["policy_acted"] += bool(r["policy"])
        n["rules"].update(f"{a['rule']}:{a['effect']}" for a in r["policy"])
    for n in counts.values():
        n["rules"] = dict(n["rules"])
    return {"models": counts, "replies": replies}
