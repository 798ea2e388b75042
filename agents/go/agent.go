package quiesce

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"os"
	"sync"
	"time"
)

// DefaultCheckTimeout is how long a health check may take before it counts as down.
const DefaultCheckTimeout = time.Second

// DefaultSocketMode is the control socket file's mode: owner only.
const DefaultSocketMode os.FileMode = 0o600

// CloseReplyWait is how long the agent waits, after close finished, for its reply to be
// written to a driver before Closed fires anyway (the driver may be gone; a reconnecting one
// repeats close within this).
const CloseReplyWait = 500 * time.Millisecond

// SocketEnv is the environment variable the supervisor sets to the control socket's path.
const SocketEnv = "QUIESCE_CONTROL_SOCKET"

// Report is what a step handler did: named counts and an optional remark. The counts of a
// verb's sub-steps are summed by key into the verb's counts.
type Report struct {
	// Counts such as "requests_drained": 12.
	Counts map[string]uint64
	// Note is shown as the sub-step's note (its message when TimedOut is set).
	Note string
	// TimedOut marks a handler that stopped at its deadline with work left over: the
	// sub-step is recorded "timeout" with these counts, so the supervisor names it.
	TimedOut bool
}

// Handler runs one sub-step. Its context is cancelled a little before the sub-step's hard
// deadline (see HardDeadline), so the handler can stop waiting, cancel what is left and still
// return its counts. A handler still running at the hard deadline is cut: the sub-step is
// recorded "timeout" and its late result is ignored. Returning an error records "error" with
// the error's text; returning the context's error after it expired records "timeout".
type Handler func(ctx context.Context) (Report, error)

// CheckFunc is a dependency check for health: nil means up. Its context expires at the
// check's timeout.
type CheckFunc func(ctx context.Context) error

type check struct {
	name     string
	required bool
	timeout  time.Duration
	run      CheckFunc
}

// Agent is the app side of the quiesce control protocol. Register handlers, checks and the
// status callback first, then serve (Serve, ServeFromEnv or Run). It is safe for concurrent
// use; registering after serving has started panics.
type Agent struct {
	name string

	mu           sync.Mutex
	frozen       bool
	services     []string
	handlers     map[SubStep]Handler
	checks       []check
	checkTimeout time.Duration
	status       func() any
	socketMode   os.FileMode
	logger       *log.Logger

	seq      [5]*slot
	driver   uint64 // connection id of the driver, 0 when the slot is free
	nextConn uint64

	closeFinished sync.Once
	replied       chan struct{} // closed once a driver has the reply to close
	repliedOnce   sync.Once
	exit          chan struct{} // closed when the app should exit (see Closed)
	ready         chan struct{} // closed once Run handles a stop (see Ready)
	readyOnce     sync.Once
}

// New returns an agent for the app named name, with no handlers yet.
func New(name string) *Agent {
	a := &Agent{
		name:         name,
		handlers:     map[SubStep]Handler{},
		checkTimeout: DefaultCheckTimeout,
		socketMode:   DefaultSocketMode,
		replied:      make(chan struct{}),
		exit:         make(chan struct{}),
		ready:        make(chan struct{}),
	}
	for i := range a.seq {
		a.seq[i] = &slot{}
	}
	return a
}

func (a *Agent) register(f func()) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.frozen {
		panic("quiesce: register handlers and checks before serving")
	}
	f()
}

func (a *Agent) freeze() {
	a.mu.Lock()
	a.frozen = true
	a.mu.Unlock()
}

// Service adds gRPC service names the app serves (reported in hello; the supervisor's health
// server reports them as the app's readiness).
func (a *Agent) Service(names ...string) {
	a.register(func() { a.services = append(a.services, names...) })
}

// Handle registers the handler for a sub-step, replacing an earlier one. It panics on a name
// that is not one of the protocol's sub-steps.
func (a *Agent) Handle(s SubStep, h Handler) {
	if !s.Valid() {
		panic(fmt.Sprintf("quiesce: %q is not a sub-step of protocol v1", string(s)))
	}
	a.register(func() { a.handlers[s] = h })
}

// Check registers a dependency check for health. Required checks decide "healthy".
func (a *Agent) Check(name string, required bool, f CheckFunc) {
	a.CheckWithTimeout(name, required, 0, f)
}

// CheckWithTimeout is Check with its own timeout (0: the agent's, see SetCheckTimeout).
func (a *Agent) CheckWithTimeout(name string, required bool, timeout time.Duration, f CheckFunc) {
	a.register(func() { a.checks = append(a.checks, check{name, required, timeout, f}) })
}

// SetCheckTimeout sets the timeout of checks registered without their own (default
// DefaultCheckTimeout).
func (a *Agent) SetCheckTimeout(d time.Duration) {
	a.register(func() { a.checkTimeout = d })
}

// Status supplies the components object of status: per-component state and in-flight counts,
// any value encoding/json can marshal. It is called on every status request: keep it cheap.
func (a *Agent) Status(f func() any) {
	a.register(func() { a.status = f })
}

