package quiesce

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// localWeights is how RunLocal shares its budget: drain 4, stop-cron 1, stop-consumer 2,
// stop-poller 1, close 2; time a step does not use passes to the later ones.
var localWeights = [5]int{4, 1, 2, 1, 2}

const (
	pending = iota
	running
	done
)

// slot is one step verb's state: pending, then running, then done with its recorded reply.
// It changes only under the agent's lock, and only in that direction.
type slot struct {
	state   int
	started time.Time
	done    chan struct{} // closed when the reply is recorded
	reply   StepResult
}

func (s *slot) status(v Verb) stepStatus {
	st := stepStatus{Verb: v, State: "pending"}
	switch s.state {
	case running:
		st.State = "running"
		ms := millis(time.Since(s.started))
		st.DurationMS = &ms
	case done:
		st.State = "done"
		st.Outcome = s.reply.Outcome
		ms := s.reply.DurationMS
		st.DurationMS = &ms
	}
	return st
}

// phase and nextStep are called with a.mu held.
func (a *Agent) phase() string {
	if a.seq[4].state == done {
		return "closed"
	}
	for _, s := range a.seq {
		if s.state != pending {
			return "stopping"
		}
	}
	return "serving"
}

func (a *Agent) nextStep() *Verb {
	for i, s := range a.seq {
		if s.state != done {
			v := Verbs[i]
			return &v
		}
	}
	return nil
}

// claim accepts verb when every earlier verb is done and changes nothing when it refuses. It
// returns the verb's slot, and whether the caller is to run it (false: the verb ran or is
// running; wait for the slot and return its reply as a repeat).
func (a *Agent) claim(verb Verb) (*slot, bool, *Refusal) {
	a.mu.Lock()
	defer a.mu.Unlock()
	i := verb.index()
	s := a.seq[i]
	if s.state != pending {
		return s, false, nil
	}
	for _, earlier := range Verbs[:i] {
		switch a.seq[earlier.index()].state {
		case running:
			return nil, false, &Refusal{Code: CodeOutOfOrder, Expected: earlier, Message: fmt.Sprintf(
				"`%s` must wait: `%s` is still running; send `%s` after `%s` has replied",
				verb, earlier, verb, earlier)}
		case pending:
			return nil, false, &Refusal{Code: CodeOutOfOrder, Expected: earlier, Message: fmt.Sprintf(
				"`%s` is out of order: `%s` has not run yet; send `%s deadline_ms=…` first (order: drain, stop-cron, stop-consumer, stop-poller, close)",
				verb, earlier, earlier)}
		}
	}
	s.state = running
	s.started = time.Now()
	s.done = make(chan struct{})
	a.frozen = true
	return s, true, nil
}

// startStep claims verb and, when it is this caller's to run, runs it on its own goroutine, so
// the connection that sent it cannot cancel it. The reply is ready once the slot's done channel
// is closed; read it with result. traceparents, when not nil, has one entry per sub-step.
func (a *Agent) startStep(verb Verb, received, deadline time.Time, budgets []time.Duration, traceparents []string, local bool) (*slot, bool, *Refusal) {
	s, run, refusal := a.claim(verb)
	if refusal != nil || !run {
		return s, !run, refusal
	}
	a.logf("quiesce: step %s started (budget %d ms, local %t)", verb, millis(deadline.Sub(received)), local)
	go func() {
		reply := a.runVerb(verb, received, deadline, budgets, traceparents, local)
		a.logf("quiesce: step %s finished: %s in %d ms, counts %s", verb, reply.Outcome, reply.DurationMS, countsText(reply.Counts))
		a.mu.Lock()
		s.reply = reply
		s.state = done
		a.mu.Unlock()
		close(s.done)
		if verb == VerbClose {
			a.closeDone(local)
		}
	}()
	return s, false, nil
}

// result is a finished slot's reply, marked repeated when asked.
func (a *Agent) result(s *slot, repeated bool) StepResult {
	a.mu.Lock()
	defer a.mu.Unlock()
	r := s.reply
	r.Repeated = repeated
	return r
}

