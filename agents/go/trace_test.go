package quiesce

import (
	"context"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

const goodTP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

func TestTraceParentForm(t *testing.T) {
	for _, good := range []string{goodTP, strings.Replace(goodTP, "-01", "-00", 1), strings.Replace(goodTP, "-01", "-ff", 1)} {
		if !validTraceParent(good) {
			t.Errorf("%q refused", good)
		}
	}
	for _, bad := range []string{
		"",
		"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
		"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
		"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
		"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
		"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
		"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
		"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
		"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
		"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
		"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902g7-01",
		" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
	} {
		if validTraceParent(bad) {
			t.Errorf("%q accepted", bad)
		}
	}
	if _, r := parseTraceParents(VerbDrain, goodTP+","+goodTP); r != nil {
		t.Fatal(r)
	}
	// The Rust agent's messages (protocol/src/wire/trace.rs), word for word.
	for _, c := range []struct {
		verb  Verb
		value string
		want  string
	}{
		{VerbClose, goodTP + "," + goodTP, "traceparent for close needs 3 W3C traceparents (one per sub-step, comma-separated, in order): got 2; "},
		{VerbStopCron, "nope", "traceparent for stop-cron needs 1 W3C traceparent (one per sub-step, comma-separated, in order): `nope` is not one; "},
		{VerbDrain, goodTP + ",", "traceparent for drain needs 2 W3C traceparents (one per sub-step, comma-separated, in order): `` is not one; "},
	} {
		_, r := parseTraceParents(c.verb, c.value)
		const tail = "each is `00-<32 lowercase hex>-<16 lowercase hex>-<2 hex>`, e.g. `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`"
		if r == nil || r.Code != CodeBadArgument || r.Message != c.want+tail {
			t.Errorf("%s %q: got %v", c.verb, c.value, r)
		}
	}
}

type traceSeen struct {
	sub    SubStep
	parent string
	ok     bool
}

// TestEachSubStepGetsItsTraceParent drives a traced agent over the socket: refused values
// change nothing and run nothing; a valid list reaches each sub-step's handler in order; a verb
// sent without the argument, or run in-process, gives its handlers none.
func TestEachSubStepGetsItsTraceParent(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	var mu sync.Mutex
	var seen []traceSeen
	a := New("traced")
	for _, s := range SubSteps {
		a.Handle(s, func(ctx context.Context) (Report, error) {
			sub, _ := SubStepOf(ctx)
			parent, ok := TraceParent(ctx)
			mu.Lock()
			seen = append(seen, traceSeen{sub, parent, ok})
			mu.Unlock()
			return Report{}, nil
		})
	}
	_, path := serve(t, a)
	c := dial(t, path)
	hello := wantOK(t, c.ask("hello role=driver"))
	if got := hello["extensions"]; !reflect.DeepEqual(got, []any{"traceparent"}) {
		t.Fatalf("hello lists extensions %v, want [traceparent]", got)
	}
	if got := wantOK(t, c.ask("hello")); !reflect.DeepEqual(got["extensions"], []any{"traceparent"}) {
		t.Fatalf("an observer's hello lists extensions %v", got["extensions"])
	}
	wantOK(t, c.ask("hello role=driver"))

	tp := func(span string) string { return "00-4bf92f3577b34da6a3ce929d0e0e4736-" + span + "-01" }
	before := c.ask("status")
	for _, line := range []string{
		"drain deadline_ms=1000 traceparent=" + tp("00f067aa0ba902b7"),
		"drain deadline_ms=1000 traceparent=nope,nope",
		"drain deadline_ms=1000 traceparent=" + tp("00f067aa0ba902b7") + "," + tp("0000000000000000"),
		"drain deadline_ms=1000 traceparent=" + tp("00f067aa0ba902b7") + "," + tp("00f067aa0ba902b7") + "," + tp("00f067aa0ba902b7"),
		"drain deadline_ms=1000 budgets_ms=500,500 traceparent=" + tp("00F067AA0BA902B7") + "," + tp("00f067aa0ba902b7"),
	} {
		m := wantCode(t, c.ask(line), CodeBadArgument)
		if msg := m["message"].(string); !strings.HasPrefix(msg, "traceparent for drain needs 2 W3C traceparents") {
			t.Errorf("%s: %s", line, msg)
		}
	}
	// The deadline and budgets are checked first (PROTOCOL.md §3.1), as in the Rust agent.
	m := wantCode(t, c.ask("drain deadline_ms=0 traceparent=nope"), CodeBadArgument)
	if msg := m["message"].(string); !strings.HasPrefix(msg, "`deadline_ms=0` is not valid") {
		t.Errorf("deadline_ms is checked before traceparent: %s", msg)
	}
	m = wantCode(t, c.ask("drain deadline_ms=1000 budgets_ms=1 traceparent=nope"), CodeBadArgument)
	if msg := m["message"].(string); !strings.HasPrefix(msg, "budgets_ms needs 2 values") {
		t.Errorf("budgets_ms is checked before traceparent: %s", msg)
	}
	m = wantCode(t, c.ask("drain deadline_ms=1000 tracestate=x"), CodeBadArgument)
	if msg := m["message"].(string); msg != "unknown argument `tracestate` for `drain`: it takes only deadline_ms, budgets_ms, traceparent" {
		t.Errorf("unknown argument: %s", msg)
	}
	if after := c.ask("status"); after != before {
		t.Fatalf("a refusal changed the state:\n before %s\n after  %s", before, after)
	}
	mu.Lock()
	if len(seen) != 0 {
		t.Fatalf("a refused step ran handlers: %v", seen)
	}
	mu.Unlock()

	x, y, z := tp("00f067aa0ba902b7"), tp("00f067aa0ba902b8"), tp("00f067aa0ba902b9")
	if m := wantOK(t, c.ask("drain deadline_ms=1000 traceparent="+x+","+y)); m["outcome"] != "ok" {
		t.Fatalf("drain: %v", m)
	}
	// Without the argument the handler gets none.
	if m := wantOK(t, c.ask("stop-cron deadline_ms=1000")); m["outcome"] != "ok" {
		t.Fatalf("stop-cron: %v", m)
	}
	unsampled := strings.TrimSuffix(z, "-01") + "-00"
	if m := wantOK(t, c.ask("stop-consumer deadline_ms=1000 budgets_ms=1000 traceparent="+unsampled)); m["outcome"] != "ok" {
		t.Fatalf("stop-consumer: %v", m)
	}
	// In-process, no driver: none either.
	if _, err := a.Step(VerbStopPoller, time.Second); err != nil {
		t.Fatal(err)
	}
	// A repeat returns the recorded reply and runs nothing, whatever its traceparent.
	if m := wantOK(t, c.ask("stop-poller deadline_ms=1000 traceparent="+x)); m["repeated"] != true {
		t.Fatalf("stop-poller repeat: %v", m)
	}
	if m := wantOK(t, c.ask("close deadline_ms=1000 traceparent="+z+","+y+","+x)); m["outcome"] != "ok" {
		t.Fatalf("close: %v", m)
	}
	want := []traceSeen{
		{StopAccepting, x, true},
		{DrainInFlight, y, true},
		{StopCron, "", false},
		{StopConsumer, unsampled, true},
		{StopPoller, "", false},
		{CloseMQ, z, true},
		{CloseRedis, y, true},
		{CloseDB, x, true},
	}
	mu.Lock()
	defer mu.Unlock()
	if !reflect.DeepEqual(seen, want) {
		t.Fatalf("handlers saw\n %v\nwant\n %v", seen, want)
	}
	if _, ok := TraceParent(context.Background()); ok {
		t.Fatal("a context that is not a handler's has a traceparent")
	}
}
