package quiesce

import (
	"context"
	"fmt"
	"strings"
)

// ExtensionTraceParent is the name of the optional traceparent extension (PROTOCOL.md §5.5),
// as the agent lists it in hello's "extensions" and as the step verbs' argument: one W3C trace
// context per sub-step, so the app's spans for its sub-steps can be children of the
// supervisor's spans for its steps.
const ExtensionTraceParent = "traceparent"

// extensions lists the optional protocol extensions this agent takes, for hello.
var extensions = []string{ExtensionTraceParent}

// TraceParent returns the W3C traceparent the driver sent for the sub-step whose handler got
// ctx (the traceparent extension, PROTOCOL.md §5.5): the supervisor's span for this shutdown
// step, in the exact form "00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>", lowercase.
// An app that traces makes it the parent of the span it opens for the sub-step (with
// OpenTelemetry, through its propagation.TraceContext); an app that does not trace ignores it.
// The second result is false when the driver sent none (it does not trace), when the step runs
// in-process (RunLocal, Step), and for a context that is not a handler's.
func TraceParent(ctx context.Context) (string, bool) {
	info, ok := ctx.Value(stepKey{}).(stepInfo)
	if !ok || info.traceparent == "" {
		return "", false
	}
	return info.traceparent, true
}

// parseTraceParents parses the step verbs' traceparent= value for verb: one W3C traceparent
// per sub-step, comma-separated, in sub-step order. A wrong count or a malformed entry is
// bad_argument, with the Rust agent's message.
func parseTraceParents(verb Verb, value string) ([]string, *Refusal) {
	n := len(verb.SubSteps())
	bad := func(problem string) *Refusal {
		plural := "s"
		if n == 1 {
			plural = ""
		}
		return refuse(CodeBadArgument,
			"traceparent for %s needs %d W3C traceparent%s (one per sub-step, comma-separated, in order): %s; each is `00-<32 lowercase hex>-<16 lowercase hex>-<2 hex>`, e.g. `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`",
			verb, n, plural, problem)
	}
	items := strings.Split(value, ",")
	if len(items) != n {
		return nil, bad(fmt.Sprintf("got %d", len(items)))
	}
	for _, item := range items {
		if !validTraceParent(item) {
			return nil, bad(quote(item) + " is not one")
		}
	}
	return items, nil
}

// validTraceParent reports whether s is a W3C traceparent of version 00 in its exact form:
// "00-", 32 lowercase hex digits, "-", 16, "-", 2, and neither id all zeros.
func validTraceParent(s string) bool {
	parts := strings.Split(s, "-")
	if len(parts) != 4 || parts[0] != "00" {
		return false
	}
	trace, span, flags := parts[1], parts[2], parts[3]
	return len(trace) == 32 && lowerHex(trace) && !allZeros(trace) &&
		len(span) == 16 && lowerHex(span) && !allZeros(span) &&
		len(flags) == 2 && lowerHex(flags)
}

func lowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func allZeros(s string) bool { return strings.Trim(s, "0") == "" }