// Step runs one step verb in-process with a budget from now, enforcing the same order as the
// socket: a verb that already ran returns its recorded result with Repeated set. The error is
// a *Refusal (out_of_order) when an earlier verb has not finished.
func (a *Agent) Step(verb Verb, budget time.Duration) (StepResult, error) {
	if !verb.Valid() {
		return StepResult{}, refuse(CodeUnknownVerb, "unknown step verb %s", quote(string(verb)))
	}
	now := time.Now()
	s, repeated, refusal := a.startStep(verb, now, now.Add(capWait(budget)), nil, nil, true)
	if refusal != nil {
		return StepResult{}, refusal
	}
	<-s.done
	return a.result(s, repeated), nil
}

// RunLocal runs every remaining step in order in-process, for an app that got SIGTERM without
// a supervisor: the same handlers, order and recording as over the socket. Steps that already
// ran return their recorded results; a step a driver is running is waited for. The total
// budget is shared by weight (drain 4, stop-cron 1, stop-consumer 2, stop-poller 1, close 2),
// time a step does not use passing to the later ones. It returns one result per verb run.
func (a *Agent) RunLocal(total time.Duration) []StepResult {
	overall := time.Now().Add(capWait(total))
	results := make([]StepResult, 0, len(Verbs))
	for i, verb := range Verbs {
		now := time.Now()
		left := overall.Sub(now)
		if left < 0 {
			left = 0
		}
		sum := 0
		for _, w := range localWeights[i:] {
			sum += w
		}
		share := time.Duration(float64(left) * float64(localWeights[i]) / float64(sum))
		s, repeated, refusal := a.startStep(verb, now, now.Add(share), nil, nil, true)
		if refusal != nil {
			a.logf("quiesce: local shutdown stopped at %s: %s", verb, refusal.Message)
			break
		}
		<-s.done
		results = append(results, a.result(s, repeated))
	}
	return results
}

func capWait(d time.Duration) time.Duration {
	if d > maxWait {
		return maxWait
	}
	return d
}

// runVerb runs every sub-step of verb in order under the verb's deadline and builds its reply.
// With budgets (one per sub-step, validated by the parser), sub-step i is cut at
// min(its start + budgets[i], deadline). With traceparents (likewise one per sub-step), sub-step
// i's handler finds traceparents[i] in its context (see TraceParent).
func (a *Agent) runVerb(verb Verb, received, deadline time.Time, budgets []time.Duration, traceparents []string, local bool) StepResult {
	a.mu.Lock()
	handlers := make(map[SubStep]Handler, len(a.handlers))
	for k, v := range a.handlers {
		handlers[k] = v
	}
	a.mu.Unlock()
	reply := StepResult{OK: true, Step: verb, Outcome: OutcomeOK, Counts: map[string]uint64{}}
	var failures []string
	for i, sub := range verb.SubSteps() {
		var budget time.Duration
		if i < len(budgets) {
			budget = budgets[i]
		}
		var parent string
		if i < len(traceparents) {
			parent = traceparents[i]
		}
		r := runSubStep(handlers[sub], subStepRun{sub, deadline, budget, parent, local})
		if r.Outcome == OutcomeOK {
			note := ""
			if r.Note != "" {
				note = ": " + r.Note
			}
			a.logf("quiesce: sub-step %d %s finished: ok in %d ms, counts %s%s", sub.Number(), sub, r.DurationMS, countsText(r.Counts), note)
		} else {
			a.logf("quiesce: sub-step %d %s finished: %s in %d ms, counts %s: %s", sub.Number(), sub, r.Outcome, r.DurationMS, countsText(r.Counts), r.Message)
			failures = append(failures, string(sub)+": "+r.Message)
		}
		if r.Outcome.rank() > reply.Outcome.rank() {
			reply.Outcome = r.Outcome
		}
		for k, v := range r.Counts {
			sum := reply.Counts[k] + v
			if sum < v {
				sum = ^uint64(0)
			}
			reply.Counts[k] = sum
		}
		reply.Substeps = append(reply.Substeps, r)
	}
	reply.Message = strings.Join(failures, "; ")
	reply.DurationMS = millis(time.Since(received))
	return reply
}

