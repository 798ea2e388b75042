#!/usr/bin/env python3
"""An app side of the control protocol written from docs/PROTOCOL.md alone, with misbehaviours the
Rust agent never shows, for the supervisor's process tests.

    raw_app.py EVENTS [--garbage-once VERB] [--stay-after-close] [--services N] [--extensions JSON]
                      [--refuse-traceparent] [--huge-durations]

Serves $QUIESCE_CONTROL_SOCKET: hello (one driver at a time, `driver_taken` for a second), status,
health and the five step verbs in order; a repeated step gets its recorded reply (PROTOCOL.md 6.3).

--garbage-once VERB   the first reply to VERB is a line that is not JSON (the step itself is done
                      and recorded, so a repeat gets the real reply)
--stay-after-close    do not exit after `close`; exit 0 on SIGTERM instead (an app the supervisor must
                      stop at its deadline)
--services N          announce N health services svc.0 … in hello, plus two malformed names
--extensions JSON     hello's `extensions` is this JSON value (well-formed or not)
--refuse-traceparent  a step verb with `traceparent=` is refused as an unknown argument, the way an
                      agent that does not take it would (after announcing it, with --extensions)
--huge-durations      every step reply reports a duration of 2^64-1 ms

EVENTS gets one line per event: `hello driver conn=N`, `refused driver_taken conn=N`,
`eof conn=N`, `verb LINE conn=N`, `garbage VERB`, `sigterm`.
"""

import json
import os
import signal
import socket
import sys
import threading

VERBS = ["drain", "stop-cron", "stop-consumer", "stop-poller", "close"]
SUBSTEPS = {
    "drain": ["stop-accepting", "drain-in-flight"],
    "stop-cron": ["stop-cron"],
    "stop-consumer": ["stop-consumer"],
    "stop-poller": ["stop-poller"],
    "close": ["close-mq", "close-redis", "close-db"],
}

args = sys.argv[1:]
events_path = args.pop(0)
garbage_once = None
stay_after_close = False
services = []
extensions = None
refuse_traceparent = False
huge_durations = False
while args:
    a = args.pop(0)
    if a == "--services":
        services = [f"svc.{i}" for i in range(int(args.pop(0)))] + ["bad name", "x" * 5000]
    elif a == "--garbage-once":
        garbage_once = args.pop(0)
    elif a == "--stay-after-close":
        stay_after_close = True
    elif a == "--extensions":
        extensions = json.loads(args.pop(0))
    elif a == "--refuse-traceparent":
        refuse_traceparent = True
    elif a == "--huge-durations":
        huge_durations = True
    else:
        sys.exit(f"raw_app.py: unknown option {a}")

lock = threading.Lock()
driver = None  # the connection number holding the driver slot
done = {}  # verb -> recorded reply
garbage_sent = False


def event(text):
    with lock, open(events_path, "a") as f:
        f.write(text + "\n")


def reply(obj):
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def hello_reply(role):
    return {
        "ok": True,
        "protocol": 1,
        "app": "raw-app",
        "pid": os.getpid(),
        "role": role,
        "steps": VERBS,
        "registered": [s for v in VERBS for s in SUBSTEPS[v]],
        "services": services,
        **({} if extensions is None else {"extensions": extensions}),
    }


def status_reply():
    steps = [{"verb": v, "state": "done" if v in done else "pending"} for v in VERBS]
    nxt = next((v for v in VERBS if v not in done), None)
    return {"ok": True, "app": "raw-app", "phase": "serving" if nxt else "closed",
            "next_step": nxt, "steps": steps, "components": {}}


def step_reply(verb):
    took = 2**64 - 1 if huge_durations else 0
    subs = [{"name": s, "outcome": "ok", "duration_ms": took, "counts": {}} for s in SUBSTEPS[verb]]
    return {"ok": True, "step": verb, "outcome": "ok", "duration_ms": took, "counts": {},
            "substeps": subs}


def answer(conn_no, line):
    """The reply bytes for one request line, and whether the app exits after writing them."""
    global driver, garbage_sent
    words = line.split()
    verb, kv = words[0], dict(w.split("=", 1) for w in words[1:] if "=" in w)
    if verb == "hello":
        role = kv.get("role", "observer")
        if role == "driver":
            with lock:
                taken = driver is not None and driver != conn_no
                if not taken:
                    driver = conn_no
            if taken:
                event(f"refused driver_taken conn={conn_no}")
                return reply({"ok": False, "error": "driver_taken",
                              "message": "another connection is the driver"}), False
            event(f"hello driver conn={conn_no}")
        return reply(hello_reply(role)), False
    if verb == "status":
        return reply(status_reply()), False
    if verb == "health":
        return reply({"ok": True, "healthy": True, "checks": []}), False
    if verb in VERBS:
        event(f"verb {line} conn={conn_no}")
        if driver != conn_no:
            return reply({"ok": False, "error": "not_driver", "message": "say hello role=driver"}), False
        if refuse_traceparent and "traceparent" in kv:
            return reply({"ok": False, "error": "bad_argument",
                          "message": f"unknown argument `traceparent` for `{verb}`: it takes only "
                                     "deadline_ms, budgets_ms"}), False
        if verb not in done:
            done[verb] = step_reply(verb)
            if verb == garbage_once and not garbage_sent:
                garbage_sent = True
                event(f"garbage {verb}")
                return b"this is not a protocol reply\n", False
        return reply(done[verb]), verb == "close" and not stay_after_close
    return reply({"ok": False, "error": "unknown_verb", "message": f"unknown verb {verb}"}), False


def serve(conn, conn_no):
    global driver
    buf = b""
    try:
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode().strip()
                if not line:
                    continue
                out, exit_after = answer(conn_no, line)
                conn.sendall(out)
                if exit_after:
                    event("exit code=0")
                    os._exit(0)
    finally:
        event(f"eof conn={conn_no}")
        with lock:
            if driver == conn_no:
                driver = None
        conn.close()


def main():
    path = os.environ["QUIESCE_CONTROL_SOCKET"]
    if stay_after_close:
        def on_term(_sig, _frame):
            event("sigterm")
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o600)
    srv.listen(16)
    event("listening")
    n = 0
    while True:
        conn, _ = srv.accept()
        n += 1
        threading.Thread(target=serve, args=(conn, n), daemon=True).start()


main()