// SetSocketMode sets the socket file's permission bits (default 0600). With group bits set
// (0660), peers whose effective gid is the socket file's group are accepted as well.
func (a *Agent) SetSocketMode(mode os.FileMode) {
	a.register(func() { a.socketMode = mode & 0o777 })
}

// SetLogger makes the agent log the socket, each step's and sub-step's end and refused peers.
// Without one it logs nothing.
func (a *Agent) SetLogger(l *log.Logger) {
	a.register(func() { a.logger = l })
}

func (a *Agent) logf(format string, args ...any) {
	a.mu.Lock()
	l := a.logger
	a.mu.Unlock()
	if l != nil {
		l.Printf(format, args...)
	}
}

// Closed is closed once close has finished (driven over the socket or run locally) and its
// reply has been written to the connection that asked for it, or CloseReplyWait after close
// finished if nobody took the reply: the moment the app should exit, with code 0.
func (a *Agent) Closed() <-chan struct{} { return a.exit }

// closeDone is called once when close has finished.
func (a *Agent) closeDone(local bool) {
	a.closeFinished.Do(func() {
		if local {
			a.markReplied()
		}
		go func() {
			t := time.NewTimer(CloseReplyWait)
			defer t.Stop()
			select {
			case <-a.replied:
			case <-t.C:
			}
			close(a.exit)
		}()
	})
}

func (a *Agent) markReplied() { a.repliedOnce.Do(func() { close(a.replied) }) }

func (a *Agent) registered() []SubStep {
	out := []SubStep{}
	for _, s := range SubSteps {
		if a.handlers[s] != nil {
			out = append(out, s)
		}
	}
	return out
}

func (a *Agent) hello(driver bool) []byte {
	role := "observer"
	if driver {
		role = "driver"
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return render(helloReply{
		OK: true, Protocol: ProtocolVersion, App: a.name, PID: os.Getpid(), Role: role,
		Steps: Verbs[:], Registered: a.registered(), Services: append([]string{}, a.services...),
		Extensions: extensions,
	})
}

func (a *Agent) statusReply() []byte {
	a.mu.Lock()
	reply := statusReply{OK: true, App: a.name, Phase: a.phase(), NextStep: a.nextStep()}
	for i, s := range a.seq {
		reply.Steps = append(reply.Steps, s.status(Verbs[i]))
	}
	f := a.status
	a.mu.Unlock()
	reply.Components = json.RawMessage(`{}`)
	if f != nil {
		reply.Components = components(f)
	}
	return render(reply)
}

// components is the status callback's value as JSON; a callback that panics or returns
// something encoding/json cannot marshal is reported in its place.
func components(f func() any) (raw json.RawMessage) {
	defer func() {
		if p := recover(); p != nil {
			raw, _ = json.Marshal(map[string]string{"error": fmt.Sprintf("the status callback panicked: %v", p)})
		}
	}()
	raw, err := json.Marshal(f())
	if err != nil {
		raw, _ = json.Marshal(map[string]string{"error": "the status callback's value is not JSON: " + err.Error()})
	}
	return raw
}

// healthReply runs every check concurrently, each under its timeout, and reports them in
// registration order.
func (a *Agent) healthReply() []byte {
	a.mu.Lock()
	checks := append([]check{}, a.checks...)
	def := a.checkTimeout
	a.mu.Unlock()
	replies := make([]checkReply, len(checks))
	var wg sync.WaitGroup
	for i, c := range checks {
		timeout := c.timeout
		if timeout <= 0 {
			timeout = def
		}
		wg.Add(1)
		go func(i int, c check, timeout time.Duration) {
			defer wg.Done()
			replies[i] = runCheck(c, timeout)
		}(i, c, timeout)
	}
	wg.Wait()
	healthy := true
	for _, r := range replies {
		healthy = healthy && (r.Up || !r.Required)
	}
	return render(healthReply{OK: true, Healthy: healthy, Checks: replies})
}

func runCheck(c check, timeout time.Duration) checkReply {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	started := time.Now()
	done := make(chan error, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				done <- fmt.Errorf("the check panicked: %v", p)
			}
		}()
		done <- c.run(ctx)
	}()
	reply := checkReply{Name: c.name, Required: c.required}
	var err error
	select {
	case err = <-done:
		reply.LatencyMS = latency(time.Since(started))
	case <-ctx.Done():
		err = fmt.Errorf("timed out after %s", human(timeout))
		reply.LatencyMS = latency(timeout)
	}
	reply.Up = err == nil
	if err != nil {
		reply.Error = err.Error()
	}
	return reply
}

// latency is milliseconds rounded to a tenth.
func latency(d time.Duration) float64 {
	return float64((d+50*time.Microsecond)/(100*time.Microsecond)) / 10
}

// human writes 250ms, 1s, 1.5s.
func human(d time.Duration) string {
	if d < time.Second {
		return fmt.Sprintf("%dms", d/time.Millisecond)
	}
	return fmt.Sprintf("%gs", d.Seconds())
}

// countsText is counts as JSON (keys sorted), for logs.
func countsText(c map[string]uint64) string {
	b, _ := json.Marshal(c)
	return string(b)
}
