package quiesce

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

func decode(t *testing.T, line string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(line), &m); err != nil {
		t.Fatalf("not JSON: %q", line)
	}
	return m
}

func wantCode(t *testing.T, line, code string) map[string]any {
	t.Helper()
	m := decode(t, line)
	if m["ok"] != false || m["error"] != code {
		t.Fatalf("want %s, got %s", code, line)
	}
	return m
}

func wantOK(t *testing.T, line string) map[string]any {
	t.Helper()
	m := decode(t, line)
	if m["ok"] != true {
		t.Fatalf("want ok, got %s", line)
	}
	return m
}

// gate is a handler that blocks until the gate is opened (or the test ends), then succeeds.
type gate struct {
	entered chan struct{}
	open    chan struct{}
}

func newGate(t *testing.T) *gate {
	g := &gate{entered: make(chan struct{}, 16), open: make(chan struct{})}
	t.Cleanup(g.release)
	return g
}

func (g *gate) release() {
	select {
	case <-g.open:
	default:
		close(g.open)
	}
}

func (g *gate) handler(ctx context.Context) (Report, error) {
	g.entered <- struct{}{}
	<-g.open
	return Report{Counts: map[string]uint64{"done": 1}}, nil
}

func (g *gate) waitEntered(t *testing.T) {
	t.Helper()
	select {
	case <-g.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the handler did not start")
	}
}

func stateOf(t *testing.T, c *client, verb Verb) string {
	t.Helper()
	m := wantOK(t, c.ask("status"))
	for _, s := range m["steps"].([]any) {
		s := s.(map[string]any)
		if s["verb"] == string(verb) {
			return s["state"].(string)
		}
	}
	t.Fatalf("no %s in status", verb)
	return ""
}

func TestStepsAreAcceptedOnlyInOrder(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	g := newGate(t)
	a := New("order")
	a.Handle(DrainInFlight, g.handler)
	_, path := serve(t, a)
	c := dial(t, path)
	wantOK(t, c.ask("hello role=driver"))

	for _, v := range Verbs[1:] {
		m := wantCode(t, c.ask(string(v)+" deadline_ms=5000"), CodeOutOfOrder)
		if m["expected"] != "drain" {
			t.Fatalf("%s: expected drain first, got %v", v, m["expected"])
		}
	}
	if m := wantOK(t, c.ask("status")); m["phase"] != "serving" {
		t.Fatalf("a refused step changed the phase: %v", m["phase"])
	}

	// While drain runs (its driver gone), stop-cron from the next driver must wait for it.
	c.send("drain deadline_ms=5000\n")
	g.waitEntered(t)
	c.c.Close()
	other := untilOK(t, path, "hello role=driver")
	if s := stateOf(t, other, VerbDrain); s != "running" {
		t.Fatalf("drain is %s", s)
	}
	m := wantCode(t, other.ask("stop-cron deadline_ms=5000"), CodeOutOfOrder)
	if !strings.Contains(m["message"].(string), "`drain` is still running") || m["expected"] != "drain" {
		t.Fatalf("got %v", m)
	}
	g.release()
	if m := wantOK(t, other.ask("drain deadline_ms=5000")); m["outcome"] != "ok" || m["repeated"] != true {
		t.Fatalf("drain: %v", m)
	}
	for _, v := range Verbs[1:] {
		if m := wantOK(t, other.ask(string(v)+" deadline_ms=5000")); m["step"] != string(v) {
			t.Fatalf("%s: %v", v, m)
		}
	}
	if m := wantOK(t, other.ask("status")); m["phase"] != "closed" || m["next_step"] != nil {
		t.Fatalf("after close: %v", m)
	}
}

// untilOK repeats request on fresh connections until it succeeds, for a slot that a closing
// connection frees on its own goroutine.
func untilOK(t *testing.T, path, request string) *client {
	t.Helper()
	end := time.Now().Add(5 * time.Second)
	for {
		c := dial(t, path)
		m := decode(t, c.ask(request))
		if m["ok"] == true {
			return c
		}
		if time.Now().After(end) {
			t.Fatalf("%s: still refused: %v", request, m)
		}
		c.c.Close()
		time.Sleep(10 * time.Millisecond)
	}
}