// wrapUpMax bounds the time between a handler's context expiring and the hard cut: a tenth of
// the time the sub-step has, at most this.
const wrapUpMax = 100 * time.Millisecond

type stepKey struct{}

type stepInfo struct {
	substep     SubStep
	hard        time.Time
	local       bool
	traceparent string // "" when the driver sent none
}

// HardDeadline returns the time at which the agent cuts the sub-step whose handler got ctx: the
// verb's deadline, or earlier when the driver sent per-sub-step budgets (budgets_ms). The
// context itself expires a little before it (a tenth of the sub-step's time, at most 100 ms),
// which leaves the handler time to return its counts.
func HardDeadline(ctx context.Context) (time.Time, bool) {
	info, ok := ctx.Value(stepKey{}).(stepInfo)
	return info.hard, ok
}

// SubStepOf returns the sub-step whose handler got ctx.
func SubStepOf(ctx context.Context) (SubStep, bool) {
	info, ok := ctx.Value(stepKey{}).(stepInfo)
	return info.substep, ok
}

// IsLocal reports whether the handler runs from RunLocal or Step (no supervisor) rather than
// for a driver on the control socket.
func IsLocal(ctx context.Context) bool {
	info, _ := ctx.Value(stepKey{}).(stepInfo)
	return info.local
}

type handlerResult struct {
	report Report
	err    error
}

// subStepRun is one sub-step's turn, as runSubStep gets it.
type subStepRun struct {
	sub      SubStep
	deadline time.Time     // the verb's
	budget   time.Duration // its own from its start (budgets_ms), 0 without
	parent   string        // the driver's traceparent for it, "" without
	local    bool
}

// runSubStep runs one sub-step until the verb's deadline, or until its own budget from now
// runs out if that comes first.
func runSubStep(h Handler, run subStepRun) SubStepResult {
	sub, deadline, budget := run.sub, run.deadline, run.budget
	started := time.Now()
	r := SubStepResult{Name: sub, Outcome: OutcomeOK, Counts: map[string]uint64{}}
	if h == nil {
		r.Note = "nothing registered"
		return r
	}
	if !deadline.After(started) {
		r.Outcome = OutcomeTimeout
		r.Message = "not started: the step's deadline had passed before this sub-step's turn"
		return r
	}
	cut, own := deadline, false
	if budget > 0 {
		if b := started.Add(budget); b.Before(deadline) {
			cut, own = b, true
		}
	}
	cutMessage := "still running at the step's deadline: cancelled (see deadline_ms)"
	if own {
		cutMessage = fmt.Sprintf("still running at the end of its own budget (%d ms): cancelled (see budgets_ms)", millis(budget))
	}
	margin := cut.Sub(started) / 10
	if margin > wrapUpMax {
		margin = wrapUpMax
	}
	base := context.WithValue(context.Background(), stepKey{}, stepInfo{sub, cut, run.local, run.parent})
	ctx, cancel := context.WithDeadline(base, cut.Add(-margin))
	defer cancel()
	results := make(chan handlerResult, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				results <- handlerResult{err: fmt.Errorf("the handler panicked: %v", p)}
			}
		}()
		report, err := h(ctx)
		results <- handlerResult{report, err}
	}()
	timer := time.NewTimer(time.Until(cut))
	defer timer.Stop()
	select {
	case res := <-results:
		for k, v := range res.report.Counts {
			r.Counts[k] = v
		}
		switch {
		case res.err != nil && ctx.Err() != nil && (errors.Is(res.err, context.DeadlineExceeded) || errors.Is(res.err, context.Canceled)):
			r.Outcome, r.Message = OutcomeTimeout, cutMessage
		case res.err != nil:
			r.Outcome, r.Message = OutcomeError, res.err.Error()
		case res.report.TimedOut:
			r.Outcome, r.Message = OutcomeTimeout, res.report.Note
			if r.Message == "" {
				r.Message = "reached its deadline"
			}
		default:
			r.Note = res.report.Note
		}
	case <-timer.C:
		r.Outcome, r.Message = OutcomeTimeout, cutMessage
	}
	r.DurationMS = millis(time.Since(started))
	return r
}
