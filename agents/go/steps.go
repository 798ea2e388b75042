package quiesce

// Verb is one of the five step verbs of protocol v1. The supervisor sends them in the order of
// Verbs, and the agent accepts them only in that order.
type Verb string

// The step verbs, in protocol order.
const (
	VerbDrain        Verb = "drain"
	VerbStopCron     Verb = "stop-cron"
	VerbStopConsumer Verb = "stop-consumer"
	VerbStopPoller   Verb = "stop-poller"
	VerbClose        Verb = "close"
)

// Verbs lists every step verb in the only order the agent accepts them.
var Verbs = [5]Verb{VerbDrain, VerbStopCron, VerbStopConsumer, VerbStopPoller, VerbClose}

// SubStep is one of the app's eight shutdown steps (steps 2 to 9 of the nine-step shutdown).
// Register a Handler for each sub-step the app has; the others complete at once with the note
// "nothing registered".
type SubStep string

// The sub-steps, in execution order. The comment gives the shutdown step number.
const (
	StopAccepting SubStep = "stop-accepting"  // 2: close the listeners
	DrainInFlight SubStep = "drain-in-flight" // 3: wait for in-flight requests
	StopCron      SubStep = "stop-cron"       // 4: stop the scheduler, let a running job finish
	StopConsumer  SubStep = "stop-consumer"   // 5: stop the message consumers
	StopPoller    SubStep = "stop-poller"     // 6: stop the outbox poller
	CloseMQ       SubStep = "close-mq"        // 7: close the message broker connection
	CloseRedis    SubStep = "close-redis"     // 8: close the Redis client
	CloseDB       SubStep = "close-db"        // 9: close the database pool
)

// SubSteps lists every sub-step in execution order.
var SubSteps = [8]SubStep{
	StopAccepting, DrainInFlight, StopCron, StopConsumer, StopPoller, CloseMQ, CloseRedis, CloseDB,
}

// SubSteps returns the sub-steps the verb runs, in order. A request's budgets_ms carries one
// value per entry, in this order.
func (v Verb) SubSteps() []SubStep {
	switch v {
	case VerbDrain:
		return []SubStep{StopAccepting, DrainInFlight}
	case VerbStopCron:
		return []SubStep{StopCron}
	case VerbStopConsumer:
		return []SubStep{StopConsumer}
	case VerbStopPoller:
		return []SubStep{StopPoller}
	case VerbClose:
		return []SubStep{CloseMQ, CloseRedis, CloseDB}
	}
	return nil
}

// index is the verb's position in Verbs, or -1.
func (v Verb) index() int {
	for i, w := range Verbs {
		if w == v {
			return i
		}
	}
	return -1
}

// Valid reports whether v is one of the five step verbs.
func (v Verb) Valid() bool { return v.index() >= 0 }

// Verb returns the step verb that runs the sub-step.
func (s SubStep) Verb() Verb {
	for _, v := range Verbs {
		for _, sub := range v.SubSteps() {
			if sub == s {
				return v
			}
		}
	}
	return ""
}

// Number returns the sub-step's number in the nine-step shutdown (2 to 9), or 0 when s is not a
// sub-step. Step 1 (readiness off, then the preStop delay) is the supervisor's.
func (s SubStep) Number() int {
	for i, sub := range SubSteps {
		if sub == s {
			return i + 2
		}
	}
	return 0
}

// Valid reports whether s is one of the eight sub-steps.
func (s SubStep) Valid() bool { return s.Number() != 0 }