func TestOneDriverAtATime(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	_, path := serve(t, New("order"))
	first := dial(t, path)
	second := dial(t, path)
	wantOK(t, first.ask("hello role=driver"))
	wantOK(t, first.ask("hello role=driver")) // claiming again is fine
	wantCode(t, second.ask("hello role=driver"), CodeDriverTaken)
	if m := wantOK(t, second.ask("hello")); m["role"] != "observer" {
		t.Fatalf("the refused connection's role: %v", m["role"])
	}
	wantCode(t, second.ask("drain deadline_ms=5000"), CodeNotDriver)

	// Saying observer gives the slot up.
	wantOK(t, first.ask("hello role=observer"))
	wantOK(t, second.ask("hello role=driver"))
	wantCode(t, first.ask("hello role=driver"), CodeDriverTaken)

	// Closing the driver's connection frees the slot.
	second.c.Close()
	untilOK(t, path, "hello role=driver")
}

func TestDriverGoneMidStepFreesTheSlotAndTheStepCarriesOn(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	g := newGate(t)
	a := New("order")
	a.Handle(StopAccepting, g.handler)
	_, path := serve(t, a)
	first := dial(t, path)
	wantOK(t, first.ask("hello role=driver"))
	first.send("drain deadline_ms=10000\n")
	g.waitEntered(t)
	first.c.Close()

	// A reconnecting driver gets the slot while drain still runs, and its repeat waits.
	again := untilOK(t, path, "hello role=driver")
	if s := stateOf(t, again, VerbDrain); s != "running" {
		t.Fatalf("drain is %s", s)
	}
	again.send("drain deadline_ms=10000\n")
	time.Sleep(50 * time.Millisecond)
	g.release()
	m := wantOK(t, again.line())
	if m["repeated"] != true || m["outcome"] != "ok" {
		t.Fatalf("the repeat: %v", m)
	}
	if counts := m["counts"].(map[string]any); counts["done"] != 1.0 {
		t.Fatalf("the step did not run to its end: %v", m)
	}
	// The recorded reply comes back again, whatever the new deadline.
	if m := wantOK(t, again.ask("drain deadline_ms=1 budgets_ms=1,1")); m["repeated"] != true {
		t.Fatalf("%v", m)
	}
}

func TestHandlerContextAndHardDeadline(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	type seen struct {
		start, soft, hard time.Time
		sub               SubStep
		local             bool
	}
	got := make(chan seen, 8)
	a := New("order")
	for _, s := range []SubStep{CloseMQ, CloseRedis, CloseDB} {
		a.Handle(s, func(ctx context.Context) (Report, error) {
			soft, _ := ctx.Deadline()
			hard, _ := HardDeadline(ctx)
			sub, _ := SubStepOf(ctx)
			got <- seen{time.Now(), soft, hard, sub, IsLocal(ctx)}
			return Report{}, nil
		})
	}
	for _, v := range Verbs[:4] {
		if _, err := a.Step(v, time.Second); err != nil {
			t.Fatal(err)
		}
	}
	_, path := serve(t, a)
	c := dial(t, path)
	wantOK(t, c.ask("hello role=driver"))
	wantOK(t, c.ask("close deadline_ms=5000 budgets_ms=300,5000,50"))
	for i, want := range []struct {
		sub    SubStep
		budget time.Duration
		margin time.Duration
	}{{CloseMQ, 300 * time.Millisecond, 30 * time.Millisecond}, {CloseRedis, 5 * time.Second, 100 * time.Millisecond}, {CloseDB, 50 * time.Millisecond, 5 * time.Millisecond}} {
		s := <-got
		if s.sub != want.sub || s.local {
			t.Fatalf("%d: %+v", i, s)
		}
		if d := s.hard.Sub(s.start); d > want.budget || d < want.budget-200*time.Millisecond {
			t.Errorf("%s: hard deadline %v after start, want about %v", s.sub, d, want.budget)
		}
		if m := s.hard.Sub(s.soft); m > want.margin || m < want.margin-want.margin/5 {
			t.Errorf("%s: context expires %v before the hard deadline, want %v", s.sub, m, want.margin)
		}
	}
}

