// Package quiesce is the app side ("agent") of the quiesce control protocol, version 1.
//
// quiesce is a PID-1 supervisor for containers. In control mode it does not stop the app with a
// signal: it connects to a Unix socket the app serves and sends five step verbs, in order, each
// with a deadline:
//
//	drain          stop-accepting (2), drain-in-flight (3)
//	stop-cron      stop-cron (4)
//	stop-consumer  stop-consumer (5)
//	stop-poller    stop-poller (6)
//	close          close-mq (7), close-redis (8), close-db (9)
//
// The app registers one Handler per sub-step it has, dependency checks for health and an
// optional status callback, then calls Run. The agent enforces everything else the protocol
// asks of the app: the line limits and the answer to every malformed request, the single
// driver connection, the order of the steps, repeats that return the recorded result,
// deadlines and per-sub-step budgets (a handler gets a context.Context that expires before
// its hard deadline, and a handler that overruns is cut and recorded "timeout"), the peer
// check, the socket file's mode and its stale-file handling, and the exit once close has
// replied. Without a supervisor (QUIESCE_CONTROL_SOCKET unset), Run runs the same steps in
// order on SIGTERM.
//
// The agent takes the optional traceparent extension: a supervisor that traces sends each
// sub-step the W3C trace context of its step's span, and TraceParent returns it from the
// handler's context.
//
// The protocol itself is described in docs/PROTOCOL.md in the quiesce repository; this
// package follows it and its tests replay every example given there.
package quiesce