func TestOverrunningHandlersAreCut(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	release := make(chan struct{})
	defer close(release)
	a := New("order")
	// Ignores its context: the agent must cut it.
	a.Handle(StopAccepting, func(ctx context.Context) (Report, error) {
		<-release
		return Report{}, nil
	})
	// Gives up at its context's deadline.
	a.Handle(DrainInFlight, func(ctx context.Context) (Report, error) {
		<-ctx.Done()
		return Report{Counts: map[string]uint64{"requests_cancelled": 2}}, ctx.Err()
	})
	a.Handle(StopCron, func(ctx context.Context) (Report, error) { panic("boom") })
	a.Handle(StopConsumer, func(ctx context.Context) (Report, error) {
		return Report{Counts: map[string]uint64{"messages_requeued": 4}, Note: "4 messages left", TimedOut: true}, nil
	})
	_, path := serve(t, a)
	c := dial(t, path)
	wantOK(t, c.ask("hello role=driver"))

	started := time.Now()
	m := wantOK(t, c.ask("drain deadline_ms=5000 budgets_ms=100,150"))
	if took := time.Since(started); took > 1500*time.Millisecond {
		t.Fatalf("drain took %v with budgets of 250 ms", took)
	}
	subs := m["substeps"].([]any)
	s0, s1 := subs[0].(map[string]any), subs[1].(map[string]any)
	if s0["outcome"] != "timeout" || s0["message"] != "still running at the end of its own budget (100 ms): cancelled (see budgets_ms)" {
		t.Errorf("the hung sub-step: %v", s0)
	}
	if s1["outcome"] != "timeout" || s1["message"] != "still running at the end of its own budget (150 ms): cancelled (see budgets_ms)" ||
		s1["counts"].(map[string]any)["requests_cancelled"] != 2.0 {
		t.Errorf("the sub-step that gave up: %v", s1)
	}
	if m["outcome"] != "timeout" || !strings.HasPrefix(m["message"].(string), "stop-accepting: still running") {
		t.Errorf("drain: %v", m)
	}

	m = wantOK(t, c.ask("stop-cron deadline_ms=5000"))
	if m["outcome"] != "error" || m["message"] != "stop-cron: the handler panicked: boom" {
		t.Errorf("a panicking handler: %v", m)
	}
	m = wantOK(t, c.ask("stop-consumer deadline_ms=5000"))
	if m["outcome"] != "timeout" || m["message"] != "stop-consumer: 4 messages left" || m["counts"].(map[string]any)["messages_requeued"] != 4.0 {
		t.Errorf("a handler reporting a timeout: %v", m)
	}
	// Without budgets, the hung sub-step takes the verb's whole deadline.
	b := New("order")
	b.Handle(StopAccepting, func(ctx context.Context) (Report, error) {
		<-release
		return Report{}, nil
	})
	b.Handle(DrainInFlight, func(ctx context.Context) (Report, error) { return Report{}, nil })
	_, path = serve(t, b)
	c = dial(t, path)
	wantOK(t, c.ask("hello role=driver"))
	m = wantOK(t, c.ask("drain deadline_ms=200"))
	subs = m["substeps"].([]any)
	if s := subs[1].(map[string]any); s["outcome"] != "timeout" || !strings.HasPrefix(s["message"].(string), "not started") {
		t.Errorf("the sub-step after the hang: %v", s)
	}
	if d := m["duration_ms"].(float64); d < 200 || d > 1000 {
		t.Errorf("drain took %v ms with a deadline of 200", d)
	}
}

func TestLineLimits(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	_, path := serve(t, New("order"))
	c := dial(t, path)
	longest := "status pad=" + strings.Repeat("a", MaxLine-len("status pad="))
	m := wantCode(t, c.ask(longest), CodeBadArgument) // 4096 bytes: parsed
	if !strings.Contains(m["message"].(string), "unknown argument `pad`") {
		t.Fatalf("%v", m)
	}
	m = wantCode(t, c.ask(longest+"a"), CodeLineTooLong)
	if m["message"] != "request line is 4097 bytes, the limit is 4096: the line was discarded; send shorter requests" {
		t.Fatalf("%v", m)
	}
	wantCode(t, c.ask(longest+"\r"), CodeLineTooLong) // a \r counts
	wantCode(t, c.ask(longest[:MaxLine-1]+"\r"), CodeBadArgument)
	m = wantCode(t, c.ask(strings.Repeat("x", 1<<20)), CodeLineTooLong)
	if !strings.Contains(m["message"].(string), "1048576 bytes") {
		t.Fatalf("%v", m)
	}
	// Blank lines get no reply; pipelined requests are answered in order.
	c.send("\n \t\r\nstatus\r\nhello\n\nhealth\n")
	for _, key := range []string{"phase", "protocol", "healthy"} {
		if m := wantOK(t, c.line()); m[key] == nil {
			t.Fatalf("out of order: no %s in %v", key, m)
		}
	}
	// A last line without "\n" is answered once the peer closes its side.
	c.send("hello")
	if err := c.c.(*net.UnixConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if m := wantOK(t, c.line()); m["protocol"] != 1.0 {
		t.Fatalf("%v", m)
	}
	d := dial(t, path)
	d.send(strings.Repeat("y", 5000))
	_ = d.c.(*net.UnixConn).CloseWrite()
	wantCode(t, d.line(), CodeLineTooLong)
}

func TestSocketFile(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	path := socketPath(t)

	// A file that is not a socket is neither used nor removed.
	if err := os.WriteFile(path, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New("a").Serve(path); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("served over a regular file: %v", err)
	}
	if data, _ := os.ReadFile(path); string(data) != "keep" {
		t.Fatal("the regular file was changed")
	}
	os.Remove(path)

	// A stale socket (nobody accepts) is replaced.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	srv, err := New("a").Serve(path)
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	info, err := os.Stat(path)
	if err != nil || info.Mode().Perm() != 0o600 || info.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket file: %v %v", info.Mode(), err)
	}

	// A live one is an error, and is left alone.
	if _, err := New("b").Serve(path); err == nil || !strings.Contains(err.Error(), "already listening") {
		t.Fatalf("served over a live socket: %v", err)
	}
	wantOK(t, dial(t, path).ask("status"))
	srv.Shutdown()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the socket file is still there after Shutdown: %v", err)
	}

	// Shutdown removes only the file it created.
	srv, err = New("a").Serve(path)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(path)
	if err := os.WriteFile(path, []byte("successor"), 0o600); err != nil {
		t.Fatal(err)
	}
	srv.Shutdown()
	if data, _ := os.ReadFile(path); string(data) != "successor" {
		t.Fatal("Shutdown removed a file it did not create")
	}
	os.Remove(path)

	// A group-accessible mode.
	g := New("a")
	g.SetSocketMode(0o660)
	srv, err = g.Serve(path)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown()
	if info, _ := os.Stat(path); info.Mode().Perm() != 0o660 {
		t.Fatalf("mode %v", info.Mode())
	}
	if err := func() (err error) {
		defer func() {
			if recover() == nil {
				err = errors.New("registering after Serve did not panic")
			}
		}()
		g.Handle(CloseDB, nil)
		return nil
	}(); err != nil {
		t.Fatal(err)
	}
}

func TestOtherUsersAreRefused(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	needRoot(t, "connects as uid 65534")
	srv, path := serve(t, New("a"))
	_ = srv
	openUp(t, path)
	line := runPeer(t, path, 65534, 65534)
	m := wantCode(t, line, CodePeerRefused)
	if !strings.HasPrefix(m["message"].(string), "peer uid 65534 (gid 65534, pid ") {
		t.Fatalf("%v", m)
	}
	// With a group-accessible mode, the socket file's group is let in.
	g := New("a")
	g.SetSocketMode(0o660)
	gpath := socketPath(t)
	gsrv, err := g.Serve(gpath)
	if err != nil {
		t.Fatal(err)
	}
	defer gsrv.Shutdown()
	if err := os.Chown(gpath, 0, 65534); err != nil {
		t.Fatal(err)
	}
	openUp(t, gpath)
	// The rule is fixed at bind (gid 0 here), so gid 65534 stays out; gid 0 is in.
	wantCode(t, runPeer(t, gpath, 65534, 65534), CodePeerRefused)
	wantOK(t, runPeer(t, gpath, 65534, 0))
}

func TestClosedFiresOnlyAfterTheCloseReply(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	g := newGate(t)
	a := New("order")
	a.Handle(CloseDB, g.handler)
	_, path := serve(t, a)
	c := dial(t, path)
	wantOK(t, c.ask("hello role=driver"))
	for _, v := range Verbs[:4] {
		wantOK(t, c.ask(string(v)+" deadline_ms=5000"))
	}
	c.send("close deadline_ms=5000\n")
	g.waitEntered(t)
	select {
	case <-a.Closed():
		t.Fatal("Closed before close finished")
	case <-time.After(50 * time.Millisecond):
	}
	g.release()
	if m := wantOK(t, c.line()); m["step"] != "close" {
		t.Fatal(m)
	}
	select {
	case <-a.Closed():
	case <-time.After(400 * time.Millisecond):
		t.Fatal("Closed did not fire once the close reply was written")
	}
}

func TestClosedFiresAnywayWhenTheDriverIsGone(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	g := newGate(t)
	a := New("order")
	a.Handle(CloseDB, g.handler)
	_, path := serve(t, a)
	c := dial(t, path)
	wantOK(t, c.ask("hello role=driver"))
	for _, v := range Verbs[:4] {
		wantOK(t, c.ask(string(v)+" deadline_ms=5000"))
	}
	c.send("close deadline_ms=5000\n")
	g.waitEntered(t)
	c.c.Close()
	time.Sleep(20 * time.Millisecond)
	finished := time.Now()
	g.release()
	select {
	case <-a.Closed():
		if waited := time.Since(finished); waited < CloseReplyWait-50*time.Millisecond {
			t.Fatalf("Closed fired after %v, before a reconnecting driver could repeat close", waited)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Closed did not fire")
	}
}

func TestRunLocalRunsEveryStepInOrder(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	a := New("order")
	var order []SubStep
	budgets := map[SubStep]time.Duration{}
	for _, s := range SubSteps {
		if s == StopPoller {
			continue
		}
		a.Handle(s, func(ctx context.Context) (Report, error) {
			sub, _ := SubStepOf(ctx)
			hard, _ := HardDeadline(ctx)
			if !IsLocal(ctx) {
				return Report{}, errors.New("not local")
			}
			order = append(order, sub)
			budgets[sub] = time.Until(hard)
			return Report{}, nil
		})
	}
	results := a.RunLocal(10 * time.Second)
	if len(results) != 5 {
		t.Fatalf("%d results", len(results))
	}
	for i, r := range results {
		if r.Step != Verbs[i] || r.Outcome != OutcomeOK || r.Repeated {
			t.Errorf("%d: %+v", i, r)
		}
	}
	if results[3].Substeps[0].Note != "nothing registered" {
		t.Errorf("stop-poller: %+v", results[3])
	}
	want := []SubStep{StopAccepting, DrainInFlight, StopCron, StopConsumer, CloseMQ, CloseRedis, CloseDB}
	if len(order) != len(want) {
		t.Fatalf("ran %v", order)
	}
	for i := range want {
		if order[i] != want[i] {
			t.Fatalf("ran %v", order)
		}
	}
	// drain gets 4/10 of the budget; close the rest (2/2 of what is left after the others).
	if d := budgets[StopAccepting]; d < 3900*time.Millisecond || d > 4*time.Second {
		t.Errorf("drain's share: %v", d)
	}
	if d := budgets[CloseMQ]; d < 9*time.Second {
		t.Errorf("close's share: %v", d)
	}
	select {
	case <-a.Closed():
	case <-time.After(time.Second):
		t.Fatal("Closed did not fire after a local close")
	}
	// A second run returns the recorded results.
	if again := a.RunLocal(time.Second); len(again) != 5 || !again[0].Repeated {
		t.Fatalf("%+v", again)
	}
}

func TestRunUnderASupervisor(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	path := socketPath(t)
	t.Setenv(SocketEnv, path)
	a := New("order")
	ran := make(chan SubStep, 8)
	a.Handle(CloseDB, func(ctx context.Context) (Report, error) {
		ran <- CloseDB
		return Report{}, nil
	})
	done := make(chan error, 1)
	go func() { done <- a.Run(context.Background(), time.Second) }()
	var c *client
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			c = dial(t, path)
			break
		}
		if time.Now().After(end) {
			t.Fatal("the socket did not appear")
		}
	}
	wantOK(t, c.ask("hello role=driver"))
	for _, v := range Verbs {
		wantOK(t, c.ask(string(v)+" deadline_ms=5000"))
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Run did not return after close")
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket file left behind: %v", err)
	}
	if len(ran) != 1 {
		t.Fatal("close-db did not run")
	}

	// A socket that cannot be served is Run's error; a cancelled context ends it.
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := New("x").Run(context.Background(), time.Second); err == nil {
		t.Fatal("Run served over a regular file")
	}
	os.Remove(path)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := New("x").Run(ctx, time.Second); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run with a cancelled context: %v", err)
	}
}

func TestRunWithoutASupervisorStopsOnSIGTERM(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	t.Setenv(SocketEnv, "")
	a := New("order")
	a.Handle(StopCron, func(ctx context.Context) (Report, error) { return Report{}, nil })
	done := make(chan error, 1)
	go func() { done <- a.Run(context.Background(), 5*time.Second) }()
	select {
	case <-a.Ready():
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not get ready")
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after SIGTERM")
	}
	a.mu.Lock()
	phase := a.phase()
	a.mu.Unlock()
	if phase != "closed" {
		t.Fatalf("phase %s after a local stop", phase)
	}
}

func TestHealthRunsChecksConcurrentlyUnderTimeouts(t *testing.T) {
	hardTimeout(t, 20*time.Second)
	a := New("order")
	slow := func(ctx context.Context) error {
		select {
		case <-time.After(300 * time.Millisecond):
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	a.Check("db", true, slow)
	a.Check("redis", true, slow)
	a.CheckWithTimeout("mq", false, 50*time.Millisecond, func(ctx context.Context) error {
		<-ctx.Done()
		time.Sleep(20 * time.Millisecond)
		return nil
	})
	a.Check("cache", false, func(ctx context.Context) error { return errors.New("down") })
	_, path := serve(t, a)
	c := dial(t, path)
	started := time.Now()
	m := wantOK(t, c.ask("health"))
	if took := time.Since(started); took > 550*time.Millisecond {
		t.Errorf("health took %v: the checks did not run concurrently", took)
	}
	if m["healthy"] != true {
		t.Errorf("optional checks decided healthy: %v", m)
	}
	checks := m["checks"].([]any)
	mq := checks[2].(map[string]any)
	if mq["name"] != "mq" || mq["up"] != false || mq["error"] != "timed out after 50ms" || mq["latency_ms"] != 50.0 {
		t.Errorf("the timed-out check: %v", mq)
	}
	if cache := checks[3].(map[string]any); cache["error"] != "down" {
		t.Errorf("%v", cache)
	}
}
